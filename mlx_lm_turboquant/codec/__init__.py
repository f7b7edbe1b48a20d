"""The TurboQuant codec: rotation, Lloyd-Max codebook, bit packing."""

from .codebook import SUPPORTED_BITS, Codebook, get_codebook
from .codec import TurboQuantCodec, get_codec
from .packing import pack, packed_words, unpack
from .prod import ProdCodec, get_prod_codec
from .rotation import Rotation, get_rotation
from .split import SplitCodec, get_split_codec


def codec_for(variant: str, dim: int, bits: int, seed: int, norm_correction: bool = True):
    """The codec of a scheme variant ("mse", "prod", "split"; see ``config.VARIANTS``)."""
    make = {"mse": get_codec, "prod": get_prod_codec, "split": get_split_codec}.get(variant)
    if make is None:
        raise ValueError(f"codec variant must be 'mse', 'prod' or 'split', got {variant!r}")
    return make(dim, bits, seed, norm_correction)


__all__ = [
    "SUPPORTED_BITS",
    "Codebook",
    "ProdCodec",
    "Rotation",
    "SplitCodec",
    "TurboQuantCodec",
    "codec_for",
    "get_codebook",
    "get_codec",
    "get_rotation",
    "pack",
    "packed_words",
    "unpack",
]
