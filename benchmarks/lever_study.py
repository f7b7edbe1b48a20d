"""Quality levers of issue 6, measured before any of them is built into the library.

Each lever runs on a *simulated* cache: keys and values go through the library's codecs
(rotation, Lloyd-Max codes, fp16 norms) and are stored decoded, so mlx's own attention
reads exactly the numbers that attention on the packed cache would score against. That
is ~10x faster on the CPU than the packed path; `--check` runs both on one window to show
they agree. Bytes are counted analytically from the formats as the library stores them
(norms included, fp16 at 2 bytes per element, a window's tokens packed and also fp16).

    python benchmarks/lever_study.py --sets all --out docs/results/levers/levers.json

Levers: per-layer schemes (boundary layers, key vs value bits, bit allocation), one
rotation shared by all layers, an fp16 window of the most recent W tokens, per-channel
key scaling (keys times s, queries divided by s: scores unchanged, quantization error
moved off the channels that matter); and (sets outside ``all``) keys and values centred on
the prefill's per-channel mean, the first tokens kept in fp16 (attention sinks), one window
length per layer, and keys centred on their mean in RoPE's frame (centre "r", the library's
``c`` schemes: sets ``rope_centre`` and ``rope_centre_long``).
"""

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlx_lm_turboquant.cache import layer_seed  # noqa: E402
from mlx_lm_turboquant.codec import get_codec, packed_words  # noqa: E402
from mlx_lm_turboquant.codec.centring import key_mean, mean_keys, probe_rope  # noqa: E402
from mlx_lm_turboquant.eval.kld import step_logprobs as library_step_logprobs  # noqa: E402

BITS = (0, 2, 3, 4, 8)  # 0 = fp16
TQ_LLAMA_ROPE = probe_rope(nn.RoPE(128, base=10000.0), 128)  # tq-llama-8k's RoPE
_NAME = re.compile(r"^turbo(\d+)(?:v(\d+))?$")


def parse_layer(name):
    """'turbo4' -> (4, 4); 'turbo8v4' -> (8, 4); 'fp16' -> (0, 0); 'turbo4v0': fp16 values."""
    if name == "fp16":
        return 0, 0
    m = _NAME.match(name)
    if m is None:
        raise ValueError(f"layer scheme {name!r}: use fp16, turboB or turboKvV, bits in {BITS}")
    k = int(m.group(1))
    v = k if m.group(2) is None else int(m.group(2))
    if k not in BITS or v not in BITS:
        raise ValueError(f"layer scheme {name!r}: bits must be in {BITS}")
    return k, v


def vector_bytes(dim, bits):
    return 2 * dim if bits == 0 else 4 * packed_words(dim, bits) + 2


@dataclass
class Config:
    name: str
    layers: list  # one scheme name per attention layer
    window: object = 0  # most recent tokens kept in fp16 (or one count per layer)
    scale: str = "none"  # key channel scaling: none, k (keys of the prefill), qk (calibrated)
    scale_power: float = 1.0  # s ** power (0.5 = half way)
    shared_rotation: bool = False
    norm_correction: bool = True
    sink: int = 0  # first tokens kept in fp16 (attention-sink tokens)
    center: str = ""  # "k", "v" or "kv": subtract the prefill's per-channel mean first;
    # "r": keys less their prefill mean taken in RoPE's frame (codec.centring), as `c` schemes
    extra: dict = field(default_factory=dict)

    def bytes_ratio(self, tokens, n_kv_heads=2, dim=128):
        """All layers' KV bytes over the fp16 cache's, for a cache of ``tokens`` tokens."""
        fp16 = 2 * vector_bytes(dim, 0)
        total = 0.0
        windows = self.window if isinstance(self.window, list) else [self.window] * len(self.layers)
        for name, window in zip(self.layers, windows):
            k, v = parse_layer(name)
            per = vector_bytes(dim, k) + vector_bytes(dim, v)
            # As the library stores it: every token packed, the window's tokens also fp16.
            raw = min(window + self.sink, tokens)
            total += (tokens * per + raw * fp16) / (tokens * fp16)
        return total / len(self.layers)


class SimCache(KVCache):
    """A KVCache holding decoded TurboQuant data (see the module docstring)."""

    def __init__(self, cfg: Config, layer, calib=None):
        super().__init__()
        self.kb, self.vb = parse_layer(cfg.layers[layer])
        self.cfg, self.layer, self.calib = cfg, layer, calib
        self.window = cfg.window[layer] if isinstance(cfg.window, list) else cfg.window
        self.raw = KVCache() if self.window else None
        self.s = None  # [H, 1, D] key scale
        self.means = {}  # kind -> [B, H, 1, D] mean of the first chunk (the prefill)

    def codec(self, dim, bits, kind):
        seed = layer_seed(0, 0 if self.cfg.shared_rotation else self.layer, kind)
        return get_codec(dim, bits, seed, self.cfg.norm_correction)

    def roundtrip(self, x, bits, kind):
        if bits == 0:
            return x
        c = self.codec(x.shape[-1], bits, kind)
        if kind == 0 and "r" in self.cfg.center:  # what the library's `c` schemes store
            if "r" not in self.means:
                self.means["r"] = key_mean(x, TQ_LLAMA_ROPE, self.offset)
            shift = mean_keys(self.means["r"], TQ_LLAMA_ROPE, self.offset, x.shape[2])
            return (c.decode(*c.encode(x - shift)) + shift).astype(x.dtype)
        if "kv"[kind] not in self.cfg.center:
            return c.decode(*c.encode(x)).astype(x.dtype)
        if kind not in self.means:
            self.means[kind] = x.astype(mx.float32).mean(axis=2, keepdims=True)
        mu = self.means[kind]
        return (c.decode(*c.encode(x - mu)) + mu).astype(x.dtype)

    def key_scale(self, keys):
        mode = self.cfg.scale
        if mode == "k":  # keys-only rule from the first chunk (the prefill)
            rms_k = mx.sqrt((keys[0].astype(mx.float32) ** 2).mean(axis=1, keepdims=True))
            s2 = 1.0 / mx.maximum(rms_k, 1e-6)
        elif mode == "qk":  # s^2 = rms(q) / rms(k) from a calibration window
            rms_q, rms_k = self.calib[self.layer]
            s2 = mx.array(rms_q / np.maximum(rms_k, 1e-6))[:, None, :]
        else:
            raise ValueError(f"unknown key scale mode {mode!r}")
        s = mx.sqrt(s2) ** self.cfg.scale_power
        return s / mx.sqrt((s * s).mean(axis=-1, keepdims=True))

    def update_and_fetch(self, keys, values):
        if self.kb and self.cfg.scale != "none":
            if self.s is None:
                self.s = self.key_scale(keys)
            kq = self.roundtrip(keys * self.s, self.kb, 0) / self.s
        else:
            kq = self.roundtrip(keys, self.kb, 0)
        vq = self.roundtrip(values, self.vb, 1)
        if self.offset < self.cfg.sink:  # the first tokens stay exact
            n = min(self.cfg.sink - self.offset, keys.shape[2])
            kq = mx.concatenate([keys[:, :, :n], kq[:, :, n:]], axis=2)
            vq = mx.concatenate([values[:, :, :n], vq[:, :, n:]], axis=2)
        K, V = super().update_and_fetch(kq, vq)
        if self.raw is None:
            return K, V
        Kr, Vr = self.raw.update_and_fetch(keys, values)
        cut = max(0, self.offset - self.window)
        return (mx.concatenate([K[:, :, :cut], Kr[:, :, cut:]], axis=2),
                mx.concatenate([V[:, :, :cut], Vr[:, :, cut:]], axis=2))  # fmt: skip


def calibrate(model, ids, tokens=1024):
    """Per layer ``(rms_q [H_kv, D], rms_k [H_kv, D])`` of post-RoPE queries and keys over
    ``tokens`` tokens (queries of a KV head's group pooled)."""
    import mlx_lm.models.llama as llama

    seen = {}
    original = llama.scaled_dot_product_attention

    def record(queries, keys, values, cache, scale, mask, sinks=None):
        B, Hq, L, D = queries.shape
        Hk = keys.shape[1]
        q = queries.astype(mx.float32).reshape(Hk, Hq // Hk * L, D)
        seen[cache.layer] = (np.sqrt(np.array((q * q).mean(axis=1))),
                             np.sqrt(np.array((keys[0].astype(mx.float32) ** 2).mean(axis=1))))
        return original(queries, keys, values, cache, scale, mask, sinks)  # fmt: skip

    class Tagged(KVCache):
        def __init__(self, i):
            super().__init__()
            self.layer = i

    llama.scaled_dot_product_attention = record
    try:
        model(mx.array(ids[None, :tokens]), cache=[Tagged(i) for i in range(len(model.layers))])
    finally:
        llama.scaled_dot_product_attention = original
    return [seen[i] for i in range(len(model.layers))]


def predicted_gain(calib):
    """Per layer: score-error variance with the optimal s over without, from the rms."""
    out = []
    for rq, rk in calib:
        num = (rq * rk).sum(-1) ** 2
        den = (rq**2).sum(-1) * (rk**2).sum(-1)
        out.append(float((num / den).mean()))
    return out


N = 6
T4, T3 = ["turbo4"] * N, ["turbo3"] * N


def per_layer(base, **changes):
    layers = list(base)
    for i, s in changes.items():
        layers[int(i.lstrip("_"))] = s
    return layers


def configs(sets):
    c = {}
    c["base"] = [
        Config("turbo4@all", T4),
        Config("turbo3@all", T3),
        Config("turbo4@!-1", per_layer(T4, _5="fp16")),
    ]
    c["boundary"] = [
        Config("turbo4, last turbo8v4", per_layer(T4, _5="turbo8v4")),
        Config("turbo4, last turbo8v8", per_layer(T4, _5="turbo8v8")),
        Config("turbo4, last turbo4v8", per_layer(T4, _5="turbo4v8")),
        Config("turbo4, last turbo0v4", per_layer(T4, _5="turbo0v4")),
        Config("turbo4, last 2 turbo8v4", per_layer(T4, _4="turbo8v4", _5="turbo8v4")),
        Config("turbo4, first+last turbo8v4", per_layer(T4, _0="turbo8v4", _5="turbo8v4")),
        Config("turbo4, last turbo8v8, 4 turbo8v4", per_layer(T4, _4="turbo8v4", _5="turbo8v8")),
        Config("turbo3, last turbo8v4", per_layer(T3, _5="turbo8v4")),
        Config("turbo3, last turbo4", per_layer(T3, _5="turbo4")),
        Config("turbo3, last 2 turbo4", per_layer(T3, _4="turbo4", _5="turbo4")),
    ]
    c["kv"] = [
        Config(f"{s}@all", [s] * N)
        for s in ("turbo8v3", "turbo4v3", "turbo3v4", "turbo2v4", "turbo4v2", "turbo8v2",
                  "turbo3v2", "turbo2v3", "turbo8v4", "turbo4v8")
    ]  # fmt: skip
    c["rotation"] = [
        Config("turbo4@all shared rotation", T4, shared_rotation=True),
        Config("turbo3@all shared rotation", T3, shared_rotation=True),
    ]
    c["window"] = [Config(f"turbo4@all window {w}", T4, window=w) for w in (16, 32, 64, 128)] + [
        Config(f"turbo3@all window {w}", T3, window=w) for w in (32, 128)
    ]
    c["scale"] = [
        Config("turbo4@all key scale k", T4, scale="k"),
        Config("turbo4@all key scale k^0.5", T4, scale="k", scale_power=0.5),
        Config("turbo4@all key scale qk", T4, scale="qk"),
        Config("turbo4@all key scale qk^0.5", T4, scale="qk", scale_power=0.5),
        Config("turbo3@all key scale k", T3, scale="k"),
        Config("turbo3@all key scale qk", T3, scale="qk"),
    ]
    # Per-layer plans that eval calibrate's allocation picks from the one-layer KLs of
    # calibration windows (ids 200000 and 230000) at 0.21x and 0.28x of fp16.
    mixed21 = ["turbo2", "turbo4v3", "turbo4v3", "turbo4v3", "turbo3", "turbo4v3"]
    mixed21b = ["turbo3", "turbo3", "turbo4v3", "turbo3", "turbo3", "turbo4v3"]
    default4, default3 = per_layer(T4, _5="turbo8v4"), per_layer(T3, _5="turbo8v4")
    c["combo"] = [
        Config("mixed <= 0.21x (best)", mixed21),
        Config("mixed <= 0.21x (3rd best, no turbo2)", mixed21b),
        Config("turbo3 window 16", T3, window=16),
        Config("turbo4 window 16, last turbo8v4", default4, window=16),
        Config("turbo4 window 8", T4, window=8),
        Config("turbo3 window 64", T3, window=64),
    ]
    c["long"] = [
        Config("turbo4@all", T4),
        Config("turbo4, last turbo8v4", default4),
        Config("turbo4@!-1", per_layer(T4, _5="fp16")),
        Config("turbo4 window 16", T4, window=16),
        Config("turbo4 window 32", T4, window=32),
        Config("turbo4 window 32, last turbo8v4", default4, window=32),
        Config("turbo4 window 128, last turbo8v4", default4, window=128),
        Config("turbo3@all", T3),
        Config("turbo3, last turbo8v4", default3),
        Config("turbo3 window 64", T3, window=64),
        Config("turbo3 window 128", T3, window=128),
        Config("mixed <= 0.21x (best)", mixed21),
        Config("mixed <= 0.21x (best), window 32", mixed21, window=32),
    ]
    # Candidates for the turbo4 target at 4096 tokens (<= 0.28x with its window).
    c["long2"] = [
        Config("turbo4 window 64", T4, window=64),
        Config("turbo4, 0 turbo4v3, last turbo8v4, window 32",
               per_layer(T4, _0="turbo4v3", _5="turbo8v4"), window=32),  # fmt: skip
        Config("turbo4, 0 turbo4v3, last turbo8v4, window 16",
               per_layer(T4, _0="turbo4v3", _5="turbo8v4"), window=16),  # fmt: skip
    ]
    c["long3"] = c["long2"][2:]
    c["long4"] = [  # turbo3-class at 4096 within 0.21x with a window
        Config("mixed <= 0.21x (best), window 16", mixed21, window=16),
        Config("mixed <= 0.21x (3rd best), window 16", mixed21b, window=16),
    ]
    # Session 7 (evaluation.md, section (f)); "all" keeps meaning the sets above.
    later = {}
    later["center"] = [
        Config(f"{base} centered {what}", layers, center=what)
        for base, layers in (("turbo3@all", T3), ("turbo4@all", T4))
        for what in ("", "k", "v", "kv")
    ] + [
        Config(f"{name}{', centered kv' if k else ''}", layers, window=w, center=k)
        for name, layers, w in (
            ("turbo3 window 16, last turbo8v4", default3, 16),
            ("turbo3v2 window 8, last turbo8v4", per_layer(["turbo3v2"] * N, _5="turbo8v4"), 8),
        )
        for k in ("", "kv")
    ]
    later["center21"] = [
        Config(f"turbo3@all window {w}{' centered kv' if k else ''}", T3, window=w, center=k)
        for w in (8, 16) for k in ("", "kv")
    ] + [
        Config("mixed <= 0.21x (3rd best) centered kv", mixed21b, center="kv"),
        Config("turbo3@all window 16 centered k", T3, window=16, center="k"),
    ]
    later["center4"] = [
        Config(f"{name}{f' centered {k}' if k else ''}", layers, center=k)
        for name, layers in (("turbo4@all", T4), ("turbo4, last turbo8v4", default4))
        for k in ("", "k", "kv")
    ]
    later["center_long"] = [
        Config(f"{name}{f' centered {k}' if k else ''}", layers, center=k, window=w)
        for name, layers, w in (("turbo4, last turbo8v4", default4, 0),
                                ("turbo3, window 16", T3, 16))
        for k in ("", "k")
    ]
    later["sink"] = [
        Config(f"{name}{f' sink {k}' if k else ''}", layers, window=w, sink=k)
        for name, layers, w in (("turbo3@all", T3, 0), ("turbo3@all window 16", T3, 16),
                                ("turbo4@all", T4, 0))
        for k in (0, 1, 4)
    ]
    later["layer_windows"] = [
        Config(f"turbo3@all windows {w}{' centered kv' if k else ''}", T3, window=w, center=k)
        for w in ([0, 8, 16, 0, 0, 64], [0, 0, 0, 0, 0, 96], [4, 8, 16, 8, 8, 48])
        for k in ("", "kv")
    ]
    # Session 11 (evaluation.md, lever (g)): keys centred in RoPE's frame.
    t3_last43 = per_layer(T3, _5="turbo4v3")
    later["rope_centre"] = [
        Config(f"{name}{f' window {w}' if w else ''}{' rope-centred' if r else ''}", layers,
               window=w, center=r)
        for name, layers, w in (("turbo3@all", T3, 0), ("turbo4@all", T4, 0),
                                ("turbo4, last turbo8v4", default4, 0),
                                ("turbo3, last turbo4", per_layer(T3, _5="turbo4"), 4),
                                ("turbo3, last turbo4v3", t3_last43, 8),
                                ("turbo3, last turbo4v3", t3_last43, 9))
        for r in ("", "r")
    ] + [Config(f"{n}@all{' rope-centred' if r else ''}", [n] * N, center=r)
         for n in ("turbo3v0", "turbo0v3", "turbo2") for r in ("", "r")]
    later["rope_centre_long"] = [
        Config(f"{name}{f' window {w}' if w else ''}{' rope-centred' if r else ''}", layers,
               window=w, center=r)
        for name, layers, w in (("turbo4, last turbo8v4", default4, 0),
                                ("turbo3, last turbo4v3", t3_last43, 8),
                                ("turbo3, last turbo4v3", t3_last43, 16))
        for r in ("", "r")
    ]
    chosen = []
    for s in sets:
        if s == "all":
            return [x for v in c.values() for x in v]
        if s not in c and s not in later:
            raise ValueError(f"unknown set {s!r}; allowed: all, {', '.join([*c, *later])}")
        chosen += c[s] if s in c else later[s]
    return chosen


def step_logprobs(model, ids, cache, prefill, steps):
    """The library's teacher-forced loop, the whole prefill in one call as the study ran it."""
    return library_step_logprobs(model, ids, cache, prefill, steps, prefill_step=prefill)


def score(ref, lp, ids, prefill, steps):
    kl = np.array((mx.exp(ref) * (ref - lp)).sum(axis=-1))
    top1 = np.array(ref.argmax(-1) == lp.argmax(-1))
    return kl, top1


def run_config(model, cfg, windows, calib, prefill, steps):
    kls, tops = [], []
    for ids, ref in windows:
        cache = [SimCache(cfg, i, calib) for i in range(len(model.layers))]
        kl, top1 = score(ref, step_logprobs(model, ids, cache, prefill, steps), ids, prefill, steps)
        kls.append(kl)
        tops.append(top1)
    kl_all = np.concatenate(kls)
    ratio = cfg.bytes_ratio(prefill + steps)
    return {
        "config": cfg.name,
        "layers": cfg.layers,
        "window": cfg.window,
        "scale": cfg.scale,
        "center": cfg.center,
        "scale_power": cfg.scale_power,
        "shared_rotation": cfg.shared_rotation,
        "prefill": prefill,
        "steps": steps,
        "kl_mean": float(kl_all.mean()),
        "kl_median": float(np.median(kl_all)),
        "kl_p99": float(np.percentile(kl_all, 99)),
        "kl_windows": [float(k.mean()) for k in kls],
        "top1": float(np.concatenate(tops).mean()),
        "bytes_ratio": ratio,
        "bits_per_coord": 16 * ratio,
    }


def table(rows):
    lines = ["| config | mean KL | median KL | p99 KL | top-1 | bytes vs fp16 | bits/coord |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['kl_mean']:.4f} | {r['kl_median']:.4f} | {r['kl_p99']:.3f} "
            f"| {100 * r['top1']:.1f}% | {r['bytes_ratio']:.3f}x | {r['bits_per_coord']:.2f} |"
        )
    return "\n".join(lines)


def check(model, ids, prefill, steps):
    """The simulation against the packed cache on one window, turbo4 on every layer."""
    import mlx_lm_turboquant as tq
    from mlx_lm_turboquant.eval.kld import reference_run, teacher_forced_kl

    tq.activate()
    ref = reference_run(model, ids, prefill, steps)
    packed = teacher_forced_kl(model, ids, "turbo4", "all", prefill, steps, reference=ref)
    cfg = Config("turbo4@all", T4)
    kl, _ = score(ref[0], step_logprobs(model, ids, [SimCache(cfg, i) for i in range(N)],
                                        prefill, steps), ids, prefill, steps)  # fmt: skip
    print(f"packed cache KL {packed.kl_mean:.5f}, simulated {kl.mean():.5f}")


FORMATS = ("turbo2", "turbo3v2", "turbo2v3", "turbo3", "turbo4v3", "turbo3v4", "turbo4", "turbo8v3",
           "turbo8v4")  # fmt: skip


def sensitivity(model, windows, calib, prefill, steps, formats=FORMATS):
    """KL with one layer compressed at a time, ``{format: [KL per layer]}``."""
    out = {}
    for f in formats:
        out[f] = []
        for layer in range(N):
            cfg = Config(f"{f}@{layer}", per_layer(["fp16"] * N, **{f"_{layer}": f}))
            out[f].append(run_config(model, cfg, windows, calib, prefill, steps)["kl_mean"])
        print(f, " ".join(f"{k:.5f}" for k in out[f]), flush=True)
    return out


def allocate(sens, budget, tokens=1024, top=1):
    """The per-layer formats of least summed single-layer KL within ``budget`` (bytes vs
    fp16), by exhaustive search (layers' KL add up closely: see docs/evaluation.md)."""
    import itertools

    formats = list(sens)
    cost = {f: Config(f, [f]).bytes_ratio(tokens) for f in formats}
    best = []
    for combo in itertools.product(formats, repeat=N):
        b = sum(cost[f] for f in combo) / N
        if b <= budget + 1e-9:
            best.append((sum(sens[f][i] for i, f in enumerate(combo)), b, combo))
    best.sort()
    return best[:top]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", default="all", help="comma list: all, base, boundary, kv, ...")
    p.add_argument("--model", default=str(ROOT.parent / "shared/models/tq-llama-8k"))
    p.add_argument("--ids", default=str(ROOT.parent / "shared/data/tq-llama-val-ids.npy"))
    p.add_argument("--offsets", default="0,50000,100000,150000", help="window starts in the ids")
    p.add_argument("--calib-offset", type=int, default=200000, help="calibration window start")
    p.add_argument("--prefill", type=int, default=768)
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--check", action="store_true", help="compare with the packed cache and exit")
    p.add_argument("--out", default=None, help="JSON file to write")
    p.add_argument("--sensitivity", default=None,
                   help="measure one-layer-at-a-time KL per format on --offsets, write this JSON")
    p.add_argument("--plans", default=None,
                   help="sensitivity JSON: evaluate the best allocations at --budgets")
    p.add_argument("--formats", default=",".join(FORMATS), help="formats for --sensitivity")
    p.add_argument("--budgets", default="0.21,0.28", help="bytes vs fp16 for --plans")
    args = p.parse_args()

    from mlx_lm import load

    model, _ = load(args.model)
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)
    ids = np.load(args.ids)
    if args.check:
        return check(model, ids, args.prefill, args.steps)
    calib = calibrate(model, ids[args.calib_offset :])
    print("predicted score-error factor with optimal qk scale, per layer:",
          " ".join(f"{g:.3f}" for g in predicted_gain(calib)), flush=True)  # fmt: skip
    windows = []
    for o in (int(x) for x in args.offsets.split(",")):
        w = ids[o : o + args.prefill + args.steps + 1]
        ref = step_logprobs(model, w, [KVCache() for _ in model.layers], args.prefill, args.steps)
        windows.append((w, ref))
    if args.sensitivity:
        sens = sensitivity(model, windows, calib, args.prefill, args.steps, args.formats.split(","))
        Path(args.sensitivity).write_text(json.dumps({"args": vars(args), "kl": sens}, indent=1))
        return
    rows = []
    cfgs = configs(args.sets.split(","))
    if args.plans:
        sens = json.loads(Path(args.plans).read_text())["kl"]
        cfgs = []
        for b in (float(x) for x in args.budgets.split(",")):
            for kl, ratio, combo in allocate(sens, b, args.prefill + args.steps, top=2):
                print(f"budget {b}: predicted KL {kl:.4f} at {ratio:.3f}x: {','.join(combo)}")
                cfgs.append(Config(f"mixed <= {b}x: " + ",".join(combo), list(combo)))
    for i, cfg in enumerate(cfgs):
        t = time.time()
        rows.append(run_config(model, cfg, windows, calib, args.prefill, args.steps))
        r = rows[-1]
        print(f"[{i + 1}/{len(cfgs)}] {cfg.name}: KL {r['kl_mean']:.4f} top-1 "
              f"{100 * r['top1']:.1f}% {r['bytes_ratio']:.3f}x ({time.time() - t:.0f}s)", flush=True)  # fmt: skip
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
