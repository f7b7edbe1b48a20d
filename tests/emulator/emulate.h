// Runs a kernel body of mlx_lm_turboquant/kernels/source.py on the CPU, one std::thread per
// GPU thread and one block at a time, so CI can check the kernels' arithmetic, indexing and
// synchronization without a GPU. Shared memory is a function-local static (one block runs
// at a time); a warp is 32 threads meeting at a std::barrier.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

struct tq_half {
  uint16_t bits;
};
float tq_emu_h2f(tq_half h);
tq_half tq_emu_f2h(float x);
// The model dtypes as kernels see them: converted to and from float with static_cast.
struct tq_f16 {
  tq_half h;
  tq_f16() = default;
  tq_f16(float x) : h(tq_emu_f2h(x)) {}
  operator float() const { return tq_emu_h2f(h); }
};
struct tq_bf16 {
  uint16_t bits;
  tq_bf16() = default;
  tq_bf16(float x) {
    uint32_t b;
    std::memcpy(&b, &x, 4);
    bits = (uint16_t)((b + 0x7FFF + ((b >> 16) & 1)) >> 16);
  }
  operator float() const {
    uint32_t b = (uint32_t)bits << 16;
    float f;
    std::memcpy(&f, &b, 4);
    return f;
  }
};
struct float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
struct float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }

inline float tq_emu_h2f(tq_half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return (float)f;
}
inline tq_half tq_emu_f2h(float x) {
  _Float16 f = (_Float16)x;
  tq_half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}

thread_local int tq_emu_tid, tq_emu_bx, tq_emu_by;
static std::barrier<>* tq_emu_block_barrier;
static std::vector<std::barrier<>*> tq_emu_warp_barriers;
static float tq_emu_lanes[1024];

#define TQ_SHARED static
#define TQ_SHARED_PTR(T) T*
#define TQ_ALIGN16 __attribute__((aligned(16)))
// The launch's shared_memory (bytes) must cover what the kernel declares: a shortfall is
// recorded (the largest one) for the launcher to raise.
static size_t tq_emu_dynamic_bytes;
static std::atomic<size_t> tq_emu_dynamic_short{0};
inline void tq_emu_check_dynamic(size_t need) {
  if (need > tq_emu_dynamic_bytes) tq_emu_dynamic_short = need;
}
#define TQ_DYNAMIC_SHARED(T, name, n) \
  static TQ_ALIGN16 T name[n];        \
  tq_emu_check_dynamic(sizeof(T) * (n))
#define TQ_BARRIER() tq_emu_block_barrier->arrive_and_wait()
#define TQ_UNROLL
#define TQ_UNROLL8
#define TQ_UNROLL32
#define TQ_STORE_HALF_BITS(w, i, h, b) \
  do { const uint16_t tq_b = (uint16_t)(b); std::memcpy((char*)((w) + (i)) + 2 * (h), &tq_b, 2); } while (0)
#define TQ_INF INFINITY
#define TQ_HALF_TO_FLOAT(h) static_cast<float>(h)
#define TQ_TO_HALF(x) tq_f16(x)

inline float tq_max(float a, float b) { return std::fmax(a, b); }
inline float tq_exp(float x) { return std::exp(x); }
#define TQ_LOG2E 1.4426950408889634f
inline float tq_exp2(float x) { return std::exp2(x); }
inline float tq_sqrt(float x) { return std::sqrt(x); }
inline float tq_wrap(float x) {
  const float k = std::rint(x * 0.15915494f);
  return std::fma(-k, -1.7484555e-07f, std::fma(-k, 6.2831855f, x));
}
inline float tq_sin(float x) { return std::sin(tq_wrap(x)); }
inline float tq_cos(float x) { return std::cos(tq_wrap(x)); }
inline float tq_as_float(int bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline float tq_half_bits(uint32_t h) { return tq_emu_h2f(tq_half{(uint16_t)h}); }
inline uint32_t tq_half_word(float x) { return tq_emu_f2h(x).bits; }
inline float tq_bf16_bits(uint32_t h) {
  uint32_t b = h << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

template <typename Op>
inline float tq_emu_warp_reduce(float v, Op op) {
  const int warp = tq_emu_tid / 32, base = warp * 32;
  tq_emu_lanes[tq_emu_tid] = v;
  tq_emu_warp_barriers[warp]->arrive_and_wait();
  float r = tq_emu_lanes[base];
  for (int i = 1; i < 32; ++i) r = op(r, tq_emu_lanes[base + i]);
  tq_emu_warp_barriers[warp]->arrive_and_wait();
  return r;
}
inline float tq_warp_sum(float v) {
  return tq_emu_warp_reduce(v, [](float a, float b) { return a + b; });
}
inline bool tq_warp_any(bool p) {
  return tq_emu_warp_reduce(p ? 1.0f : 0.0f, [](float a, float b) { return std::fmax(a, b); }) > 0;
}
inline float tq_warp_max(float v) {
  return tq_emu_warp_reduce(v, [](float a, float b) { return std::fmax(a, b); });
}

// Lane exchange within a warp: every lane publishes, then reads another's value.
inline float tq_shfl(float v, int src) {
  const int warp = tq_emu_tid / 32;
  tq_emu_lanes[tq_emu_tid] = v;
  tq_emu_warp_barriers[warp]->arrive_and_wait();
  const float r = tq_emu_lanes[warp * 32 + (src & 31)];
  tq_emu_warp_barriers[warp]->arrive_and_wait();
  return r;
}
inline float tq_shfl_xor(float v, int m) { return tq_shfl(v, (tq_emu_tid & 31) ^ m); }
inline uint32_t tq_funnel(uint32_t lo, uint32_t hi, int shift) {
  return (uint32_t)(((((uint64_t)hi) << 32) | lo) >> (shift & 31));
}
inline uint32_t tq_pack_half2(float lo, float hi) {
  return (uint32_t)tq_emu_f2h(lo).bits | ((uint32_t)tq_emu_f2h(hi).bits << 16);
}
inline float tq_emu_half(uint32_t word, int i) {
  return tq_emu_h2f(tq_half{(uint16_t)(word >> (16 * i))});
}
typedef uintptr_t tq_saddr_t;
inline tq_saddr_t tq_shared_addr(const uint32_t* p) { return (tq_saddr_t)p; }
inline uint32_t tq_lds(tq_saddr_t a) { return *reinterpret_cast<const uint32_t*>(a); }
inline uint32_t tq_byte(uint32_t w, int k) { return (w >> (8 * k)) & 0xFFu; }
inline tq_saddr_t tq_uniform_addr(tq_saddr_t a) { return a; }
inline uint32_t tq_pair_addr(uint32_t w, int k, uint32_t lane_off) {
  return (tq_byte(w, k) << 8) | (lane_off & 0xFFu);
}
// Blocks run one at a time, so the cross-block hand-off needs no more than this.
inline void tq_fence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline uint32_t tq_atomic_inc(const uint32_t* c) { return (*const_cast<uint32_t*>(c))++; }
inline void tq_atomic_reset(const uint32_t* c) { *const_cast<uint32_t*>(c) = 0u; }
inline float4 tq_load_cg4(const float4* p) { return *p; }
inline float2 tq_load_cg2(const float2* p) { return *p; }
inline void tq_prefetch_l2(const void*) {}
// Bulk copies: done at once by the issuing lane, completing the barrier's phase (a count of
// completed phases); waiters spin. Misaligned copies are recorded for the launcher to raise
// (on a GPU they fault).
static std::atomic<int> tq_emu_misaligned{0};
inline void tq_warp_sync() {
  tq_emu_warp_barriers[tq_emu_tid / 32]->arrive_and_wait();
}
inline void tq_bar_init(uint64_t* bar) { std::atomic_ref<uint64_t>(*bar).store(0); }
inline void tq_bar_arrive(uint64_t* bar) { std::atomic_ref<uint64_t>(*bar).fetch_add(1); }
inline void tq_bulk_copy(uint32_t* dst, const uint32_t* src, uint32_t bytes, uint64_t* bar) {
  if ((((uintptr_t)dst) | ((uintptr_t)src) | bytes) & 15u) tq_emu_misaligned = 1;
  std::memcpy(dst, src, bytes);
  tq_bar_arrive(bar);
}
inline void tq_bar_wait(uint64_t* bar, uint32_t parity) {
  while ((std::atomic_ref<uint64_t>(*bar).load() & 1u) == parity) std::this_thread::yield();
}
inline void tq_fill4(uint32_t* p, uint32_t v) { p[0] = p[1] = p[2] = p[3] = v; }

// Rows the kernel never reads get NaNs here: a kernel that read them would fail its tests.
inline uint32_t tq_any_bits() { return 0x7E007E00u; }

// mma.sync m16n8k16 (fp16 x fp16 + fp32) with the PTX ISA's fragment layout: lane =
// 4 * group + t; A rows group / group + 8, columns 2t + {0, 1} (+ 8); B columns (n) group,
// rows (k) 2t + {0, 1} (+ 8); C / D rows group / group + 8, columns 2t + {0, 1}.
static uint32_t tq_emu_ma[1024][4], tq_emu_mb[1024][2];
inline void tq_mma_16816(float* d, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                         uint32_t b0, uint32_t b1) {
  const int warp = tq_emu_tid / 32, base = warp * 32, lane = tq_emu_tid & 31;
  const uint32_t a[4] = {a0, a1, a2, a3};
  for (int i = 0; i < 4; ++i) tq_emu_ma[tq_emu_tid][i] = a[i];
  tq_emu_mb[tq_emu_tid][0] = b0;
  tq_emu_mb[tq_emu_tid][1] = b1;
  tq_emu_warp_barriers[warp]->arrive_and_wait();
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int gr = l / 4, t = l % 4;
    for (int i = 0; i < 8; ++i) {  // half i of A's four registers
      const int row = gr + 8 * ((i / 2) % 2), col = 2 * t + (i % 2) + 8 * (i / 4);
      A[row][col] = tq_emu_half(tq_emu_ma[base + l][i / 2], i % 2);
    }
    for (int i = 0; i < 4; ++i) {
      B[2 * t + (i % 2) + 8 * (i / 2)][gr] = tq_emu_half(tq_emu_mb[base + l][i / 2], i % 2);
    }
  }
  tq_emu_warp_barriers[warp]->arrive_and_wait();
  const int gr = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = gr + 8 * (i / 2), col = 2 * t + (i % 2);
    float s = d[i];
    for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
    d[i] = s;
  }
}

// Rows of blocks with an odd blockIdx.y run their blocks last to first: a GPU promises no
// order, and a kernel that relied on one would then fail.
template <typename F>
void tq_emu_launch(int gx, int gy, int nt, F body) {
  for (int by = 0; by < gy; ++by) {
    for (int i = 0; i < gx; ++i) {
      const int bx = by % 2 ? gx - 1 - i : i;
      std::barrier<> block(nt);
      tq_emu_block_barrier = &block;
      std::vector<std::barrier<>*> warps;
      for (int w = 0; w < (nt + 31) / 32; ++w) warps.push_back(new std::barrier<>(32));
      tq_emu_warp_barriers = warps;
      std::vector<std::thread> threads;
      for (int t = 0; t < nt; ++t) {
        threads.emplace_back([=] {
          tq_emu_tid = t;
          tq_emu_bx = bx;
          tq_emu_by = by;
          body();
        });
      }
      for (auto& th : threads) th.join();
      for (auto* w : warps) delete w;
    }
  }
}
