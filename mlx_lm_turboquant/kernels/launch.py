"""Backend-neutral launch logic: template choice, token splits, input preparation.

``cuda.py`` and ``metal.py`` pass their kernel factory in; a function here returns
``None`` when the shapes are outside what the kernels cover (the caller then takes
the pure-MLX path), never a wrong answer.
"""

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import mlx.core as mx
import numpy as np

MAX_QUERIES = 8  # decode and speculative verification; longer prefill uses the reference
MAX_ROWS = 64  # query rows sharing one KV head in one block (n_rep * L)
TARGET_BLOCKS = 512  # blocks per call; 256-512 measured best at 128k tokens on an H100
PREFETCH_WORDS = 48  # registers per thread holding the next tile
_NEG = -1e30  # a masked score, as in reference.py


@dataclass(frozen=True)
class AttentionPlan:
    """Compile-time shape of one attention kernel instance."""

    D: int
    R: int
    L: int
    NREP: int
    NT: int
    TILE: int
    KBITS: int
    KEY_BF16: bool
    WK: int
    VBITS: int
    WV: int
    CPT: int
    TPC: int
    Q_SH: bool

    @lru_cache(maxsize=None)  # built once per configuration: decode calls this per layer
    def template(self, q_dtype, scale, mask_mode=0, mb=False, mh=False, ml=False):
        """Template arguments; the query dtype keeps kernel names unique per dtype (mlx's CUDA
        backend names a kernel by its template arguments alone)."""
        t = [(k, getattr(self, k)) for k in self.__dataclass_fields__]
        scale_bits = int(np.array(scale, np.float32).view(np.int32))
        return t + [("PREP_Q", self.Q_SH), ("SCALE_BITS", scale_bits), ("QT", q_dtype),
                    ("MASK_MODE", mask_mode), ("MB", mb), ("MH", mh), ("ML", ml)]  # fmt: skip

    def __hash__(self):  # frozen dataclass hash, spelled out for lru_cache on a method
        return hash(tuple(getattr(self, k) for k in self.__dataclass_fields__))


def _threads(D: int):
    """(threads per block, value coordinates per thread, threads per value coordinate)."""
    if D % 128 == 0:
        return 128, D // 128, 1
    if 128 % D == 0:
        return 128, 1, 128 // D
    return D, 1, 1


@lru_cache(maxsize=None)
def attention_plan(
    D, n_rep, L, key_bits, key_dtype, value_bits, shared_bytes
) -> Optional[AttentionPlan]:
    """The kernel configuration for these shapes, or None where the kernels do not apply."""
    R = n_rep * L
    if D % 32 or not 32 <= D <= 512 or L > MAX_QUERIES or R > MAX_ROWS:
        return None
    if key_bits == 0 and key_dtype not in (mx.float16, mx.bfloat16):
        return None
    NT, CPT, TPC = _threads(D)
    kbits = key_bits if key_bits else 16
    WK, WV = D * kbits // 32, D * value_bits // 32
    q_sh = D * R * 4 <= shared_bytes // 3
    for tile in (128, 64, 32):
        # The next tile waits in registers (tile * words / NT per thread): keep that small.
        if tile > NT or (tile > 32 and tile * (WK + WV) > PREFETCH_WORDS * NT):
            continue
        psz = NT if TPC > 1 else tile
        words = tile * ((WK | 1) + WV)
        floats = (D * R if q_sh else 1) + R * psz + (1 << min(kbits, 8)) + (1 << value_bits) + 3 * R
        if 4 * (words + floats) <= shared_bytes:
            return AttentionPlan(
                D, R, L, n_rep, NT, tile, kbits, key_dtype == mx.bfloat16,
                WK, value_bits, WV, CPT, TPC, q_sh,
            )  # fmt: skip
    return None


def split_tokens(T: int, n_blocks: int, tile: int):
    """(tokens per span, number of spans): about TARGET_BLOCKS blocks, whole tiles per span."""
    n_tiles = -(-T // tile)
    tiles_per_span = max(1, -(-n_tiles * n_blocks // TARGET_BLOCKS))
    span = tiles_per_span * tile
    return span, -(-T // span)


def _prepare_mask(mask, B, n_q_heads, L, T):
    """(mode, array, MB, MH, ML): mask as an additive float32 ``[B|1, H_q|1, L|1, T]``."""
    if mask is None:
        return 0, None, False, False, False
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"mask must be None, 'causal' or an array, got {mask!r}")
        return (1 if L > 1 else 0), None, False, False, False
    m = mask
    if m.dtype == mx.bool_:
        m = mx.where(m, 0.0, _NEG)
    m = m.astype(mx.float32)
    while m.ndim < 4:
        m = mx.expand_dims(m, 0)
    if m.ndim > 4:
        return None
    mB, mH, mL, mT = m.shape
    if mB not in (1, B) or mH not in (1, n_q_heads) or mL not in (1, L) or mT not in (1, T):
        return None
    m = mx.broadcast_to(m, (mB, mH, mL, T))
    return 2, m, mB != 1, mH != 1, mL != 1


_ONE = None


def _dummy():
    global _ONE
    if _ONE is None:
        _ONE = mx.zeros((1,), mx.float32)
    return _ONE


def decode_attention(kernel, shared_bytes, queries, cache, scale, mask=None, sinks=None):
    """Fused attention of ``queries`` ``[B, H_q, L, D]`` over a TurboQuantKVCache.

    Returns ``[B, H_q, L, D]`` in ``queries.dtype``, or None when these shapes are not
    covered (see :func:`attention_plan`) or the backend is missing.
    """
    B, n_q_heads, L, D = queries.shape
    attn, reduce = kernel("attention"), kernel("reduce")
    if attn is None or reduce is None or cache.v_dim != D:
        return None
    n_kv_heads, cap = cache.values.shape[1], cache.values.shape[2]
    T = cache.attended_tokens
    if n_q_heads % n_kv_heads:
        return None
    n_rep = n_q_heads // n_kv_heads
    key_codec, value_codec = cache.key_codec, cache.value_codec
    key_bits = cache.scheme.key_bits
    plan = attention_plan(D, n_rep, L, key_bits, cache.keys.dtype, value_codec.bits, shared_bytes)
    if plan is None:
        return None
    masking = _prepare_mask(mask, B, n_q_heads, L, T)
    if masking is None:
        return None
    mode, mask_arr, mb, mh, ml = masking

    if plan.Q_SH:
        q = queries  # each block scales and rotates its rows itself
    else:
        q = queries.astype(mx.float32) * scale
        if key_codec is not None:
            q = key_codec.rotation.forward(q)  # once per query, never per key
    if key_codec is not None:
        keys, key_norms, kcent = cache.keys, cache.key_norms, key_codec.centroids
        rot = key_codec.rotation.matrix
    else:
        keys, key_norms, kcent = cache.keys.view(mx.uint32), cache.value_norms, _dummy()
        rot = _dummy()
    span, n_splits = split_tokens(T, B * n_kv_heads, plan.TILE)
    meta = mx.array([T, cap, span, n_splits, n_kv_heads], dtype=mx.int32)
    BH, R = B * n_kv_heads, plan.R
    # The full-capacity buffers go in as they are (row-contiguous, so never copied).
    o_part, ml_part = attn(
        inputs=[q, rot, keys, key_norms, cache.values, cache.value_norms, kcent,
                value_codec.centroids, _dummy() if mask_arr is None else mask_arr, meta],
        template=plan.template(q.dtype, scale, mode, mb, mh, ml),
        grid=(n_splits * plan.NT, BH, 1),
        threadgroup=(plan.NT, 1, 1),
        output_shapes=[(BH, n_splits, R, D), (BH, n_splits, R, 2)],
        output_dtypes=[mx.float32, mx.float32],
    )  # fmt: skip
    has_sinks = sinks is not None
    (out,) = reduce(
        inputs=[o_part, ml_part, sinks.astype(mx.float32) if has_sinks else _dummy(),
                value_codec.rotation.matrix_t, meta],
        template=[("D", D), ("R", R), ("L", L), ("NREP", n_rep), ("HAS_SINKS", has_sinks),
                  ("OutT", queries.dtype)],
        grid=(BH * R * D, 1, 1),
        threadgroup=(D, 1, 1),
        output_shapes=[(BH * R, D)],
        output_dtypes=[queries.dtype],
    )  # fmt: skip
    return out.reshape(B, n_q_heads, L, D)


def _rows(x, D):
    rows = x.reshape(-1, D)
    if rows.dtype not in (mx.float16, mx.bfloat16, mx.float32):
        rows = rows.astype(mx.float32)
    return rows


def encode_kv(kernel, key_codec, keys, value_codec, values):
    """Fused twin of ``key_codec.encode(keys)`` and ``value_codec.encode(values)`` in one
    launch: ``(packed_k, norms_k, packed_v, norms_v)``, or None where it does not apply.
    With ``values`` None only the keys are encoded (and the last two items are None)."""
    *lead, D = keys.shape
    k = kernel("encode")
    pair = values is not None
    if k is None or D % 32 or not 32 <= D <= 1024 or D != key_codec.dim:
        return None
    if pair and (
        tuple(values.shape) != tuple(keys.shape)
        or value_codec.dim != D
        or values.dtype != keys.dtype
        or value_codec.norm_correction != key_codec.norm_correction
    ):
        return None
    xk = _rows(keys, D)
    vc = value_codec if pair else key_codec
    xv = _rows(values, D) if pair else xk
    N = xk.shape[0]
    pk, nk, pv, nv = k(
        inputs=[xk, xv, key_codec.rotation.matrix, vc.rotation.matrix, key_codec.boundaries,
                vc.boundaries, key_codec.centroids, vc.centroids],
        template=[("D", D), ("KBITS", key_codec.bits), ("KW", key_codec.words),
                  ("VBITS", vc.bits), ("VW", vc.words),
                  ("NORM_CORR", key_codec.norm_correction), ("InT", xk.dtype)],
        grid=(N * D, 2 if pair else 1, 1),
        threadgroup=(D, 1, 1),
        output_shapes=[(N, key_codec.words), (N,), (N if pair else 1, vc.words),
                       (N if pair else 1,)],
        output_dtypes=[mx.uint32, mx.float16, mx.uint32, mx.float16],
    )  # fmt: skip
    out = [pk.reshape(*lead, key_codec.words), nk.reshape(lead), None, None]
    if pair:
        out[2:] = pv.reshape(*lead, vc.words), nv.reshape(lead)
    return tuple(out)


def encode(kernel, codec, x):
    """Fused twin of ``TurboQuantCodec.encode``: ``x`` ``[..., D]`` to ``(packed [..., words]
    uint32, norms [...] float16)``, or None where the kernel does not apply."""
    out = encode_kv(kernel, codec, x, None, None)
    return None if out is None else out[:2]
