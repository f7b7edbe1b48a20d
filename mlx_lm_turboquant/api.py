"""Python API: ``make_prompt_cache`` and ``schemes``."""

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional

from mlx_lm.models import cache as mlx_cache

from .cache import TurboQuantKVCache
from .codec.centring import probe_rope
from .config import (KVScheme, layer_spec_in_force, parse_layer_plan, parse_scheme,
                     with_centring, with_window)  # fmt: skip
from .rotating_cache import RotatingTurboQuantKVCache

# Chosen from the lever study in docs/evaluation.md: on tq-llama-8k the last attention
# layer carries about a third of turbo4's KL divergence. Giving it 8-bit keys and at
# least 4-bit values (turbo8v4 for turbo4) recovers nearly all of what keeping it fp16
# does (KL 0.0046 vs 0.0042) at a quarter of its bytes (0.279x vs 0.382x on 6 layers);
# protecting the first layer or a second one bought little. Models with fewer than
# MIN_LAYERS_TO_PROTECT attention layers get every layer the plain scheme.
MIN_LAYERS_TO_PROTECT = 4


def boundary_scheme(scheme: KVScheme) -> KVScheme:
    """The last attention layer's format under ``scheme``: 8-bit keys (fp16 keys stay
    fp16) and values of at least 4 bits, with the scheme's window and centring."""
    k = 0 if scheme.key_bits == 0 else max(scheme.key_bits, 8)
    v = max(scheme.value_bits, 4)
    if (k, v) == (scheme.key_bits, scheme.value_bits):
        return scheme
    name = f"turbo{k}v{v}" if k != v else f"turbo{k}"
    boundary = with_centring(with_window(parse_scheme(name), scheme.window), scheme.centre_keys)
    return replace(boundary, norm_correction=scheme.norm_correction, seed=scheme.seed)


def default_layer_spec(n_attention_layers: int, scheme="turbo4") -> str:
    """``"-1=<boundary scheme>"`` (every layer compressed, the last at higher precision)
    for models with at least MIN_LAYERS_TO_PROTECT attention layers, else ``"all"``."""
    scheme = parse_scheme(scheme)
    boundary = boundary_scheme(scheme)
    if n_attention_layers < MIN_LAYERS_TO_PROTECT or boundary == scheme:
        return "all"
    return f"-1={boundary.name}"


# Models whose plain KVCache holds MLA latents or indexer keys rather than per-head
# K/V: compressing those with a per-head codec would be wrong.
LATENT_CACHE_MODELS = frozenset(
    "bailing_hybrid bailing_moe_v3 deepseek_v3 deepseek_v32 glm4_moe_lite kimi_k3 "
    "kimi_linear longcat_flash mistral4 minimax_m3_vl".split()
)
# Models that compute attention themselves instead of calling mlx-lm's dispatcher.
OWN_ATTENTION_MODELS = frozenset("gemma2 olmo plamo2 deepseek_v41".split())
# Models that call the dispatcher but first treat the cached keys as arrays.
ARRAY_KEY_MODELS = {
    "phi3small": "phi3small computes block-sparse attention itself on the cached keys",
    "plamo": "plamo repeats the cached keys per head (mx.tile) before attention",
}


def schemes() -> List[str]:
    """Names of the available KV schemes (built-in and registered by plugins)."""
    from .schemes import scheme_names

    return scheme_names()


def get_scheme(scheme):
    """A registered scheme by name, as ``SchemeInfo`` (scheme, default layers, ...)."""
    from .schemes import get_scheme as lookup

    return lookup(scheme)


def model_family(model) -> str:
    return type(model).__module__.rsplit(".", 1)[-1]


def _attention_families(model) -> List[str]:
    """Model families of the attention modules ``model`` is built from (wrappers such as
    kimi_k25 reuse deepseek_v3's attention)."""
    found = []
    if not callable(getattr(model, "named_modules", None)):  # not an nn.Module
        return found
    for _, m in model.named_modules():
        name = type(m).__name__
        if "Attention" in name or "Attn" in name:
            family = type(m).__module__.rsplit(".", 1)[-1]
            if family not in found:
                found.append(family)
    return found


def unsupported_reason(model) -> Optional[str]:
    """Why no layer of ``model`` can be compressed, or None."""
    family = model_family(model)
    for f in [family] + _attention_families(model):
        via = "" if f == family else f" (its attention is {f}'s)"
        if f in LATENT_CACHE_MODELS:
            return f"{family} caches MLA latents, not per-head keys and values{via}"
        if f in OWN_ATTENTION_MODELS:
            return f"{family} computes attention itself, bypassing mlx-lm's dispatcher{via}"
        if f in ARRAY_KEY_MODELS:
            return ARRAY_KEY_MODELS[f] + via
    return None


def eligible_layers(cache: list) -> List[int]:
    """Positions in ``cache`` that can be compressed: plain full-attention ``KVCache`` and
    sliding-window ``RotatingKVCache`` layers (exact types: subclasses such as
    ``ChunkedKVCache`` keep other semantics), in model order. A layer spec counts these."""
    return [i for i, c in enumerate(cache) if type(c) in _COMPRESSIBLE]


_COMPRESSIBLE = (mlx_cache.KVCache, mlx_cache.RotatingKVCache)


def compressed_twin(c, scheme, layer_index: int, rope_frame=None):
    """The TurboQuant cache standing in for mlx-lm's cache ``c`` (one of ``_COMPRESSIBLE``)."""
    if type(c) is mlx_cache.RotatingKVCache:
        return RotatingTurboQuantKVCache(scheme, layer_index, max_size=c.max_size, keep=c.keep)
    return TurboQuantKVCache(scheme, layer_index=layer_index, rope_frame=rope_frame)


def layer_rope_frame(model, cache: list, index: int):
    """``(RopeFrame, None)`` for the RoPE of the layer behind ``cache[index]``, or ``(None,
    why not)``. The cache must have one entry per ``model.layers`` entry (mlx-lm's layout),
    and the layer one module attribute named ``rope``."""
    layers = getattr(model, "layers", None)
    if layers is None or len(layers) != len(cache):
        return None, "the cache does not hold one entry per model layer"
    owners = [m for _, m in layers[index].named_modules() if callable(getattr(m, "rope", None))]
    if not owners:
        return None, "the layer has no rope module"
    try:
        return probe_rope(owners[0].rope, getattr(owners[0], "head_dim", None)), None
    except ValueError as e:
        return None, str(e)


@dataclass
class CachePlan:
    """What :func:`compress_cache` did to one model's cache, for the report.

    ``kept`` maps a reason to the cache positions left as the model made them;
    ``overrides`` maps cache positions to the scheme they got instead of ``scheme``;
    ``uncentred`` maps a reason to the positions whose keys a ``c`` scheme could not centre.
    """

    scheme: KVScheme
    n_layers: int
    layers_spec: Optional[str] = None
    compressed: List[int] = field(default_factory=list)
    kept: Dict[str, List[int]] = field(default_factory=dict)
    overrides: Dict[int, KVScheme] = field(default_factory=dict)
    uncentred: Dict[str, List[int]] = field(default_factory=dict)
    unsupported: Optional[str] = None


def compress_cache(model, cache: list, scheme, layers: Optional[str] = None) -> CachePlan:
    """Replace, in place, the chosen ``KVCache`` / ``RotatingKVCache`` entries of ``cache``
    by TurboQuant caches (``TurboQuantKVCache`` / ``RotatingTurboQuantKVCache``); returns
    what was done and why the other layers were kept.

    ``layers`` defaults to ``$MLX_TQ_LAYERS``, then the scheme's registered default,
    then :func:`default_layer_spec`. Its indices count the eligible layers only, full
    and sliding-window alike, in model order (see :func:`eligible_layers`).
    """
    info = get_scheme(scheme)
    plan = CachePlan(info.scheme, len(cache))
    plan.unsupported = unsupported_reason(model)
    if plan.unsupported is not None:
        plan.kept[plan.unsupported] = list(range(len(cache)))
        return plan
    positions = eligible_layers(cache)
    for i, c in enumerate(cache):
        if i not in positions:
            plan.kept.setdefault(type(c).__name__, []).append(i)
    default = info.layers or default_layer_spec(len(positions), info.scheme)
    spec = layer_spec_in_force(layers, default)
    plan.layers_spec = str(spec)
    chosen = parse_layer_plan(spec, len(positions), info.scheme)
    for k, scheme in chosen.items():
        i = positions[k]
        frame = None
        if type(cache[i]) is mlx_cache.RotatingKVCache:
            # A sliding window keeps no separate fp16 window, nor positions to centre keys at.
            if scheme.centre_keys:
                plan.uncentred.setdefault("sliding-window layer", []).append(i)
            scheme = with_centring(with_window(scheme, 0), False)
        elif scheme.centre_keys:
            frame, why = layer_rope_frame(model, cache, i)
            if frame is None:
                plan.uncentred.setdefault(why, []).append(i)
                scheme = with_centring(scheme, False)
        cache[i] = compressed_twin(cache[i], scheme, i, frame)
        plan.compressed.append(i)
        if scheme != info.scheme:
            plan.overrides[i] = scheme
    skipped = [positions[k] for k in range(len(positions)) if k not in chosen]
    if skipped:
        plan.kept["layer spec"] = skipped
    return plan


def base_make_prompt_cache(model, max_kv_size: Optional[int] = None) -> list:
    """mlx-lm's own ``make_prompt_cache``, even while the integration patches it."""
    make = mlx_cache.make_prompt_cache
    make = getattr(make, "_tq_original", make)
    return make(model, max_kv_size=max_kv_size)


def make_prompt_cache(
    model, scheme="turbo4", layers: Optional[str] = None, max_kv_size: Optional[int] = None
) -> list:
    """An mlx-lm prompt cache for ``model`` with TurboQuant-compressed attention layers.

    Args:
        model: any mlx-lm model.
        scheme: scheme name (see :func:`schemes`) or a ``KVScheme``.
        layers: which attention layers to compress, counted among the eligible layers
            only (full-attention and sliding-window, in model order: ``"all"``,
            ``"2:-2"``, ``"0,3-7"``, per-layer schemes ``"-1=turbo8v4"``, a plan file
            ``"@plan.json"``); default ``$MLX_TQ_LAYERS``, else the scheme's registered
            default, else :func:`default_layer_spec` (every layer, the last one at higher
            precision when the model has at least 4).
        max_kv_size: passed to mlx-lm's ``make_prompt_cache`` (a bounded cache is a
            ``RotatingKVCache``, compressed as a sliding window).

    Layers that are neither ``KVCache`` nor ``RotatingKVCache`` (state-space, chunked,
    ``CacheList``, latent caches of MLA models) are left as the model made them.
    """
    cache = base_make_prompt_cache(model, max_kv_size=max_kv_size)
    compress_cache(model, cache, scheme, layers)
    return cache
