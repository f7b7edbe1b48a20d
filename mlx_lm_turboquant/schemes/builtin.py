"""The built-in schemes, registered through the same hook as any plugin."""

from ..config import builtin_scheme_names, parse_scheme, variant_scheme_names
from .hookspecs import hookimpl


def _describe(s) -> str:
    if s.variant == "prod":
        return f"{s.key_bits - 1}-bit + 1 QJL bit keys (Algorithm 2), {s.value_bits}-bit values"
    if s.variant == "split":
        return (f"keys and values at {s.key_bits}.5 bits: half the channels (outliers) at "
                f"{s.key_bits + 1} bits, half at {s.key_bits}")  # fmt: skip
    keys = "fp16 keys" if s.key_bits == 0 else f"{s.key_bits}-bit keys"
    return f"{keys}, {s.value_bits}-bit values"


@hookimpl
def register_kv_schemes(register):
    for name in builtin_scheme_names() + variant_scheme_names():
        s = parse_scheme(name)
        register(s, description=_describe(s))
