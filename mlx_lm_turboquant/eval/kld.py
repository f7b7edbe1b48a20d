"""Teacher-forced comparison of a compressed cache against the uncompressed one.

Both runs see the same tokens: a prefill of ``prefill`` tokens, then ``steps`` single
tokens fed one at a time (each step's input is the true next token, not the model's
guess), so the two runs' logits can be compared step by step.
"""

from dataclasses import asdict, dataclass

import mlx.core as mx
import numpy as np
from mlx_lm.models import cache as mlx_cache

from ..api import make_prompt_cache
from ..cache import TurboQuantKVCache


@dataclass
class KLResult:
    scheme: str
    layers: str
    prefill: int
    steps: int
    kl_mean: float
    kl_median: float
    kl_p99: float
    top1_agreement: float
    ppl_reference: float
    ppl_compressed: float
    kv_bytes: int
    kv_bytes_reference: int

    def as_dict(self):
        return asdict(self)


def step_logprobs(model, ids, cache, prefill, steps, prefill_step=2048):
    """Log-probabilities ``[steps, vocab]`` of the decode steps (float32)."""
    tokens = mx.array(ids[None, : prefill + steps])
    for start in range(0, prefill, prefill_step):
        model(tokens[:, start : min(prefill, start + prefill_step)], cache=cache)
        mx.eval([c.state for c in cache])
    out = []
    for t in range(prefill, prefill + steps):
        logits = model(tokens[:, t : t + 1], cache=cache)[0, -1].astype(mx.float32)
        out.append(logits - mx.logsumexp(logits))
        if len(out) % 32 == 0:
            mx.eval(out)
    return mx.stack(out)


def kv_bytes(cache) -> int:
    """Bytes the cache holds, with uncompressed layers counted at 2 bytes per element
    (as an fp16 model would hold them, whatever dtype this run used)."""
    total = 0
    for c in cache:
        if isinstance(c, mlx_cache.KVCache) and not c.empty():
            total += c.nbytes * 2 // c.keys.dtype.size
        elif isinstance(c, TurboQuantKVCache) and not c.empty():
            floats = [c.keys] if c.scheme.key_bits == 0 else []  # counted at 2 bytes each
            floats += [a for a in (c.recent_keys, c.recent_values) if a is not None]
            total += c.nbytes - sum(a.nbytes - a.size * 2 for a in floats)
        else:
            total += c.nbytes
    return total


def reference_run(model, ids, prefill=768, steps=256):
    """The uncompressed run: ``(logprobs [steps, vocab], cache)``; reusable across schemes."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or len(ids) < prefill + steps + 1:
        raise ValueError(f"need a 1-D array of at least {prefill + steps + 1} ids, got {ids.shape}")
    cache = mlx_cache.make_prompt_cache(model)
    logprobs = step_logprobs(model, ids, cache, prefill, steps)
    mx.eval(logprobs)
    return logprobs, cache


def teacher_forced_kl(model, ids, scheme, layers=None, prefill=768, steps=256, reference=None,
                      cache=None) -> KLResult:  # fmt: skip
    """KL(reference || compressed) per decode step, top-1 agreement and perplexities.

    Args:
        ids: 1-D int array with at least ``prefill + steps + 1`` tokens.
        reference: the result of :func:`reference_run` for the same ids, to reuse.
        cache: a ready cache list to evaluate instead of ``make_prompt_cache(model, scheme, layers)``.
    """
    ids = np.asarray(ids)
    ref, ref_cache = reference or reference_run(model, ids, prefill, steps)
    tq_cache = cache if cache is not None else make_prompt_cache(model, scheme, layers=layers)
    tq = step_logprobs(model, ids, tq_cache, prefill, steps)
    kl = (mx.exp(ref) * (ref - tq)).sum(axis=-1)
    targets = mx.array(ids[prefill + 1 : prefill + steps + 1])
    nll_ref = -mx.take_along_axis(ref, targets[:, None], axis=-1)
    nll_tq = -mx.take_along_axis(tq, targets[:, None], axis=-1)
    agree = (ref.argmax(-1) == tq.argmax(-1)).astype(mx.float32).mean()
    kl = np.array(kl)
    return KLResult(
        scheme=str(getattr(scheme, "name", scheme)) if cache is None else "custom",
        layers=str(layers if layers is not None else "default"),
        prefill=prefill,
        steps=steps,
        kl_mean=float(kl.mean()),
        kl_median=float(np.median(kl)),
        kl_p99=float(np.percentile(kl, 99)),
        top1_agreement=float(agree),
        ppl_reference=float(mx.exp(nll_ref.mean())),
        ppl_compressed=float(mx.exp(nll_tq.mean())),
        kv_bytes=kv_bytes(tq_cache),
        kv_bytes_reference=kv_bytes(ref_cache),
    )
