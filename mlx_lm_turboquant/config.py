"""Schemes as data: parsing "turbo4" / "turbo4v2" / "turbo0v4" / "turbo4-prod" / "turbo3.5",
and layer specs.

Every bad input raises ``ValueError`` naming what was given and what is allowed.
"""

import re
from dataclasses import dataclass
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

SCHEME_FORMS = (
    "turbo{B} with B in {2, 3, 4} (keys and values at B bits)",
    "turbo{K}v{V} with K in {0, 2, 3, 4, 8} (0 = fp16 keys) and V in {2, 3, 4}",
    "turbo{B}-prod or turbo{K}v{V}-prod with B, K in {2, 3, 4} (keys: K-1 MSE bits + 1 QJL "
    "bit) and V in {2, 3, 4}",
    "turbo2.5 or turbo3.5 (half the channels at one bit more, keys and values)",
)
_NAME = re.compile(r"^turbo(\d+)(?:v(\d+))?(-prod)?$")
_SPLIT_NAME = re.compile(r"^turbo(\d)\.5$")


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
    """

    name: str
    key_bits: int
    value_bits: int
    norm_correction: bool = True
    seed: int = 0
    variant: str = "mse"

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


def parse_scheme(name) -> KVScheme:
    """``"turbo4"`` -> ``KVScheme(key_bits=4, value_bits=4)``; ``"turbo0v4"`` -> fp16 keys."""
    if isinstance(name, KVScheme):
        return name
    if not isinstance(name, str):
        raise ValueError(f"a KV scheme is a name such as 'turbo4', got {name!r}")
    text = name.strip().lower()
    m = _NAME.match(text)
    if m is not None:
        k, v, prod = int(m.group(1)), m.group(2), m.group(3) is not None
        key_bits = PROD_KEY_BITS if prod else KEY_BITS
        variant, suffix = ("prod", "-prod") if prod else ("mse", "")
        if v is None and k in SYMMETRIC_BITS:
            return KVScheme(f"turbo{k}{suffix}", k, k, variant=variant)
        if v is not None and k in key_bits and int(v) in VALUE_BITS:
            return KVScheme(f"turbo{k}v{int(v)}{suffix}", k, int(v), variant=variant)
    m = _SPLIT_NAME.match(text)
    if m is not None and int(m.group(1)) in SPLIT_BITS:
        b = int(m.group(1))
        return KVScheme(f"turbo{b}.5", b, b, variant="split")
    raise ValueError(f"unknown KV scheme {name!r}; valid forms: " + "; ".join(SCHEME_FORMS))


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
    sequence of ints.
    """
    if not isinstance(num_layers, int) or num_layers < 0:
        raise ValueError(f"num_layers must be a non-negative int, got {num_layers!r}")
    if spec is None:
        return list(range(num_layers))
    if isinstance(spec, (list, tuple, range)):
        return sorted({_index(i, num_layers, spec) for i in spec})
    if not isinstance(spec, str):
        raise ValueError(f"a layer spec is a string such as '2:-2' or '0,3-7', got {spec!r}")
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


def layer_spec_in_force(spec, default: Optional[str] = None):
    """``spec`` if given, else ``$MLX_TQ_LAYERS``, else ``default``."""
    import os

    if spec is not None:
        return spec
    return os.environ.get("MLX_TQ_LAYERS") or default


def resolve_layers(spec: Optional[str], num_layers: int, default: Optional[str] = None) -> Sequence[int]:
    """Layer indices from ``spec``, else ``$MLX_TQ_LAYERS``, else ``default``."""
    return parse_layer_spec(layer_spec_in_force(spec, default), num_layers)
