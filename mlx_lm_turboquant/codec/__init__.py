"""The TurboQuant codec: rotation, Lloyd-Max codebook, bit packing."""

from .codebook import SUPPORTED_BITS, Codebook, get_codebook
from .codec import TurboQuantCodec, get_codec
from .packing import pack, packed_words, unpack
from .rotation import Rotation, get_rotation

__all__ = [
    "SUPPORTED_BITS",
    "Codebook",
    "Rotation",
    "TurboQuantCodec",
    "get_codebook",
    "get_codec",
    "get_rotation",
    "pack",
    "packed_words",
    "unpack",
]
