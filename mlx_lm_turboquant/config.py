"""Schemes as data: parsing "turbo4" / "turbo4v2" / "turbo0v4" / "turbo4-prod" / "turbo3.5" /
"turbo3cw9", and layer specs.

Every bad input raises ``ValueError`` naming what was given and what is allowed.
"""

import re
from dataclasses import dataclass, replace
from typing import Optional, Sequence

KEY_BITS = (0, 2, 3, 4, 8)  # 0: keys stay in the model's float dtype
VALUE_BITS = (2, 3, 4)
SYMMETRIC_BITS = (2, 3, 4)
PROD_KEY_BITS = (2, 3, 4)  # b-1 MSE bits plus 1 QJL bit: b-1 must have a codebook
SPLIT_BITS = (2, 3)  # turbo2.5 and turbo3.5: half the channels at b+1 bits

# How a vector is stored: "mse" (Algorithm 1), "prod" (keys by Algorithm 2: b-1 MSE bits,
# 1 QJL sign bit and the residual's norm; values stay "mse"), "split" (the paper's outlier
# split: keys and values each as two MSE codecs on channel halves).
VARIANTS = ("mse", "prod", "split")
MAX_WINDOW = 4096  # recent tokens a cache may keep uncompressed

SCHEME_FORMS = (
    "turbo{B} with B in {2, 3, 4} (keys and values at B bits)",
    "turbo{K}v{V} with K in {0, 2, 3, 4, 8} (0 = fp16 keys) and V in {2, 3, 4}",
    "turbo{B}-prod or turbo{K}v{V}-prod with B, K in {2, 3, 4} (keys: K-1 MSE bits + 1 QJL "
    "bit) and V in {2, 3, 4}",
    "turbo2.5 or turbo3.5 (half the channels at one bit more, keys and values)",
    "any of them with quantized keys with c after the bits: keys centred in RoPE's frame "
    "(turbo3c, turbo4v3c, turbo3.5c)",
    f"any of them with w{{W}} before -prod, W in [1, {MAX_WINDOW}]: the W most recent tokens "
    "also kept uncompressed (turbo4w16, turbo3.5w16, turbo3cw9, turbo4w16-prod)",
)
_NAME = re.compile(r"^turbo(\d+)(?:v(\d+)|(\.5))?(c)?(?:w(\d+))?(-prod)?$")


def split_dims(dim: int):
    """(outlier channels, other channels) of a split vector: the larger half is the outliers'."""
    return dim - dim // 2, dim // 2


@dataclass(frozen=True)
class KVScheme:
    """What a TurboQuant cache stores for one layer.

    Attributes:
        name: the scheme's name, e.g. ``"turbo4"``.
        key_bits: bits per key coordinate; 0 keeps keys uncompressed.
        value_bits: bits per value coordinate.
        norm_correction: rescale stored norms so decoded vectors keep their length.
        seed: base seed; each layer and each of K / V derive their own rotation from it.
        variant: one of ``VARIANTS``. With "prod", ``key_bits`` counts the QJL bit; with
            "split", ``key_bits`` / ``value_bits`` are the bits of the non-outlier half.
        window: the most recent ``window`` tokens are also kept uncompressed, and attention
            reads them from there (docs/evaluation.md: the fp16 window lever).
        centre_keys: keys are stored less their first tokens' mean taken in RoPE's frame,
            and attention adds that mean's exact score back (``codec.centring``;
            docs/evaluation.md, lever (g)).
    """

    name: str
    key_bits: int
    value_bits: int
    norm_correction: bool = True
    seed: int = 0
    variant: str = "mse"
    window: int = 0
    centre_keys: bool = False

    def __post_init__(self):
        if self.key_bits not in KEY_BITS:
            raise ValueError(f"key_bits must be one of {KEY_BITS}, got {self.key_bits!r}")
        if self.value_bits not in VALUE_BITS:
            raise ValueError(f"value_bits must be one of {VALUE_BITS}, got {self.value_bits!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.variant == "prod" and self.key_bits not in PROD_KEY_BITS:
            raise ValueError(
                f"prod keys need key_bits in {PROD_KEY_BITS} (b-1 MSE bits + 1 QJL bit), "
                f"got {self.key_bits!r}"
            )
        if self.variant == "split" and not (self.key_bits == self.value_bits in SPLIT_BITS):
            raise ValueError(
                f"split schemes need key_bits == value_bits in {SPLIT_BITS}, "
                f"got {self.key_bits!r} and {self.value_bits!r}"
            )
        w = self.window
        if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w <= MAX_WINDOW:
            raise ValueError(f"window must be an int in [0, {MAX_WINDOW}], got {w!r}")
        if self.centre_keys not in (True, False):
            raise ValueError(f"centre_keys must be a bool, got {self.centre_keys!r}")
        if self.centre_keys and self.key_bits == 0:
            raise ValueError("centre_keys needs quantized keys; fp16 keys (key_bits 0) are "
                             "stored exactly")  # fmt: skip

    def vector_format(self, kind: str, dim: int):
        """``(uint32 words, fp16 norms)`` one stored vector costs; ``kind``: "keys" / "values".

        prod keys: the b-1-bit codes then the D sign bits (b * D / 32 words for D a multiple
        of 32, as many as b-bit MSE keys) and two norms (the MSE scale, the residual's norm).
        split: the outlier half's codes at b+1 bits then the rest's at b bits, a norm each.
        """
        from .codec.packing import packed_words

        bits = self.key_bits if kind == "keys" else self.value_bits
        if self.variant == "prod" and kind == "keys":
            return packed_words(dim, bits - 1) + packed_words(dim, 1), 2
        if self.variant == "split":
            hi, lo = split_dims(dim)
            return packed_words(hi, bits + 1) + packed_words(lo, bits), 2
        return packed_words(dim, bits), 1

    def bits_per_coordinate(self, kind: str) -> float:
        """Average code bits per coordinate at D = 128 (norms not counted)."""
        if kind == "keys" and self.key_bits == 0:
            return 16.0
        return 32 * self.vector_format(kind, 128)[0] / 128

    def bytes_per_token(self, n_kv_heads: int, k_dim: int, v_dim: Optional[int] = None) -> int:
        """Bytes one token costs in one layer (norms included, fp16 keys at 2 bytes)."""
        v_dim = k_dim if v_dim is None else v_dim
        if self.key_bits == 0:
            k = 2 * k_dim
        else:
            words, norms = self.vector_format("keys", k_dim)
            k = 4 * words + 2 * norms
        words, norms = self.vector_format("values", v_dim)
        return n_kv_heads * (k + 4 * words + 2 * norms)

    def window_bytes(self, n_kv_heads: int, k_dim: int, v_dim: Optional[int] = None) -> int:
        """Bytes the uncompressed window adds to one layer (fp16), whatever the length."""
        v_dim = k_dim if v_dim is None else v_dim
        return 2 * self.window * n_kv_heads * (k_dim + v_dim)


def parse_scheme(name) -> KVScheme:
    """``"turbo4"`` -> ``KVScheme(key_bits=4, value_bits=4)``; ``"turbo0v4"`` -> fp16 keys."""
    if isinstance(name, KVScheme):
        return name
    if not isinstance(name, str):
        raise ValueError(f"a KV scheme is a name such as 'turbo4', got {name!r}")
    m = _NAME.match(name.strip().lower())
    if m is not None:
        k, v, half, c, w, prod = m.groups()
        k, window, centre = int(k), 0 if w is None else int(w), c is not None
        vb = k if v is None else int(v)
        if (w is not None and not 1 <= window <= MAX_WINDOW) or (centre and k == 0):
            pass  # w0, a window over MAX_WINDOW, or centred fp16 keys: not a scheme
        elif half is not None:
            if k in SPLIT_BITS and not prod:
                return KVScheme(m.group(0), k, k, variant="split", window=window,
                                centre_keys=centre)  # fmt: skip
        elif (k in SYMMETRIC_BITS if v is None else vb in VALUE_BITS) and k in (
            PROD_KEY_BITS if prod else KEY_BITS
        ):
            return KVScheme(_compose(k, v and vb, half, window, prod, c), k, vb,
                            variant="prod" if prod else "mse", window=window,
                            centre_keys=centre)  # fmt: skip
    raise ValueError(f"unknown KV scheme {name!r}; valid forms: " + "; ".join(SCHEME_FORMS))


def _compose(k, v, half, window, prod, centre=None) -> str:
    """A built-in name from its parts: turbo{k}, v{v} or .5, c, w{window}, -prod."""
    return (f"turbo{k}" + (f"v{v}" if v is not None else half or "") + (centre and "c" or "")
            + (f"w{window}" if window else "") + (prod or ""))  # fmt: skip


def with_window(scheme: KVScheme, window: int) -> KVScheme:
    """``scheme`` with another window; a built-in name follows (turbo4 -> turbo4w16)."""
    return _with(scheme, window, scheme.centre_keys)


def with_centring(scheme: KVScheme, centre: bool) -> KVScheme:
    """``scheme`` with centred keys or without; a built-in name follows (turbo3 -> turbo3c).
    fp16 keys are never centred: ``centre`` is ignored for them."""
    return _with(scheme, scheme.window, centre and scheme.key_bits > 0)


def _with(scheme: KVScheme, window: int, centre: bool) -> KVScheme:
    if (window, centre) == (scheme.window, scheme.centre_keys):
        return scheme
    m = _NAME.match(scheme.name)
    if m is None:  # a plugin's name stays as registered
        return replace(scheme, window=window, centre_keys=centre)
    k, v, half, _, _, prod = m.groups()
    name = _compose(k, v, half, window, prod, "c" if centre else None)
    return replace(scheme, name=name, window=window, centre_keys=centre)


def builtin_scheme_names() -> list:
    names = [f"turbo{b}" for b in SYMMETRIC_BITS]
    names += [f"turbo{k}v{v}" for k in KEY_BITS for v in VALUE_BITS if not (k == v)]
    return names


def variant_scheme_names() -> list:
    """The built-in prod and split schemes. Only the symmetric prod forms are registered
    (``turbo4v2-prod`` and friends parse but are not listed)."""
    return [f"turbo{b}-prod" for b in PROD_KEY_BITS] + [f"turbo{b}.5" for b in SPLIT_BITS]


_RANGE = re.compile(r"^(-?\d+)-(-?\d+)$")


def parse_layer_spec(spec, num_layers: int) -> list:
    """Which of ``num_layers`` attention layers to compress, as a sorted index list.

    Accepted: ``None`` / ``"all"``; ``"none"``; a Python slice ``"2:-2"``, ``"::2"``;
    comma lists of indices and inclusive ranges ``"0,3-7"`` (negative indices count
    from the end); exclusions prefixed with ``!`` or ``^``: ``"all,!0,!-1"``; or a
    sequence of ints. Items with per-layer schemes (``"-1=turbo8v4"``, ``"@plan.json"``,
    see :func:`parse_layer_plan`) count as the layers they compress.
    """
    if not isinstance(num_layers, int) or num_layers < 0:
        raise ValueError(f"num_layers must be a non-negative int, got {num_layers!r}")
    if spec is None:
        return list(range(num_layers))
    if isinstance(spec, (list, tuple, range)):
        return sorted({_index(i, num_layers, spec) for i in spec})
    if not isinstance(spec, str):
        raise ValueError(f"a layer spec is a string such as '2:-2' or '0,3-7', got {spec!r}")
    if "=" in spec or spec.startswith("@"):  # per-layer schemes: the layers they compress
        return list(parse_layer_plan(spec, num_layers, "turbo4"))
    text = spec.replace(" ", "")
    if text == "":
        raise ValueError(f"empty layer spec {spec!r}; {_LAYER_HELP}")
    chosen, excluded, any_include = set(), set(), False
    for part in text.split(","):
        negate = part[:1] in ("!", "^")
        body = part[1:] if negate else part
        layers = _parse_part(body, num_layers, spec)
        if negate:
            excluded |= layers
        else:
            any_include = True
            chosen |= layers
    if not any_include:  # "!0,!-1" means all but those
        chosen = set(range(num_layers))
    return sorted(chosen - excluded)


_LAYER_HELP = (
    "allowed: 'all', 'none', a slice like '2:-2', indices and ranges like '0,3-7' "
    "(negative indices count from the end), exclusions like 'all,!0,!-1'"
)


def _index(i, num_layers, spec):
    if isinstance(i, bool) or not isinstance(i, int):
        raise ValueError(f"layer index {i!r} in {spec!r} is not an int; {_LAYER_HELP}")
    j = i + num_layers if i < 0 else i
    if not 0 <= j < num_layers:
        raise ValueError(
            f"layer {i} in spec {spec!r} is out of range for {num_layers} attention layers"
        )
    return j


def _int(text, spec):
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"cannot read {text!r} in layer spec {spec!r}; {_LAYER_HELP}") from None


def _parse_part(body, num_layers, spec) -> set:
    if body == "all":
        return set(range(num_layers))
    if body == "none":
        return set()
    if ":" in body:
        fields = body.split(":")
        if len(fields) > 3:
            raise ValueError(f"bad slice {body!r} in layer spec {spec!r}; {_LAYER_HELP}")
        start, stop, step = (
            [None if f == "" else _int(f, spec) for f in fields] + [None, None]
        )[:3]
        if step == 0:
            raise ValueError(f"slice step cannot be zero in layer spec {spec!r}")
        return set(range(num_layers)[slice(start, stop, step)])
    m = _RANGE.match(body)
    if m is not None:
        lo = _index(int(m.group(1)), num_layers, spec)
        hi = _index(int(m.group(2)), num_layers, spec)
        if lo > hi:
            raise ValueError(f"range {body!r} in layer spec {spec!r} runs backwards")
        return set(range(lo, hi + 1))
    return {_index(_int(body, spec), num_layers, spec)}


def parse_layer_plan(spec, num_layers: int, scheme) -> dict:
    """Which scheme each compressed layer gets: ``{layer index: KVScheme}``.

    A layer spec (see :func:`parse_layer_spec`) whose items may end in ``=SCHEME``:
    ``"-1=turbo8v4"`` compresses every layer with ``scheme`` but the last with turbo8v4;
    ``"0-3,5=turbo8v4"`` compresses 0-3 with ``scheme``, 5 with turbo8v4 and keeps 4;
    ``=fp16`` keeps those layers uncompressed. The plain items choose the layers as in
    :func:`parse_layer_spec` (all of them when there are none); assignments are applied
    after them, in order, and include the layers they name. ``"@plan.json"`` reads the
    spec from the ``"layers"`` field of a file (``mlx-lm-turboquant eval calibrate`` writes one).
    """
    base = parse_scheme(scheme)
    spec = read_plan_file(spec)
    if not isinstance(spec, str) or "=" not in spec:
        return {i: base for i in parse_layer_spec(spec, num_layers)}
    plain, assigned = [], []
    for part in spec.replace(" ", "").split(","):
        layers, eq, name = part.partition("=")
        if not eq:
            plain.append(part)
            continue
        if layers[:1] in ("!", "^") or layers == "":
            raise ValueError(f"{part!r} in layer spec {spec!r}: assign a scheme as LAYERS=SCHEME")
        assigned.append((layers, name))
    chosen = parse_layer_spec(",".join(plain) if plain else "all", num_layers)
    plan = {i: base for i in chosen}
    for layers, name in assigned:
        target = None if name.lower() == "fp16" else parse_scheme(name)
        if target is not None:  # the base's seed, norm correction, window, centring carry over
            target = with_window(target, target.window or base.window)
            target = with_centring(target, target.centre_keys or base.centre_keys)
            target = replace(target, norm_correction=base.norm_correction, seed=base.seed)
        for i in _parse_part(layers, num_layers, spec):
            if target is None:
                plan.pop(i, None)
            else:
                plan[i] = target
    return dict(sorted(plan.items()))


def read_plan_file(spec):
    """``spec``, or the ``"layers"`` field of the JSON file ``spec`` names as ``@path``."""
    if not isinstance(spec, str) or not spec.startswith("@"):
        return spec
    import json

    try:
        with open(spec[1:]) as f:
            layers = json.load(f).get("layers")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"cannot read a layer plan from {spec[1:]!r}: {e}") from None
    if not isinstance(layers, str) or layers.startswith("@"):
        raise ValueError(f"{spec[1:]!r} has no \"layers\" layer spec string, got {layers!r}")
    return layers


def layer_spec_in_force(spec, default: Optional[str] = None):
    """``spec`` if given, else ``$MLX_TQ_LAYERS``, else ``default``."""
    import os

    if spec is not None:
        return spec
    return os.environ.get("MLX_TQ_LAYERS") or default


def resolve_layers(spec: Optional[str], num_layers: int, default: Optional[str] = None) -> Sequence[int]:
    """Layer indices from ``spec``, else ``$MLX_TQ_LAYERS``, else ``default``."""
    return parse_layer_spec(layer_spec_in_force(spec, default), num_layers)
