"""Seam: ``mlx_lm.perplexity.eval_ppl``.

mlx-lm scores each sequence in one forward pass without a cache, which a KV scheme
cannot affect. With a scheme active, the sequences are fed through a compressed cache
``--kv-chunk-size`` tokens at a time, so every token attends to compressed keys and
values, as it would while generating.
"""

import math

from . import _patching, state
from .cache_factory import create_cache

CHUNK = 256


def eval_ppl_through_cache(model, data, batch_size=8, chunk_size=CHUNK, selection=None):
    """Perplexity and its standard error, each batch run through a fresh cache.

    Args:
        data: ``[N, L]`` token ids.
    """
    import mlx.core as mx
    import mlx.nn as nn

    all_losses = []
    num_batches = (len(data) + batch_size - 1) // batch_size
    for i, s in enumerate(range(0, len(data), batch_size)):
        batch = data[s : s + batch_size]
        B, L = batch.shape
        # One report per run, not one per batch.
        cache = create_cache(model, None, selection, "perplexity", report_it=(i == 0))
        inputs, targets = batch[:, :-1], batch[:, 1:]
        for c0 in range(0, L - 1, chunk_size):
            c1 = min(c0 + chunk_size, L - 1)
            logits = model(inputs[:, c0:c1], cache=cache).astype(mx.float32)
            losses = nn.losses.cross_entropy(logits, targets[:, c0:c1], reduction="none")
            mx.eval(losses)
            all_losses.append(losses.flatten())
        print(f"  Processed {i + 1}/{num_batches} batches (through the KV cache)...", end="\r")
    print()
    all_losses = mx.concatenate(all_losses)
    mean_loss = all_losses.mean().item()
    ppl = math.exp(mean_loss)
    std_dev = mx.sqrt(mx.var(all_losses, ddof=1)).item()
    standard_error = std_dev / math.sqrt(all_losses.size)
    return ppl, ppl * standard_error


def _wrap(original):
    def eval_ppl(model, data, batch_size=8):
        selection = state.active()
        if selection is None or selection.scheme is None:
            return original(model, data, batch_size=batch_size)
        chunk = _chunk_size()
        print(f"Evaluating through a {selection.scheme.name} KV cache, {chunk} tokens per step")
        return eval_ppl_through_cache(model, data, batch_size, chunk, selection)

    eval_ppl.__doc__ = original.__doc__
    return eval_ppl


def _chunk_size():
    return state.options.get("kv_chunk_size") or CHUNK


def install():
    module = _patching.loaded("mlx_lm.perplexity")
    if module is not None:
        _patching.swap(module, "eval_ppl", _wrap, copies=False)


def uninstall():
    module = _patching.loaded("mlx_lm.perplexity")
    if module is not None:
        _patching.restore(module, "eval_ppl", copies=False)


def is_installed() -> bool:
    module = _patching.loaded("mlx_lm.perplexity")
    return module is not None and _patching.swapped(module, "eval_ppl")
