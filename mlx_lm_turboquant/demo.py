"""Generate through a TurboQuant-compressed KV cache and compare with the plain cache.

    python -m mlx_lm_turboquant.demo [--model PATH] [--kv-scheme turbo4] [--prompt TEXT]
"""

import argparse
import sys
from pathlib import Path

DEMO_MODEL = Path(__file__).resolve().parent.parent / "models" / "tq-llama-8k-4bit"
DEFAULT_PROMPT = "import os\n\n\ndef read_config(path):\n    "


def setup_arg_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEMO_MODEL), help="mlx-lm model path (default: the shipped demo model)")
    p.add_argument("--kv-scheme", default="turbo4", help="TurboQuant scheme, e.g. turbo4, turbo3, turbo0v4")
    p.add_argument("--kv-layers", default=None, help="layers to compress, e.g. 'all', '1:-1' (default $MLX_TQ_LAYERS or all)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-tokens", type=int, default=96)
    return p


def _run(model, tokenizer, prompt, cache, max_tokens):
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    text, last = "", None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens,
                                sampler=make_sampler(temp=0.0), prompt_cache=cache):  # fmt: skip
        text += last.text
    return text, last.generation_tps


def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    if not Path(args.model).exists():
        raise SystemExit(f"model not found: {args.model!r} (pass --model PATH to an mlx-lm model)")
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache as plain_cache

    import mlx_lm_turboquant as tq
    from mlx_lm_turboquant.eval.kld import kv_bytes

    tq.activate()
    scheme = tq.parse_scheme(args.kv_scheme)
    model, tokenizer = load(args.model)
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)  # mlx's CPU backend is far faster in float32 than fp16

    cache = tq.make_prompt_cache(model, scheme, layers=args.kv_layers)
    compressed = [i for i, c in enumerate(cache) if isinstance(c, tq.TurboQuantKVCache)]
    print(f"model: {args.model}\nscheme: {scheme.name} (keys {scheme.key_bits or 16} bits, "
          f"values {scheme.value_bits} bits), compressed layers: {compressed} of {len(cache)}")  # fmt: skip
    print("-" * 60)
    sys.stdout.write(args.prompt)
    text, tps = _run(model, tokenizer, args.prompt, cache, args.max_tokens)
    print(text)
    print("-" * 60)
    ref_cache = plain_cache(model)
    ref_text, ref_tps = _run(model, tokenizer, args.prompt, ref_cache, args.max_tokens)
    same = _common_prefix(text, ref_text)
    print(f"{'cache':>10} {'KV bytes':>10} {'vs fp16':>8} {'tok/s':>8}")
    print(f"{'fp16':>10} {kv_bytes(ref_cache):>10,} {1.0:>8.3f} {ref_tps:>8.1f}")
    ratio = kv_bytes(cache) / max(1, kv_bytes(ref_cache))
    print(f"{scheme.name:>10} {kv_bytes(cache):>10,} {ratio:>8.3f} {tps:>8.1f}")
    print(f"greedy text identical to the fp16 cache's for the first {same} of {len(ref_text)} characters")


def _common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


if __name__ == "__main__":
    main()
