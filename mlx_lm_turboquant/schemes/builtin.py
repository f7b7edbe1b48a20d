"""The built-in schemes, registered through the same hook as any plugin."""

from ..config import builtin_scheme_names, parse_scheme
from .hookspecs import hookimpl


@hookimpl
def register_kv_schemes(register):
    for name in builtin_scheme_names():
        s = parse_scheme(name)
        keys = "fp16 keys" if s.key_bits == 0 else f"{s.key_bits}-bit keys"
        register(s, description=f"{keys}, {s.value_bits}-bit values")
