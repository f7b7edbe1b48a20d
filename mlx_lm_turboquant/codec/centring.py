"""Keys centred in RoPE's frame: the ``c`` schemes (``turbo3c``, ``turbo3cw9``).

Before RoPE, a head's keys share a large mean (on tq-llama-8k it carries 75-80% of the
key energy in layers 1-4); after RoPE that mean turns with position, so a plain
per-channel mean of the cached (rotated) keys removes little (docs/evaluation.md, lever
(g)). A centred cache takes the mean ``mu`` of its first keys with RoPE undone, stores
``k_p - R_p mu`` for the key at position ``p`` and scores ``q . R_p mu`` exactly: only the
smaller residual carries quantization error.

The cache never sees the model's RoPE module at attention time, so it keeps its own
copy of the rotation as a :class:`RopeFrame` (dims, layout, frequencies), read off the
module by probing it. Encode and attention both use that copy, so they agree exactly
whether or not it matches the model's RoPE to the last bit; a closer match only removes
more of the mean.
"""

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import mlx.core as mx
import numpy as np

# A first update shorter than this gives too noisy a mean: the cache then centres on zero
# (stores keys as they are) for good.
MIN_CENTRE_TOKENS = 16
# Positions the probe checks a frame against the module at (float32 angles at these
# positions are good to ~1e-3 rad, so agreement is asked to 1e-2).
_CHECK_OFFSETS = (1, 777, 5000)
_PROBE_FAR = 4096  # resolves low frequencies the first position cannot


@dataclass(frozen=True, eq=False)
class RopeFrame:
    """RoPE as ``mx.fast.rope`` applies it: the first ``dims`` channels turn in pairs
    (``traditional``: adjacent channels; else channel ``j`` with ``j + dims / 2``) by
    ``position / freqs[j]`` radians; the rest stay put."""

    dims: int
    traditional: bool
    freqs: mx.array  # [dims / 2] float32, mx.fast.rope's inverse frequencies

    def rotate(self, x: mx.array, offset, inverse: bool = False) -> mx.array:
        """``x`` ``[..., L, D]`` turned to positions ``offset .. offset + L - 1`` (or back)."""
        scale = -1.0 if inverse else 1.0
        return mx.fast.rope(x, self.dims, traditional=self.traditional, base=None, scale=scale,
                            offset=offset, freqs=self.freqs)  # fmt: skip

    @classmethod
    def standard(cls, dims: int, base: float = 10000.0, traditional: bool = False):
        """The frame of ``nn.RoPE(dims, traditional, base)`` (no scaling), for caches built
        without a model (benchmarks, tests); a model's own comes from :func:`probe_rope`."""
        if not (isinstance(dims, int) and dims >= 2 and dims % 2 == 0) or not base > 1:
            raise ValueError(f"a RoPE frame needs an even dims >= 2 and a base > 1, got "
                             f"dims={dims!r}, base={base!r}")  # fmt: skip
        freqs = np.power(float(base), np.arange(0, dims, 2, dtype=np.float64) / dims)
        return cls(dims, bool(traditional), mx.array(freqs.astype(np.float32)))

    @cached_property
    def omega(self) -> mx.array:
        """``[dims / 2]`` float32 radians per position of each pair, ``1 / freqs`` as
        ``mx.fast.rope`` takes it (0 for a pair that does not turn): the fused kernels'
        copy of the rotation."""
        return mx.array(1.0 / np.array(self.freqs, np.float32))

    def check_fits(self, k_dim: int):
        """Keys of ``k_dim`` channels must hold the ``dims`` channels the frame turns."""
        if self.dims > k_dim:
            raise ValueError(f"the RoPE frame turns {self.dims} channels, keys have {k_dim}")

    def to_array(self) -> mx.array:
        """``[1 + dims / 2]`` float32: the layout flag, then the frequencies (cache state)."""
        flag = mx.array([1.0 if self.traditional else 0.0], dtype=mx.float32)
        return mx.concatenate([flag, self.freqs.astype(mx.float32)])

    @classmethod
    def from_array(cls, a, k_dim: int) -> "RopeFrame":
        """Inverse of :meth:`to_array`, checked (the array may come from a file)."""
        if not isinstance(a, mx.array) or a.ndim != 1 or a.dtype != mx.float32:
            raise ValueError(f"a RoPE frame is a 1-D float32 array, got {_describe(a)}")
        dims = 2 * (a.shape[0] - 1)
        v = np.array(a)
        if not 2 <= dims <= k_dim or v[0] not in (0.0, 1.0) or not (v[1:] > 0).all():
            raise ValueError(
                f"a RoPE frame for D={k_dim} holds a 0/1 layout flag and 1 to {k_dim // 2} "
                f"positive frequencies, got {a.shape[0]} values"
            )
        return cls(dims, bool(v[0]), a[1:])


def _describe(a):
    return f"{a.dtype} array of shape {tuple(a.shape)}" if isinstance(a, mx.array) else repr(a)


def probe_rope(rope, dim: Optional[int] = None) -> RopeFrame:
    """The :class:`RopeFrame` a model's RoPE module ``rope`` (``rope(x, offset=...)``)
    applies to ``dim``-channel heads (default: the channels it says it turns, ``dims`` or
    ``dim``), read off its action on the unit vectors.

    Raises ``ValueError`` when the module is not a position-linear pairwise rotation that a
    frame reproduces (input scaling such as YaRN's is allowed: it does not turn vectors).
    """
    dims = getattr(rope, "dims", getattr(rope, "dim", dim))
    dim = dims if dim is None else dim
    if not (isinstance(dim, int) and isinstance(dims, int) and 2 <= dims <= dim
            and dims % 2 == 0):  # fmt: skip
        raise ValueError(f"cannot tell how {type(rope).__name__} turns heads of {dim!r} "
                         f"channels (it says it turns {dims!r})")  # fmt: skip
    eye = mx.eye(dim, dtype=mx.float32).reshape(dim, 1, 1, dim)

    def image(offset):  # row i: where e_i goes, rows scaled to unit length
        y = np.array(rope(eye, offset=offset).astype(mx.float32)).reshape(dim, dim)
        return y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-30)

    try:
        near, far = image(1), image(_PROBE_FAR)
    except Exception as e:  # noqa: BLE001 (any failure means: not a RoPE we can copy)
        raise ValueError(f"cannot probe {type(rope).__name__} as RoPE: {e}") from None
    layouts = [rope.traditional] if isinstance(getattr(rope, "traditional", None), bool) else [
        False, True]  # fmt: skip
    for traditional in layouts:
        half = np.arange(dims // 2)
        a, b = (2 * half, 2 * half + 1) if traditional else (half, half + dims // 2)
        w_near = np.arctan2(near[a, b], near[a, a])
        w_far = np.arctan2(far[a, b], far[a, a])
        turns = np.round((w_near * _PROBE_FAR - w_far) / (2 * math.pi))
        omega = (w_far + 2 * math.pi * turns) / _PROBE_FAR
        with np.errstate(divide="ignore"):
            freqs = np.where(omega > 0, 1.0 / np.maximum(omega, 1e-30), np.inf)
        frame = RopeFrame(dims, traditional, mx.array(freqs.astype(np.float32)))
        if all(np.abs(np.array(frame.rotate(eye, o)).reshape(dim, dim) - image(o)).max() < 1e-2
               for o in _CHECK_OFFSETS):  # fmt: skip
            return frame
    raise ValueError(
        f"{type(rope).__name__} does not act as a pairwise rotation linear in the position "
        f"on {dim} channels (checked at positions {_CHECK_OFFSETS})"
    )


def key_mean(keys: mx.array, frame: RopeFrame, offset: int) -> mx.array:
    """``[B, H, 1, D]`` float32: the mean of ``keys`` (at positions ``offset ..``) with
    RoPE undone; zeros for fewer than ``MIN_CENTRE_TOKENS`` keys."""
    B, H, L, D = keys.shape
    if L < MIN_CENTRE_TOKENS:
        return mx.zeros((B, H, 1, D), mx.float32)
    return frame.rotate(keys.astype(mx.float32), offset, inverse=True).mean(axis=2, keepdims=True)


def mean_keys(mean: mx.array, frame: RopeFrame, offset: int, length: int) -> mx.array:
    """``R_p mean`` at positions ``offset .. offset + length - 1``: ``[B, H, length, D]``
    float32, what a centred cache subtracts from its keys and adds back to their scores."""
    B, H, _, D = mean.shape
    # A contiguous copy: mlx 0.32.4's CUDA rope reads a broadcast (stride-0) input wrongly
    # (measured on the H100: errors of the order of the input; the CPU is right).
    return frame.rotate(mx.contiguous(mx.broadcast_to(mean, (B, H, length, D))), offset)
