"""CUDA kernels through ``mx.fast.cuda_kernel``: the bodies of ``source.py`` with the
CUDA spelling of their portability macros. Same op names as ``metal.py``."""

from functools import lru_cache

import mlx.core as mx

from . import launch
from .source import OPS

NAME = "cuda"

# Prepended to every body; mlx's own header (device utils, cooperative groups) comes first.
HEADER = r"""
#define TQ_SHARED __shared__
#define TQ_SHARED_PTR(T) T*
#define TQ_ALIGN16 __align__(16)
// Shared memory sized at launch (mx.fast.cuda_kernel's shared_memory); n is its words.
#define TQ_DYNAMIC_SHARED(T, name, n) extern __shared__ __align__(16) T name[]; (void)(n)
#define TQ_BARRIER() __syncthreads()
#define TQ_UNROLL _Pragma("unroll")
#define TQ_UNROLL8 _Pragma("unroll 8")
#define TQ_UNROLL32 _Pragma("unroll 32")
// Stores 16 bits into half h (0 low, 1 high) of word i of w.
#define TQ_STORE_HALF_BITS(w, i, h, b) (reinterpret_cast<uint16_t*>((w) + (i))[h] = (uint16_t)(b))
#define TQ_INF __int_as_float(0x7f800000)
#define TQ_HALF_TO_FLOAT(h) __half2float(h)
#define TQ_TO_HALF(x) __float2half(x)

__device__ __forceinline__ float tq_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ float tq_exp(float x) { return expf(x); }
// 2^x in one MUFU instruction (relative error about 2^-22; tiny results flush to zero).
#define TQ_LOG2E 1.4426950408889634f
__device__ __forceinline__ float tq_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float tq_sqrt(float x) { return sqrtf(x); }
// sin and cos of x radians (any size): reduced to [-pi, pi] by two fused steps, where the
// hardware approximation is good to ~1e-6 (sinf's own reduction for large arguments would
// keep a local array on the stack of every kernel that calls it).
__device__ __forceinline__ float tq_wrap(float x) {
  const float k = rintf(x * 0.15915494f);
  return fmaf(-k, -1.7484555e-07f, fmaf(-k, 6.2831855f, x));
}
__device__ __forceinline__ float tq_sin(float x) { return __sinf(tq_wrap(x)); }
__device__ __forceinline__ float tq_cos(float x) { return __cosf(tq_wrap(x)); }
__device__ __forceinline__ float tq_as_float(int bits) { return __int_as_float(bits); }
__device__ __forceinline__ float tq_half_bits(uint32_t h) {
  return __half2float(__ushort_as_half((unsigned short)h));
}
__device__ __forceinline__ uint32_t tq_half_word(float x) {
  return (uint32_t)__half_as_ushort(__float2half(x));
}
__device__ __forceinline__ float tq_bf16_bits(uint32_t h) { return __uint_as_float(h << 16); }
__device__ __forceinline__ float tq_warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, o);
  }
  return v;
}
__device__ __forceinline__ float tq_warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  }
  return v;
}
__device__ __forceinline__ bool tq_warp_any(bool p) { return __any_sync(0xffffffffu, p); }
__device__ __forceinline__ float tq_shfl_xor(float v, int m) {
  return __shfl_xor_sync(0xffffffffu, v, m);
}
__device__ __forceinline__ float tq_shfl(float v, int lane) {
  return __shfl_sync(0xffffffffu, v, lane);
}
__device__ __forceinline__ uint32_t tq_funnel(uint32_t lo, uint32_t hi, int shift) {
  return __funnelshift_r(lo, hi, shift);
}
__device__ __forceinline__ uint32_t tq_pack_half2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);  // lo in the low 16 bits
  return *reinterpret_cast<const uint32_t*>(&h);
}
// A 32-bit shared-memory address and a load from one: an address is then one LEA from an
// index (a generic pointer costs two multiply-adds per load).
typedef uint32_t tq_saddr_t;
__device__ __forceinline__ tq_saddr_t tq_shared_addr(const uint32_t* p) {
  return (tq_saddr_t)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ uint32_t tq_lds(tq_saddr_t a) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(a));
  return v;
}
// a, which every lane of the warp holds, marked as such for the compiler (a shuffle from
// lane 0): it then keeps a in a uniform register, which a shared load adds to its address
// for free (an extra add per load otherwise).
__device__ __forceinline__ tq_saddr_t tq_uniform_addr(tq_saddr_t a) {
  return __shfl_sync(0xffffffffu, a, 0);
}
// Byte k (0 = lowest) of w.
__device__ __forceinline__ uint32_t tq_byte(uint32_t w, int k) {
  return __byte_perm(w, 0u, 0x4440 + k);
}
// (byte k of w) << 8 | lane_off (< 256): a lane's offset of a table entry in 256-byte rows.
__device__ __forceinline__ uint32_t tq_pair_addr(uint32_t w, int k, uint32_t lane_off) {
  return __byte_perm(w, lane_off, 0x5504 | (k << 4));
}
// Cross-block hand-off (the tensor-core kernel's fused merge): a device-wide fence, a
// counter that kernels only read in mlx's terms (inputs are const), and loads that skip the
// SM's L1, which never saw the other blocks' stores.
__device__ __forceinline__ void tq_fence() { __threadfence(); }
__device__ __forceinline__ uint32_t tq_atomic_inc(const uint32_t* c) {
  return atomicAdd(const_cast<uint32_t*>(c), 1u);
}
__device__ __forceinline__ void tq_atomic_reset(const uint32_t* c) {
  atomicExch(const_cast<uint32_t*>(c), 0u);
}
__device__ __forceinline__ float4 tq_load_cg4(const float4* p) { return __ldcg(p); }
__device__ __forceinline__ float2 tq_load_cg2(const float2* p) { return __ldcg(p); }
// A hint: bring the 128-byte line at p into L2 (no register waits on it).
__device__ __forceinline__ void tq_prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" : : "l"(p));
}
// Bulk copies (sm_90's copy engine, TMA) of a warp's token rows into shared memory, each
// completing on a barrier of its own (mbarrier): one instruction moves a step's rows, where
// loads by every lane spent the SM's load pipe. Addresses and sizes are multiples of 16.
__device__ __forceinline__ void tq_warp_sync() { __syncwarp(); }
__device__ __forceinline__ void tq_bar_init(uint64_t* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" : : "r"(tq_shared_addr((uint32_t*)bar)));
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");  // for the copy engine
}
__device__ __forceinline__ void tq_bar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];"
               : : "r"(tq_shared_addr((uint32_t*)bar)) : "memory");
}
__device__ __forceinline__ void tq_bulk_copy(uint32_t* dst, const uint32_t* src, uint32_t bytes,
                                             uint64_t* bar) {
  const uint32_t b = tq_shared_addr((uint32_t*)bar);
  // shared memory this warp read or wrote before is the copy engine's to write now
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
               : : "r"(b), "r"(bytes) : "memory");
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes"
               " [%0], [%1], %2, [%3];"
               : : "r"(tq_shared_addr(dst)), "l"(src), "r"(bytes), "r"(b) : "memory");
}
// Waits until the barrier's phase of this parity has completed.
__device__ __forceinline__ void tq_bar_wait(uint64_t* bar, uint32_t parity) {
  const uint32_t b = tq_shared_addr((uint32_t*)bar);
  uint32_t done = 0;
  while (!done) {
    asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                 " selp.u32 %0, 1, 0, p;\n}" : "=r"(done) : "r"(b), "r"(parity) : "memory");
  }
}
// v into the four words at p (16-byte aligned), one 128-bit store.
__device__ __forceinline__ void tq_fill4(uint32_t* p, uint32_t v) {
  *reinterpret_cast<uint4*>(p) = make_uint4(v, v, v, v);
}
// A register whose value does not matter (the A rows of an mma whose output rows are never
// read): no instruction sets it, so the compiler need not zero a register per mma.
__device__ __forceinline__ uint32_t tq_any_bits() {
  uint32_t v;
  asm("" : "=r"(v));
  return v;
}
// d += A B for one warp: A 16x16 fp16 (row major, 4 registers), B 16x8 fp16 (2 registers),
// d 16x8 fp32 (4 registers), in the fragment layout of the PTX ISA for m16n8k16.
__device__ __forceinline__ void tq_mma_16816(float* d, uint32_t a0, uint32_t a1, uint32_t a2,
                                             uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
"""

PRELUDE = r"""
  const int tq_tid = threadIdx.x;
  const int tq_bx = blockIdx.x;
  const int tq_by = blockIdx.y;
  (void)tq_by;
"""

# Static shared memory a block may use without opting in to more.
SHARED_BYTES = 48 * 1024

# Shared memory a block of the tensor-core kernel may take on GPUs whose SMs have 228 KiB
# and a copy engine (compute capability 9.0 and 10.x): bulk copies of token rows into
# stages, or wide table rows (twice the table space, one instruction less per lookup);
# three such blocks fit beside their 1 KiB reserves, as many as the kernel's registers
# allow. Measured on the H100 only; other GPUs get narrow rows and loads.
WIDE_SHARED_BYTES = 75 * 1024
_WIDE_ARCHS = ("sm_90", "sm_100", "sm_101", "sm_103")


@lru_cache(maxsize=None)
def wide_bytes() -> int:
    """WIDE_SHARED_BYTES on a GPU listed in _WIDE_ARCHS (mlx's device_info), else 0: the
    tensor-core plans' ``wide_bytes`` (launch.tensor_core_plan)."""
    if not available():
        return 0
    info = mx.device_info()
    arch = info.get("architecture")
    if not isinstance(arch, str) and "compute_capability_major" in info:
        arch = f"sm_{info['compute_capability_major']}{info.get('compute_capability_minor', 0)}"
    return WIDE_SHARED_BYTES if str(arch).lower().rstrip("a") in _WIDE_ARCHS else 0

# Decode builds the same few launches per layer at every step: replaying them (attention
# and the encode of new tokens) from an mx.compile graph cuts the host time per layer
# (measured on the H100).
COMPILED = True


def available() -> bool:
    return mx.cuda.is_available()


@lru_cache(maxsize=None)
def kernel(op: str, shared_memory: int = 0):
    """The ``mx.fast.cuda_kernel`` for ``op`` (a key of ``source.OPS``), or None without CUDA.
    ``shared_memory``: bytes of dynamic shared memory per block (``TQ_DYNAMIC_SHARED``)."""
    if not available():
        return None
    body, inputs, outputs = OPS[op]
    return mx.fast.cuda_kernel(
        name=f"turboquant_{op}",
        input_names=list(inputs),
        output_names=list(outputs),
        source=PRELUDE + body,
        header=HEADER,
        shared_memory=shared_memory,
    )


def decode_attention(queries, cache, scale, mask=None, sinks=None):
    return launch.decode_attention(
        kernel, SHARED_BYTES, queries, cache, scale, mask, sinks, compiled=COMPILED,
        wide_bytes=wide_bytes(),
    )


def encode(codec, x):
    return launch.encode(kernel, codec, x, compiled=COMPILED)


def encode_kv(key_codec, keys, value_codec, values):
    return launch.encode_kv(kernel, key_codec, keys, value_codec, values, compiled=COMPILED)


def encode_rows(key_codec, keys, value_codec, values):
    return launch.encode_rows(kernel, key_codec, keys, value_codec, values, compiled=COMPILED)


def append_rows(key_codec, keys, value_codec, values, cache):
    return launch.append_rows(kernel, key_codec, keys, value_codec, values, cache,
                              compiled=COMPILED)  # fmt: skip
