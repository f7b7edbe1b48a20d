"""Metal kernels through ``mx.fast.metal_kernel``: the bodies of ``source.py`` with the
Metal spelling of their portability macros (a simdgroup of 32 is a CUDA warp of 32).
Same op names as ``cuda.py``."""

from functools import lru_cache

import mlx.core as mx

from . import launch
from .source import CUDA_ONLY, OPS

NAME = "metal"

# Prepended to every body, after mlx's own Metal utilities.
HEADER = r"""
#include <metal_stdlib>
using namespace metal;

#define TQ_SHARED threadgroup
#define TQ_SHARED_PTR(T) threadgroup T*
#define TQ_BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define TQ_UNROLL _Pragma("clang loop unroll(full)")
#define TQ_UNROLL8 _Pragma("clang loop unroll_count(8)")
#define TQ_UNROLL32 _Pragma("clang loop unroll_count(32)")
// Stores 16 bits into half h (0 low, 1 high) of word i of w.
#define TQ_STORE_HALF_BITS(w, i, h, b) (((device ushort*)((w) + (i)))[h] = ushort(b))
#define TQ_INF INFINITY
#define TQ_HALF_TO_FLOAT(h) static_cast<float>(h)
#define TQ_TO_HALF(x) static_cast<half>(x)

inline float tq_max(float a, float b) { return metal::max(a, b); }
inline float tq_exp(float x) { return metal::exp(x); }
inline float tq_sqrt(float x) { return metal::sqrt(x); }
// sin and cos of x radians (any size), reduced to [-pi, pi] first (as on CUDA).
inline float tq_wrap(float x) {
  const float k = metal::rint(x * 0.15915494f);
  return metal::fma(-k, -1.7484555e-07f, metal::fma(-k, 6.2831855f, x));
}
inline float tq_sin(float x) { return metal::precise::sin(tq_wrap(x)); }
inline float tq_cos(float x) { return metal::precise::cos(tq_wrap(x)); }
inline float tq_as_float(int bits) { return as_type<float>(bits); }
inline float tq_half_bits(uint32_t h) { return static_cast<float>(as_type<half>(ushort(h))); }
inline uint32_t tq_half_word(float x) { return uint32_t(as_type<ushort>(half(x))); }
inline float tq_bf16_bits(uint32_t h) { return as_type<float>(h << 16); }
inline float tq_warp_sum(float v) { return simd_sum(v); }
inline float tq_warp_max(float v) { return simd_max(v); }
"""

PRELUDE = r"""
  const int tq_tid = thread_position_in_threadgroup.x;
  const int tq_bx = threadgroup_position_in_grid.x;
  const int tq_by = threadgroup_position_in_grid.y;
  (void)tq_by;
"""

# Apple GPUs give a threadgroup 32 KiB.
SHARED_BYTES = 32 * 1024

# Launches are not replayed from an mx.compile graph on Metal: that path is measured and
# tested only on CUDA, and a Mac has not run it.
COMPILED = False


def available() -> bool:
    return mx.metal.is_available()


@lru_cache(maxsize=None)
def kernel(op: str, shared_memory: int = 0):
    """The ``mx.fast.metal_kernel`` for ``op`` (a key of ``source.OPS``), or None without Metal
    or for a CUDA-only op (the caller then launches the portable one). Only the CUDA-only
    tensor-core kernel sizes its shared memory at launch (``shared_memory``)."""
    if shared_memory:
        raise ValueError(f"Metal kernels take no dynamic shared memory, got {shared_memory}")
    if not available() or op in CUDA_ONLY:
        return None
    body, inputs, outputs = OPS[op]
    return mx.fast.metal_kernel(
        name=f"turboquant_{op}",
        input_names=list(inputs),
        output_names=list(outputs),
        source=PRELUDE + body,
        header=HEADER,
    )


def decode_attention(queries, cache, scale, mask=None, sinks=None):
    return launch.decode_attention(
        kernel, SHARED_BYTES, queries, cache, scale, mask, sinks, compiled=COMPILED
    )


def encode(codec, x):
    return launch.encode(kernel, codec, x)


def encode_kv(key_codec, keys, value_codec, values):
    return launch.encode_kv(kernel, key_codec, keys, value_codec, values)


def encode_rows(key_codec, keys, value_codec, values):
    return launch.encode_rows(kernel, key_codec, keys, value_codec, values)


def append_rows(key_codec, keys, value_codec, values, cache):
    # "append" is CUDA-only (kernel() returns None), so this declines and the cache encodes
    # rows and updates its buffer with a slice update.
    return launch.append_rows(kernel, key_codec, keys, value_codec, values, cache)
