"""TurboQuant KV-cache compression for mlx-lm (arXiv 2504.19874)."""

# The registry subpackage loads first: afterwards the name `schemes` is the function.
from . import schemes as _scheme_registry  # noqa: F401  isort: skip
from .api import make_prompt_cache, schemes
from .attention import turboquant_sdpa
from .cache import TurboQuantKVCache
from .config import KVScheme, parse_layer_spec, parse_scheme
from .integration import activate, deactivate
from .rotating_cache import RotatingTurboQuantKVCache

__version__ = "0.1.0"

__all__ = [
    "KVScheme",
    "RotatingTurboQuantKVCache",
    "TurboQuantKVCache",
    "activate",
    "deactivate",
    "make_prompt_cache",
    "parse_layer_spec",
    "parse_scheme",
    "schemes",
    "turboquant_sdpa",
]
