"""Why a prompt's greedy text can differ served batched vs alone (issue #4, docs/server.md).

Runs mlx-lm's ``BatchGenerator`` (what ``mlx_lm.server`` drives) in-process on the prompts
of ``tests/test_server_batching.py``: each prompt alone (a batch of one, as the server serves
one request at a time) and all of them inserted together (as concurrent requests are), once
with ``--scheme`` and once with the plain fp16 cache. Every ``update_and_fetch`` is recorded,
so for each prompt we have the un-quantized keys / values its row fed to each layer, the
codes its cache stored (the caches handed back at the end, positions both runs fed the same
tokens), and the log-probabilities of every step. Per prompt it reports

* the first diverging step and the alone run's top-2 margin there (nats);
* per layer: max |difference| of the raw keys / values fed alone vs batched (float noise),
  stored codes that differ, whether each flip is to the neighbouring centroid, how far the
  flipped coordinate lay from its bucket boundary, decoded difference in quantization steps,
  and whether every stored code is exactly the encoding of the raw input of its own row
  (a row / offset / padding bug in the batch cache would break that);
* per step: max |difference| of the log-probabilities alone vs batched, compressed and fp16.

    python benchmarks/batch_divergence.py --layers all
    python benchmarks/batch_divergence.py --layers all --dtype float32

Writes ``benchmarks/results/batch_divergence_<scheme>_<layers>_<dtype>.json`` (or ``--out``).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = ROOT.parent / "shared" / "models" / "tq-llama-8k"
# The eight requests of tests/test_server_batching.py (PROMPTS[:7] and the long prompt).
PROMPTS = [
    "Once upon a time there was",
    "def fibonacci(n):",
    "The quick brown fox jumps over the lazy dog.",
    "In",
    "import numpy as np\nimport mlx.core as mx\n",
    "class Cache:\n    def __init__(self):\n        self.keys = None",
    "A list of prime numbers: 2, 3, 5, 7, 11,",
    "\n".join(f"    def method_{i}(self, x):\n        return x * {i} + self.offset"
              for i in range(24)) + "\n\nclass Next:",
]  # fmt: skip


class Recorder:
    """Records what every layer's cache is fed, per request (uid) and layer, in token order.

    ``BatchGenerator`` calls the model from ``PromptProcessingBatch.prompt`` (right-padded
    prompt chunks) and ``GenerationBatch._step`` (one token per row); both are wrapped to
    note which uid each batch row belongs to and how many of a chunk's slots are real.
    Each forward pass updates the layers in order, so the n-th update is layer n % layers.
    """

    def __init__(self, n_layers):
        self.n_layers, self.calls, self.ctx = n_layers, 0, None
        self.keys, self.values = {}, {}  # (uid, layer) -> list of [H, D] arrays
        self.attn, self.attn32 = {}, {}  # attention outputs, model dtype / float32 queries
        self._saved = []

    def _patch(self, owner, name, make):
        original = getattr(owner, name)
        self._saved.append((owner, name, original))
        setattr(owner, name, make(original))

    def install(self, model_module):
        from mlx_lm.generate import GenerationBatch, PromptProcessingBatch
        from mlx_lm.models.cache import BatchKVCache

        from mlx_lm_turboquant.batch_cache import BatchTurboQuantKVCache
        from mlx_lm_turboquant.cache import CompressedKV

        rec = self

        def wrap_prompt(original):
            def prompt(self, tokens):
                lengths = [len(t) for t in tokens]
                rec.ctx = dict(uids=list(self.uids), lengths=lengths, done=[0] * rec.n_layers)
                try:
                    return original(self, tokens)
                finally:
                    rec.ctx = None

            return prompt

        def wrap_step(original):
            def _step(self):
                rec.ctx = dict(uids=list(self.uids), lengths=None, done=[0] * rec.n_layers)
                try:
                    return original(self)
                finally:
                    rec.ctx = None

            return _step

        def wrap_update(original):
            def update_and_fetch(self, keys, values):
                rec.record(keys, values)
                return original(self, keys, values)

            return update_and_fetch

        def wrap_attention(original):
            def scaled_dot_product_attention(queries, keys, values, cache, scale, mask,
                                             sinks=None):  # fmt: skip
                out = original(queries, keys, values, cache, scale, mask, sinks=sinks)
                rec.record_attention(out, rec.attn)
                if isinstance(keys, CompressedKV):  # the same attention, float32 throughout
                    out32 = original(queries.astype(mx.float32), keys, values, cache, scale,
                                     mask, sinks=sinks)  # fmt: skip
                    rec.record_attention(out32, rec.attn32)
                return out

            return scaled_dot_product_attention

        self._patch(model_module, "scaled_dot_product_attention", wrap_attention)
        self._patch(PromptProcessingBatch, "prompt", wrap_prompt)
        self._patch(GenerationBatch, "_step", wrap_step)
        for cls in (BatchTurboQuantKVCache, BatchKVCache):  # BatchGenerator's caches
            self._patch(cls, "update_and_fetch", wrap_update)

    def uninstall(self):
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()

    def record(self, keys, values):
        layer = self.calls % self.n_layers
        self.calls += 1
        ctx = self.ctx
        if ctx is None:
            raise RuntimeError("a cache update outside BatchGenerator's prompt / step")
        ctx["done"][layer] += keys.shape[2]
        for b, uid, j in self._rows(layer, keys.shape[2]):
            self.keys.setdefault((uid, layer), []).append(keys[b, :, j])
            self.values.setdefault((uid, layer), []).append(values[b, :, j])

    def _rows(self, layer, L):
        """``(b, uid, j)`` for the real slots of this call's ``L`` new positions."""
        ctx = self.ctx
        start = ctx["done"][layer] - L  # the update of this layer already counted them
        for b, uid in enumerate(ctx["uids"]):
            real = L if ctx["lengths"] is None else max(0, min(L, ctx["lengths"][b] - start))
            for j in range(real):  # right padding of a prompt chunk is not the row's
                yield b, uid, j

    def record_attention(self, out, store):
        layer = (self.calls - 1) % self.n_layers  # attention follows its layer's update
        for b, uid, j in self._rows(layer, out.shape[2]):
            store.setdefault((uid, layer), []).append(out[b, :, j])

    def attention(self, uid, layer, n, store):
        """The first ``n`` attention outputs of ``uid`` at ``layer``, ``[H_q, n, D]``."""
        if (uid, layer) not in store:
            return None
        return np.array(mx.stack(store[(uid, layer)][:n], axis=1).astype(mx.float32))

    def fed(self, uid, layer, n):
        """The first ``n`` raw keys / values of ``uid`` at ``layer``: ``[H, n, D]`` float32."""
        k = mx.stack(self.keys[(uid, layer)][:n], axis=1).astype(mx.float32)
        v = mx.stack(self.values[(uid, layer)][:n], axis=1).astype(mx.float32)
        return np.array(k), np.array(v)


def run_generator(model, ids, scheme, layers, max_tokens, prefill_step_size):
    """``BatchGenerator`` over ``ids`` (inserted together) with the server's batch sizes.

    Returns per prompt: tokens, per-step log-probabilities, the cache handed back, and the
    recorder holding what each row fed each layer."""
    from mlx_lm.generate import BatchGenerator

    rec = Recorder(len(model.layers))
    rec.install(sys.modules[type(model).__module__])
    try:
        gen = BatchGenerator(model, kv_scheme=scheme, kv_layers=layers if scheme else None,
                             completion_batch_size=32, prefill_batch_size=8,
                             prefill_step_size=prefill_step_size)  # fmt: skip
        try:
            uids = gen.insert(ids, max_tokens=[max_tokens] * len(ids))
            out = {u: dict(tokens=[], logprobs=[], cache=None) for u in uids}
            while True:
                responses = gen.next_generated()
                if not responses:
                    break
                for r in responses:
                    out[r.uid]["tokens"].append(r.token)
                    out[r.uid]["logprobs"].append(np.array(r.logprobs.astype(mx.float32)))
                    if r.finish_reason is not None:
                        out[r.uid]["cache"] = r.prompt_cache
        finally:
            gen.close()
    finally:
        rec.uninstall()
    return [dict(out[u], uid=u) for u in uids], rec


def top2_margin(logprobs):
    a, b = np.sort(logprobs)[-2:][::-1]
    return float(a - b)


def _rotated_units(codec, raw):
    """Rotated unit vectors of ``raw`` ``[H, T, D]``, computed as the codec's encode does."""
    x = mx.array(raw)
    norms = mx.sqrt((x * x).sum(axis=-1, keepdims=True))
    return np.array(codec.rotation.forward(x / mx.maximum(norms, 1e-30)))


def compare_codes(codec, stored_alone, stored_batched, raw_alone, raw_batched):
    """One part (keys or values) of one layer: ``stored_*`` = (packed, norms) of the first
    positions, ``raw_*`` = ``[H, T, D]`` what each run fed the layer there."""
    out = {}
    decoded, codes, scales = [], [], []
    for tag, (packed, norms), raw in (("alone", stored_alone, raw_alone),
                                      ("batched", stored_batched, raw_batched)):  # fmt: skip
        # Every stored code must be the encoding of what its own row fed the layer: a row,
        # offset or padding mistake of the batch cache would break this.
        re_packed, re_norms = codec.encode(mx.array(raw)[None])
        out[f"exact_{tag}"] = bool(mx.array_equal(re_packed, packed).item()
                                   and mx.array_equal(re_norms, norms).item())  # fmt: skip
        codes.append(np.array(codec.codes(packed)[0]).astype(np.int64))
        scales.append(np.maximum(np.array(norms[0].astype(mx.float32)), 1e-30))
        decoded.append(np.array(codec.decode_rotated(packed, norms)[0]))
    flipped = codes[0] != codes[1]
    steps = np.abs(codes[0] - codes[1])
    centroids, boundaries = np.array(codec.centroids), np.array(codec.boundaries)
    y_a, y_b = _rotated_units(codec, raw_alone), _rotated_units(codec, raw_batched)
    # The boundary the alone coordinate lies nearest to, on the batched side.
    edge = boundaries[np.clip(np.minimum(codes[0], codes[1]), 0, len(boundaries) - 1)]
    out.update(
        codes=int(codes[0].size),
        flipped=int(flipped.sum()),
        index_step_max=int(steps.max()),
        flip_positions=sorted({int(t) for t in np.nonzero(flipped)[1]}),
        flip_boundary_distance=float(np.abs(y_a - edge)[flipped].max()) if flipped.any() else 0.0,
        rotated_maxdiff=float(np.abs(y_a - y_b).max()),
        norm_rel_maxdiff=float((np.abs(scales[0] - scales[1]) / scales[0]).max()),
        # |decoded alone - decoded batched| / norm, in units of the codebook's widest step
        decoded_maxdiff_steps=float((np.abs(decoded[0] - decoded[1]) / scales[0][..., None]).max()
                                    / np.diff(centroids).max()),
    )  # fmt: skip
    return out


def compare_layer(c_alone, c_batch, raw_alone, raw_batch, n):
    """One layer, alone vs batched, over the first ``n`` positions."""
    from mlx_lm_turboquant.cache import TurboQuantKVCache

    row = dict(
        raw_key_maxdiff=float(np.abs(raw_alone[0] - raw_batch[0]).max()),
        raw_value_maxdiff=float(np.abs(raw_alone[1] - raw_batch[1]).max()),
        raw_key_maxabs=float(np.abs(raw_alone[0]).max()),
        raw_value_maxabs=float(np.abs(raw_alone[1]).max()),
    )
    if not isinstance(c_alone, TurboQuantKVCache):
        for part in ("keys", "values"):
            a, b = (np.array(getattr(c, part)[0, :, :n].astype(mx.float32))
                    for c in (c_alone, c_batch))  # fmt: skip
            row[f"stored_{part}_maxdiff"] = float(np.abs(a - b).max())
        return dict(row, kind="fp16")
    row["kind"] = c_alone.scheme.name
    for part, idx in (("key", 0), ("value", 1)):
        codec = c_alone.key_codec if part == "key" else c_alone.value_codec
        stored = [(getattr(c, part + "s")[:, :, :n], getattr(c, part + "_norms")[:, :, :n])
                  for c in (c_alone, c_batch)]  # fmt: skip
        parts = compare_codes(codec, *stored, raw_alone[idx], raw_batch[idx])
        row.update({f"{part}_{k}": v for k, v in parts.items()})
    return row


def compare_runs(alone, rec_alone, batched, rec_batched, prompt_tokens, n_layers):
    """One prompt: its alone run against its row of the batched run."""
    a, b = alone, batched
    steps = min(len(a["tokens"]), len(b["tokens"]))
    first = next((s for s in range(steps) if a["tokens"][s] != b["tokens"][s]), None)
    common = steps if first is None else first + 1  # log-probabilities comparable up to here
    out = dict(
        tokens_alone=a["tokens"], tokens_batched=b["tokens"], first_diff_step=first,
        margin_alone=[top2_margin(x) for x in a["logprobs"][:common]],
        margin_batched=[top2_margin(x) for x in b["logprobs"][:common]],
        logprob_maxdiff=[float(np.abs(x - y).max())
                         for x, y in zip(a["logprobs"][:common], b["logprobs"][:common])],
    )  # fmt: skip
    # Positions both runs fed the same tokens: the prompt, then the generated tokens before
    # the first different one.
    n = prompt_tokens + (first if first is not None else steps - 1)
    layers = []
    for layer in range(n_layers):
        raw_a = rec_alone.fed(a["uid"], layer, n)
        raw_b = rec_batched.fed(b["uid"], layer, n)
        row = compare_layer(a["cache"][layer], b["cache"][layer], raw_a, raw_b, n)
        for key, store in (("attn", "attn"), ("attn_f32", "attn32")):
            out_a = rec_alone.attention(a["uid"], layer, n, getattr(rec_alone, store))
            out_b = rec_batched.attention(b["uid"], layer, n, getattr(rec_batched, store))
            if out_a is not None:
                row[f"{key}_maxdiff"] = float(np.abs(out_a - out_b).max())
                row[f"{key}_maxabs"] = float(np.abs(out_a).max())
        layers.append(dict(layer=layer, **row))
    return dict(out, positions_compared=n, layers=layers)


def diagnose(model, tokenizer, args):
    ids = [tokenizer.encode(p) for p in PROMPTS]
    report = dict(model=str(args.model), dtype=args.dtype, scheme=args.scheme,
                  layers=args.layers, max_tokens=args.max_tokens,
                  prefill_step_size=args.prefill_step_size,
                  prompt_tokens=[len(i) for i in ids], prompts=[])  # fmt: skip
    runs = {}
    for scheme in (args.scheme, None):
        t0 = time.perf_counter()
        alone = [run_generator(model, [p], scheme, args.layers, args.max_tokens,
                               args.prefill_step_size) for p in ids]  # fmt: skip
        batched = run_generator(model, ids, scheme, args.layers, args.max_tokens,
                                args.prefill_step_size)  # fmt: skip
        runs[scheme or "fp16"] = (alone, batched)
        print(f"{scheme or 'fp16'}: {len(ids)} prompts alone and batched in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip
    for i, p in enumerate(ids):
        entry = dict(index=i, prompt=PROMPTS[i][:40], prompt_tokens=len(p))
        for label, (alone, (batched, rec_b)) in runs.items():
            (a,), rec_a = alone[i]
            part = compare_runs(a, rec_a, batched[i], rec_b, len(p), len(model.layers))
            part.update(text_alone=tokenizer.decode(a["tokens"]),
                        text_batched=tokenizer.decode(batched[i]["tokens"]))  # fmt: skip
            entry[label] = part
        report["prompts"].append(entry)
    return report


def print_report(report, scheme):
    print(f"\nmodel {report['model']} ({report['dtype']}), {scheme} on layers "
          f"'{report['layers']}', prompt tokens {report['prompt_tokens']}")  # fmt: skip
    print("\n| prompt | scheme | first diff step | alone margin there (nats) | "
          "max |dlogprob| before it | tokens alone -> batched |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for e in report["prompts"]:
        for label in (scheme, "fp16"):
            r = e[label]
            s = r["first_diff_step"]
            margin = f"{r['margin_alone'][s]:.4f}" if s is not None else "-"
            before = r["logprob_maxdiff"][: s if s is not None else None]
            worst = f"{max(before):.2e}" if before else "-"
            change = (f"{r['tokens_alone'][s]} -> {r['tokens_batched'][s]}" if s is not None
                      else "same")  # fmt: skip
            print(f"| {e['index']} | {label} | {s if s is not None else '-'} | {margin} | "
                  f"{worst} | {change} |")  # fmt: skip
    for e in report["prompts"]:
        r = e[scheme]
        if r["first_diff_step"] is None:
            continue
        print(f"\nprompt {e['index']} ({e['prompt']!r}): {r['text_alone']!r} alone, "
              f"{r['text_batched']!r} batched; {r['positions_compared']} positions compared")
        print("| layer | raw K maxdiff | raw V maxdiff | K flips | V flips | max index step | "
              "flip dist. to boundary | decoded diff / widest step | codes = enc(own input) | "
              "attn out maxdiff | same, float32 |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for row in r["layers"]:
            attn = f"{row['attn_maxdiff']:.2e} | {row.get('attn_f32_maxdiff', float('nan')):.2e}"
            if row["kind"] == "fp16":
                print(f"| {row['layer']} | {row['raw_key_maxdiff']:.2e} | "
                      f"{row['raw_value_maxdiff']:.2e} | fp16 | fp16 | - | - | - | - | {attn} |")
                continue
            index_step = max(row["key_index_step_max"], row["value_index_step_max"])
            dist = max(row["key_flip_boundary_distance"], row["value_flip_boundary_distance"])
            steps = max(row["key_decoded_maxdiff_steps"], row["value_decoded_maxdiff_steps"])
            exact = all(row[f"{p}_exact_{w}"] for p in ("key", "value")
                        for w in ("alone", "batched"))  # fmt: skip
            print(f"| {row['layer']} | {row['raw_key_maxdiff']:.2e} | "
                  f"{row['raw_value_maxdiff']:.2e} | {row['key_flipped']}/{row['key_codes']} | "
                  f"{row['value_flipped']}/{row['value_codes']} | {index_step} | {dist:.1e} | "
                  f"{steps:.2f} | {exact} | {attn} |")  # fmt: skip
        f = e["fp16"]
        n = min(len(f["logprob_maxdiff"]), len(r["logprob_maxdiff"]))
        print("| step | margin alone | max |dlogprob| " + scheme + " | max |dlogprob| fp16 |")
        print("|---|---|---|---|")
        for s in range(len(r["logprob_maxdiff"])):
            fp = f"{f['logprob_maxdiff'][s]:.2e}" if s < n else "-"
            print(f"| {s} | {r['margin_alone'][s]:.4f} | {r['logprob_maxdiff'][s]:.2e} | {fp} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--scheme", default="turbo4")
    p.add_argument("--layers", default="all", help="--kv-layers spec (default: all)")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32", "bfloat16"),
                   help="model dtype (float16: as mlx_lm.server loads tq-llama-8k)")
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--prefill-step-size", type=int, default=2048)
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    from mlx_lm import load

    import mlx_lm_turboquant

    mlx_lm_turboquant.activate()
    model, tokenizer = load(str(args.model))
    model.set_dtype(getattr(mx, args.dtype))
    report = diagnose(model, tokenizer, args)
    print_report(report, args.scheme)
    out = args.out or ROOT / "benchmarks" / "results" / (
        f"batch_divergence_{args.scheme}_{args.layers.replace('!', 'not').replace(':', '_')}"
        f"_{args.dtype}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
