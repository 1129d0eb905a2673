// Per-thread bodies of the CUDA flow kernels (ALGORITHM.md §3, §7, §8), shared by kernels/cuda/flow.cu and
// by a host-side emulation test (tests/test_ops_flow_cuda.py runs every thread of every block on the CPU and
// checks coverage, indexing, alignment and dtype decoding without a GPU).
//
// Shape legend: B rows, D elements per row; row r owns global elements [r·D, r·D + D) of each [B, D] stream.
//
// Decisions:
// - Everything that touches memory is __host__ __device__ (UG_HD): the element-ownership arithmetic is the
//   riskiest part of a streaming kernel and the only part a CPU can check. The warp/block reductions are
//   device-only and live in flow.cu.
// - Vector path: when every base pointer is 16-byte aligned, elements are processed in groups of
//   VEC = 16 / sizeof(v's dtype) (8 for bf16/fp16, 4 for fp32) at global indices that are multiples of
//   VEC, so each stream is read with 16-byte loads (fp32 streams with VEC/4 of them). A row that does not
//   start or end on a VEC boundary (D % VEC != 0) has a scalar head and tail of < VEC elements each,
//   handled by the threads of chunk 0: any D works and the body stays vectorised.
//   Scalar path (a base pointer not 16-byte aligned, e.g. a view with a storage offset): the same code
//   with VEC = 1 and scalar loads.
// - A row's body groups are split into chunks of `gpc` groups (groups per chunk); block (row, chunk) owns
//   groups [chunk·gpc, min(groups, (chunk+1)·gpc)). Threads stride by kThreads and handle kUnroll groups
//   per loop trip, all loads issued before any use (several independent 16-byte loads in flight).
// - Elements are decoded from raw bits (bf16: bits << 16; fp16: the cuda_fp16 conversion) into fp32 right
//   after the load; all math is fp32 with explicit fmaf, one down-cast at the store (round to nearest even).
// - Indices are int64: B·D passes 2^31 for large batches.
#pragma once

#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define UG_HD __host__ __device__ __forceinline__

// Hook for the host emulation test: checks that every 16-byte access is 16-byte aligned (x86 would not fault).
#ifndef UNIGRPO_CHECK_ALIGNED16
#define UNIGRPO_CHECK_ALIGNED16(ptr) ((void)0)
#endif

namespace unigrpo {

// dtype codes of the C ABI (mirrored by kernels/cuda_lib.py)
enum DTypeCode : int { kCodeF32 = 0, kCodeBF16 = 1, kCodeF16 = 2 };

constexpr int kThreads = 256;  // threads per block of the streaming kernels
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 2;     // body groups per thread per loop trip
constexpr int kMinBlocksPerSm = 3;  // __launch_bounds__ floor: caps registers at 80, no spills (see flow.cu)

UG_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

UG_HD float bits_to_f32(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

UG_HD uint32_t f32_to_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// Element types: raw storage, 16-byte group size, decode to / encode from fp32.
struct F32 {
  using Storage = uint32_t;
  static constexpr int kVec = 4;
  static UG_HD float decode(uint32_t b) { return bits_to_f32(b); }
  static UG_HD uint32_t encode(float f) { return f32_to_bits(f); }
};
struct BF16 {
  using Storage = uint16_t;
  static constexpr int kVec = 8;
  static UG_HD float decode(uint16_t b) { return bits_to_f32(static_cast<uint32_t>(b) << 16); }
  static UG_HD uint16_t encode(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
};
struct F16 {
  using Storage = uint16_t;
  static constexpr int kVec = 8;
  static UG_HD float decode(uint16_t b) { return __half2float(__ushort_as_half(b)); }
  static UG_HD uint16_t encode(float f) { return __half_as_ushort(__float2half_rn(f)); }
};

UG_HD uint32_t word_of(const uint4& q, int j) { return j == 0 ? q.x : j == 1 ? q.y : j == 2 ? q.z : q.w; }

// N elements of type TT at p into fp32. kVector: p is 16-byte aligned and N·sizeof(Storage) is a multiple of
// 16 (one or more 16-byte loads); otherwise N scalar loads. All indices are compile-time after unrolling.
template <class TT, int N, bool kVector>
UG_HD void load_group(const typename TT::Storage* p, float (&out)[N]) {
  using S = typename TT::Storage;
  if constexpr (kVector) {
    static_assert((N * sizeof(S)) % 16 == 0, "a vector group must be whole 16-byte words");
    constexpr int kWords = static_cast<int>(N * sizeof(S) / 16);
    UNIGRPO_CHECK_ALIGNED16(p);
    uint4 q[kWords];
#pragma unroll
    for (int w = 0; w < kWords; ++w) q[w] = reinterpret_cast<const uint4*>(p)[w];
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if constexpr (sizeof(S) == 4) {
        out[i] = TT::decode(word_of(q[i / 4], i % 4));
      } else {
        const uint32_t w = word_of(q[i / 8], (i / 2) % 4);
        out[i] = TT::decode(static_cast<S>((i % 2) ? (w >> 16) : (w & 0xffffu)));
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = TT::decode(p[i]);
  }
}

// N fp32 values encoded as TT into p (same alignment rules as load_group).
template <class TT, int N, bool kVector>
UG_HD void store_group(typename TT::Storage* p, const float (&val)[N]) {
  using S = typename TT::Storage;
  if constexpr (kVector) {
    static_assert((N * sizeof(S)) % 16 == 0, "a vector group must be whole 16-byte words");
    constexpr int kWords = static_cast<int>(N * sizeof(S) / 16);
    UNIGRPO_CHECK_ALIGNED16(p);
#pragma unroll
    for (int w = 0; w < kWords; ++w) {
      uint32_t c[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if constexpr (sizeof(S) == 4) {
          c[j] = TT::encode(val[4 * w + j]);
        } else {
          c[j] = static_cast<uint32_t>(TT::encode(val[8 * w + 2 * j])) |
                 (static_cast<uint32_t>(TT::encode(val[8 * w + 2 * j + 1])) << 16);
        }
      }
#ifdef __CUDA_ARCH__
      // an explicit 16-byte store: nvcc 13.0 split the plain uint4 assignment of the first unrolled group
      // into four 4-byte stores (seen in the PTX); __stwb keeps the default write-back cache policy
      __stwb(reinterpret_cast<uint4*>(p) + w, make_uint4(c[0], c[1], c[2], c[3]));
#else
      reinterpret_cast<uint4*>(p)[w] = make_uint4(c[0], c[1], c[2], c[3]);
#endif
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = TT::encode(val[i]);
  }
}

// The elements of one row, by global index: a scalar head, `groups` aligned groups of VEC, a scalar tail.
struct RowSpan {
  int64_t head_begin, head_len;  // scalar elements [head_begin, head_begin + head_len)
  int64_t body_begin, groups;    // group g covers [body_begin + g·VEC, body_begin + (g+1)·VEC)
  int64_t tail_begin, tail_len;  // scalar elements [tail_begin, tail_begin + tail_len)
};

template <int VEC>
UG_HD RowSpan row_span(int64_t row, int64_t D) {
  static_assert(2 * VEC <= kThreads, "head and tail are handled by one thread per element");
  const int64_t s = row * D, e = s + D;
  const int64_t as = (s + VEC - 1) / VEC * VEC;  // first VEC boundary at or after s
  const int64_t ae = e / VEC * VEC;              // last VEC boundary at or before e
  if (as >= ae) return RowSpan{s, D, as, 0, e, 0};  // no whole aligned group: all scalar (D ≤ 2·VEC − 2)
  return RowSpan{s, as - s, as, (ae - as) / VEC, ae, e - ae};
}

// Groups per chunk for a grid of `chunks` chunks per row: covers the longest body (⌊D/VEC⌋ groups), rounded
// up to whole loop trips of the block. Any chunks ≥ 1 is correct; the planner only picks a fast one.
template <int VEC>
UG_HD int64_t groups_per_chunk(int64_t D, int64_t chunks) {
  const int64_t per_trip = int64_t(kThreads) * kUnroll;
  const int64_t groups = D / VEC > 0 ? D / VEC : 1;
  const int64_t gpc = (groups + chunks - 1) / chunks;
  return (gpc + per_trip - 1) / per_trip * per_trip;
}

// Chunks per row for B rows of D elements with v of dtype `code` on `sm_count` SMs: about kWaves waves of
// kBlocksPerSm blocks over the GPU (≥ 3 resident by the launch bounds, up to 8 when registers allow), never
// more chunks than the row has loop trips of work, B·chunks < 2^31. -1 on bad arguments.
inline int64_t plan_num_chunks(int64_t B, int64_t D, int code, int sm_count) {
  constexpr int64_t kBlocksPerSm = 2048 / kThreads, kWaves = 4;
  if (B < 1 || D < 1 || sm_count < 1 || (code != kCodeF32 && code != kCodeBF16 && code != kCodeF16)) return -1;
  const int64_t vec = code == kCodeF32 ? F32::kVec : BF16::kVec;
  const int64_t per_trip = int64_t(kThreads) * kUnroll;
  const int64_t groups = D / vec;
  const int64_t trips = groups > per_trip ? (groups + per_trip - 1) / per_trip : 1;  // loop trips per row
  const int64_t target = int64_t(sm_count) * kBlocksPerSm * kWaves;
  int64_t chunks = (target + B - 1) / B;
  if (chunks > trips) chunks = trips;
  const int64_t trips_per_chunk = (trips + chunks - 1) / chunks;
  chunks = (trips + trips_per_chunk - 1) / trips_per_chunk;  // no chunk left without work
  if (chunks > INT32_MAX / B) chunks = INT32_MAX / B;
  return chunks < 1 ? -1 : chunks;
}

// ------------------------------------------------------------------------------------------- sde step

template <class TV>
struct SdeArgs {
  const uint32_t* x;                  // [B, D] fp32
  const typename TV::Storage* v;      // [B, D] TV
  const uint32_t* xi;                 // [B, D] fp32
  const float *a, *b, *s;             // [B] fp32
  uint32_t* x_next;                   // [B, D] fp32 out
  uint32_t* mean;                     // [B, D] fp32 out (only with kWantMean)
  float* part;                        // [B, chunks] fp32 partial Σ (x' − μ)²
  int64_t D, chunks, gpc;
};

// μ = a·x + b·v, x' = μ + s·ξ, acc += (x' − μ)² from the values as stored (fp32).
template <class TV, int VEC, bool kVector, bool kWantMean>
UG_HD void sde_step_thread(const SdeArgs<TV>& p, int tid, int64_t row, int64_t chunk, float& acc) {
  const RowSpan sp = row_span<VEC>(row, p.D);
  const float a = p.a[row], b = p.b[row], s = p.s[row];
  const int64_t g_lo = chunk * p.gpc;
  const int64_t g_hi = min64(sp.groups, g_lo + p.gpc);
  for (int64_t g = g_lo + tid; g < g_hi; g += int64_t(kThreads) * kUnroll) {
    float x[kUnroll][VEC], v[kUnroll][VEC], xi[kUnroll][VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t gu = g + int64_t(u) * kThreads;
      if (gu < g_hi) {
        const int64_t e = sp.body_begin + gu * VEC;
        load_group<F32, VEC, kVector>(p.x + e, x[u]);
        load_group<TV, VEC, kVector>(p.v + e, v[u]);
        load_group<F32, VEC, kVector>(p.xi + e, xi[u]);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) x[u][i] = v[u][i] = xi[u][i] = 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float mu[VEC], xn[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        mu[i] = fmaf(a, x[u][i], b * v[u][i]);
        xn[i] = fmaf(s, xi[u][i], mu[i]);
        const float d = xn[i] - mu[i];
        acc = fmaf(d, d, acc);
      }
      const int64_t gu = g + int64_t(u) * kThreads;
      if (gu < g_hi) {
        const int64_t e = sp.body_begin + gu * VEC;
        store_group<F32, VEC, kVector>(p.x_next + e, xn);
        if constexpr (kWantMean) store_group<F32, VEC, kVector>(p.mean + e, mu);
      }
    }
  }
  if (chunk == 0) {
#pragma unroll
    for (int part = 0; part < 2; ++part) {
      const int64_t len = part == 0 ? sp.head_len : sp.tail_len;
      if (tid < len) {
        const int64_t e = (part == 0 ? sp.head_begin : sp.tail_begin) + tid;
        const float mu = fmaf(a, F32::decode(p.x[e]), b * TV::decode(p.v[e]));
        const float xn = fmaf(s, F32::decode(p.xi[e]), mu);
        const float d = xn - mu;
        acc = fmaf(d, d, acc);
        p.x_next[e] = F32::encode(xn);
        if constexpr (kWantMean) p.mean[e] = F32::encode(mu);
      }
    }
  }
}

// ------------------------------------------------------------------------------------ flow row sums

template <class TV>
struct SumsArgs {
  const typename TV::Storage* v;      // [B, D] TV
  const uint32_t* xi;                 // [B, D] fp32
  const typename TV::Storage* v_old;  // [B, D] TV
  const typename TV::Storage* v_ref;  // [B, D] TV
  float* part;                        // [B, chunks, 3] fp32 partial sums
  int64_t D, chunks, gpc;
};

UG_HD void sums_accumulate(float v, float xi, float vo, float vr, float (&acc)[3]) {
  const float d_old = v - vo, d_ref = v - vr;
  acc[0] = fmaf(xi, d_old, acc[0]);
  acc[1] = fmaf(d_old, d_old, acc[1]);
  acc[2] = fmaf(d_ref, d_ref, acc[2]);
}

// acc += (ξ·(v − v_old), (v − v_old)², (v − v_ref)²) over this thread's elements.
template <class TV, int VEC, bool kVector>
UG_HD void flow_sums_thread(const SumsArgs<TV>& p, int tid, int64_t row, int64_t chunk, float (&acc)[3]) {
  const RowSpan sp = row_span<VEC>(row, p.D);
  const int64_t g_lo = chunk * p.gpc;
  const int64_t g_hi = min64(sp.groups, g_lo + p.gpc);
  for (int64_t g = g_lo + tid; g < g_hi; g += int64_t(kThreads) * kUnroll) {
    float v[kUnroll][VEC], xi[kUnroll][VEC], vo[kUnroll][VEC], vr[kUnroll][VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t gu = g + int64_t(u) * kThreads;
      if (gu < g_hi) {
        const int64_t e = sp.body_begin + gu * VEC;
        load_group<TV, VEC, kVector>(p.v + e, v[u]);
        load_group<F32, VEC, kVector>(p.xi + e, xi[u]);
        load_group<TV, VEC, kVector>(p.v_old + e, vo[u]);
        load_group<TV, VEC, kVector>(p.v_ref + e, vr[u]);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[u][i] = xi[u][i] = vo[u][i] = vr[u][i] = 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) sums_accumulate(v[u][i], xi[u][i], vo[u][i], vr[u][i], acc);
    }
  }
  if (chunk == 0) {
#pragma unroll
    for (int part = 0; part < 2; ++part) {
      const int64_t len = part == 0 ? sp.head_len : sp.tail_len;
      if (tid < len) {
        const int64_t e = (part == 0 ? sp.head_begin : sp.tail_begin) + tid;
        sums_accumulate(TV::decode(p.v[e]), F32::decode(p.xi[e]), TV::decode(p.v_old[e]),
                        TV::decode(p.v_ref[e]), acc);
      }
    }
  }
}

// ------------------------------------------------------------------------------- flow row sums, bwd

template <class TV>
struct SumsBwdArgs {
  const float* g;                     // [B, 3] fp32 upstream gradient of the sums
  const typename TV::Storage* v;      // [B, D] TV (read only with use_old or use_ref)
  const uint32_t* xi;                 // [B, D] fp32
  const typename TV::Storage* v_old;  // [B, D] TV (read only with use_old)
  const typename TV::Storage* v_ref;  // [B, D] TV (read only with use_ref)
  typename TV::Storage* dv;           // [B, D] TV out
  int64_t D, chunks, gpc;
};

// dv = g0·ξ + 2·g1·(v − v_old)·[kUseOld] + 2·g2·(v − v_ref)·[kUseRef] in fp32, one rounding at the store.
template <bool kUseOld, bool kUseRef>
UG_HD float sums_bwd_elem(float g0, float g1x2, float g2x2, float v, float xi, float vo, float vr) {
  float r = g0 * xi;
  if constexpr (kUseOld) r = fmaf(g1x2, v - vo, r);
  if constexpr (kUseRef) r = fmaf(g2x2, v - vr, r);
  return r;
}

template <class TV, int VEC, bool kVector, bool kUseOld, bool kUseRef>
UG_HD void flow_sums_bwd_thread(const SumsBwdArgs<TV>& p, int tid, int64_t row, int64_t chunk) {
  constexpr bool kReadV = kUseOld || kUseRef;
  const RowSpan sp = row_span<VEC>(row, p.D);
  const float g0 = p.g[row * 3];
  const float g1x2 = kUseOld ? 2.0f * p.g[row * 3 + 1] : 0.0f;
  const float g2x2 = kUseRef ? 2.0f * p.g[row * 3 + 2] : 0.0f;
  const int64_t g_lo = chunk * p.gpc;
  const int64_t g_hi = min64(sp.groups, g_lo + p.gpc);
  for (int64_t g = g_lo + tid; g < g_hi; g += int64_t(kThreads) * kUnroll) {
    float v[kUnroll][VEC], xi[kUnroll][VEC], vo[kUnroll][VEC], vr[kUnroll][VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[u][i] = xi[u][i] = vo[u][i] = vr[u][i] = 0.0f;
      const int64_t gu = g + int64_t(u) * kThreads;
      if (gu < g_hi) {
        const int64_t e = sp.body_begin + gu * VEC;
        load_group<F32, VEC, kVector>(p.xi + e, xi[u]);
        if constexpr (kReadV) load_group<TV, VEC, kVector>(p.v + e, v[u]);
        if constexpr (kUseOld) load_group<TV, VEC, kVector>(p.v_old + e, vo[u]);
        if constexpr (kUseRef) load_group<TV, VEC, kVector>(p.v_ref + e, vr[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float dv[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i)
        dv[i] = sums_bwd_elem<kUseOld, kUseRef>(g0, g1x2, g2x2, v[u][i], xi[u][i], vo[u][i], vr[u][i]);
      const int64_t gu = g + int64_t(u) * kThreads;
      if (gu < g_hi) store_group<TV, VEC, kVector>(p.dv + sp.body_begin + gu * VEC, dv);
    }
  }
  if (chunk == 0) {
#pragma unroll
    for (int part = 0; part < 2; ++part) {
      const int64_t len = part == 0 ? sp.head_len : sp.tail_len;
      if (tid < len) {
        const int64_t e = (part == 0 ? sp.head_begin : sp.tail_begin) + tid;
        const float v = kReadV ? TV::decode(p.v[e]) : 0.0f;
        const float vo = kUseOld ? TV::decode(p.v_old[e]) : 0.0f;
        const float vr = kUseRef ? TV::decode(p.v_ref[e]) : 0.0f;
        p.dv[e] = TV::encode(sums_bwd_elem<kUseOld, kUseRef>(g0, g1x2, g2x2, v, F32::decode(p.xi[e]), vo, vr));
      }
    }
  }
}

}  // namespace unigrpo
