// CUDA kernels of the flow ops (ALGORITHM.md §3, §7, §8) with a thin C ABI for kernels/cuda_lib.py (ctypes).
// The math is kernels/reference/flow.py: `sde_step`'s per-element part and `flow_row_sums` with its backward.
//
//   unigrpo_sde_step_fwd   x, v, ξ [B, D], a, b, s [B] → x' = a·x + b·v + s·ξ, Σ_d (x' − μ)² [B], μ (optional)
//   unigrpo_flow_sums_fwd  v, ξ, v_old, v_ref [B, D] → [B, 3]: Σ ξ·(v − v_old), Σ (v − v_old)², Σ (v − v_ref)²
//   unigrpo_flow_sums_bwd  g [B, 3], v, ξ, v_old, v_ref → dv = g0·ξ + 2·g1·(v − v_old) + 2·g2·(v − v_ref)
//
// Decisions:
// - One launch covers all rows: a 1-D grid of B·chunks blocks, block i = (row i / chunks, chunk i % chunks),
//   so the paper's shape (B = 72 rows of D = 262,144) becomes thousands of blocks on an H100's 132 SMs
//   (unigrpo_flow_num_chunks → plan_num_chunks in flow_thread.cuh picks ~4 waves of 8 resident 256-thread
//   blocks per SM: 72 × 262,144 with bf16 v → 32 chunks per row, 2,304 blocks of 8,192 elements; fp32 v →
//   43 chunks). 1-D, so B is not limited to gridDim.y's 65,535.
// - __launch_bounds__(256, 3): nvcc 13.0 gave the bf16/fp16 vector kernels 104–128 registers without the
//   floor (2 blocks per SM); with it every kernel fits 80 registers with no spills on sm_80 and sm_90a
//   (≥ 3 blocks, 24 warps per SM — ample for a stream with 10 independent 16-byte loads per thread in
//   flight). A floor of 4 (64 registers) made the heaviest kernels spill.
// - Reductions are deterministic: fp32 per-thread accumulation in a fixed order, a __shfl_xor_sync butterfly
//   per warp, one shared-memory step across the 8 warps, a per-(row, chunk) partial written to the
//   caller's workspace, then a second tiny kernel (one warp per row) sums the partials in a fixed order. No
//   atomics: results are bit-identical run to run for the same inputs, chunk count and pointer alignment.
// - The vector (16-byte) or scalar path is chosen per call from the pointers' alignment (flow_thread.cuh);
//   the two paths sum in different orders, so results agree to rounding, not bit for bit.
// - Kernels are templated over v's dtype (fp32 / bf16 / fp16), the path, and the op's flags (want_mean,
//   use_old, use_ref), so a flag that is off costs no load and no branch.
// - The ABI: plain pointers, int64 sizes, an int dtype code, a cudaStream_t; each function returns a
//   cudaError_t as int (0 = success; cudaErrorInvalidValue for bad arguments) and only enqueues work — no
//   allocation, no synchronisation (safe under CUDA-graph capture). The caller owns every buffer.
#include <cstdint>

#include <cuda_runtime.h>

#include "flow_thread.cuh"

namespace unigrpo {
namespace {

constexpr int kAbiVersion = 1;

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Sums acc[K] over the block and writes the K totals to out (thread 0). Every thread must call it.
template <int K>
__device__ __forceinline__ void block_sum_store(float (&acc)[K], float* out) {
  __shared__ float red[K][kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) acc[k] = warp_sum(acc[k]);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) red[k][warp] = acc[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const float t = warp_sum(lane < kWarps ? red[k][lane] : 0.0f);
      if (lane == 0) out[k] = t;
    }
  }
}

template <class TV, bool kVector, bool kWantMean>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) sde_step_partial_kernel(const SdeArgs<TV> p) {
  constexpr int VEC = kVector ? TV::kVec : 1;
  const int64_t blk = blockIdx.x, row = blk / p.chunks, chunk = blk - row * p.chunks;
  float acc[1] = {0.0f};
  sde_step_thread<TV, VEC, kVector, kWantMean>(p, threadIdx.x, row, chunk, acc[0]);
  block_sum_store<1>(acc, p.part + blk);
}

template <class TV, bool kVector>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) flow_sums_partial_kernel(const SumsArgs<TV> p) {
  constexpr int VEC = kVector ? TV::kVec : 1;
  const int64_t blk = blockIdx.x, row = blk / p.chunks, chunk = blk - row * p.chunks;
  float acc[3] = {0.0f, 0.0f, 0.0f};
  flow_sums_thread<TV, VEC, kVector>(p, threadIdx.x, row, chunk, acc);
  block_sum_store<3>(acc, p.part + blk * 3);
}

template <class TV, bool kVector, bool kUseOld, bool kUseRef>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) flow_sums_bwd_kernel(const SumsBwdArgs<TV> p) {
  constexpr int VEC = kVector ? TV::kVec : 1;
  const int64_t blk = blockIdx.x, row = blk / p.chunks, chunk = blk - row * p.chunks;
  flow_sums_bwd_thread<TV, VEC, kVector, kUseOld, kUseRef>(p, threadIdx.x, row, chunk);
}

// out[row, k] = Σ_c part[row, c, k], one warp per row, fixed order (lane-strided, then a butterfly).
template <int K>
__global__ void __launch_bounds__(32) reduce_partials_kernel(const float* __restrict__ part,
                                                            float* __restrict__ out, int64_t chunks) {
  const int64_t row = blockIdx.x;
  const float* p = part + row * chunks * K;
  float acc[K];
#pragma unroll
  for (int k = 0; k < K; ++k) acc[k] = 0.0f;
  for (int64_t c = threadIdx.x; c < chunks; c += 32) {
#pragma unroll
    for (int k = 0; k < K; ++k) acc[k] += p[c * K + k];
  }
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const float t = warp_sum(acc[k]);
    if (threadIdx.x == 0) out[row * K + k] = t;
  }
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

bool valid_dtype(int code) { return code == kCodeF32 || code == kCodeBF16 || code == kCodeF16; }

// Common argument checks; returns cudaSuccess or cudaErrorInvalidValue.
cudaError_t check_sizes(int64_t B, int64_t D, int64_t chunks, int code) {
  if (B < 1 || D < 1 || chunks < 1 || !valid_dtype(code)) return cudaErrorInvalidValue;
  if (B > INT32_MAX / chunks) return cudaErrorInvalidValue;           // grid.x = B·chunks must fit
  if (D > INT64_MAX / B) return cudaErrorInvalidValue;                // B·D indexes must fit
  return cudaSuccess;
}

cudaError_t launched() { return cudaGetLastError(); }

template <int K>
cudaError_t reduce_partials(const float* part, float* out, int64_t B, int64_t chunks, cudaStream_t stream) {
  reduce_partials_kernel<K><<<static_cast<unsigned>(B), 32, 0, stream>>>(part, out, chunks);
  return launched();
}

template <class TV>
cudaError_t sde_step_launch(const void* x, const void* v, const void* xi, const float* a, const float* b,
                            const float* s, void* x_next, void* mean, float* sqsum, float* workspace,
                            int64_t B, int64_t D, int64_t chunks, cudaStream_t stream) {
  using S = typename TV::Storage;
  SdeArgs<TV> p{static_cast<const uint32_t*>(x), static_cast<const S*>(v), static_cast<const uint32_t*>(xi),
                a, b, s, static_cast<uint32_t*>(x_next), static_cast<uint32_t*>(mean), workspace, D, chunks, 0};
  const bool vec = aligned16(x) && aligned16(v) && aligned16(xi) && aligned16(x_next) &&
                   (mean == nullptr || aligned16(mean));
  const unsigned grid = static_cast<unsigned>(B * chunks);
  if (vec) {
    p.gpc = groups_per_chunk<TV::kVec>(D, chunks);
    if (mean) sde_step_partial_kernel<TV, true, true><<<grid, kThreads, 0, stream>>>(p);
    else sde_step_partial_kernel<TV, true, false><<<grid, kThreads, 0, stream>>>(p);
  } else {
    p.gpc = groups_per_chunk<1>(D, chunks);
    if (mean) sde_step_partial_kernel<TV, false, true><<<grid, kThreads, 0, stream>>>(p);
    else sde_step_partial_kernel<TV, false, false><<<grid, kThreads, 0, stream>>>(p);
  }
  const cudaError_t err = launched();
  if (err != cudaSuccess) return err;
  return reduce_partials<1>(workspace, sqsum, B, chunks, stream);
}

template <class TV>
cudaError_t flow_sums_launch(const void* v, const void* xi, const void* v_old, const void* v_ref, float* sums,
                             float* workspace, int64_t B, int64_t D, int64_t chunks, cudaStream_t stream) {
  using S = typename TV::Storage;
  SumsArgs<TV> p{static_cast<const S*>(v), static_cast<const uint32_t*>(xi), static_cast<const S*>(v_old),
                 static_cast<const S*>(v_ref), workspace, D, chunks, 0};
  const bool vec = aligned16(v) && aligned16(xi) && aligned16(v_old) && aligned16(v_ref);
  const unsigned grid = static_cast<unsigned>(B * chunks);
  if (vec) {
    p.gpc = groups_per_chunk<TV::kVec>(D, chunks);
    flow_sums_partial_kernel<TV, true><<<grid, kThreads, 0, stream>>>(p);
  } else {
    p.gpc = groups_per_chunk<1>(D, chunks);
    flow_sums_partial_kernel<TV, false><<<grid, kThreads, 0, stream>>>(p);
  }
  const cudaError_t err = launched();
  if (err != cudaSuccess) return err;
  return reduce_partials<3>(workspace, sums, B, chunks, stream);
}

template <class TV, bool kVector>
void flow_sums_bwd_dispatch(const SumsBwdArgs<TV>& p, bool use_old, bool use_ref, unsigned grid,
                            cudaStream_t stream) {
  if (use_old && use_ref) flow_sums_bwd_kernel<TV, kVector, true, true><<<grid, kThreads, 0, stream>>>(p);
  else if (use_old) flow_sums_bwd_kernel<TV, kVector, true, false><<<grid, kThreads, 0, stream>>>(p);
  else if (use_ref) flow_sums_bwd_kernel<TV, kVector, false, true><<<grid, kThreads, 0, stream>>>(p);
  else flow_sums_bwd_kernel<TV, kVector, false, false><<<grid, kThreads, 0, stream>>>(p);
}

template <class TV>
cudaError_t flow_sums_bwd_launch(const float* g, const void* v, const void* xi, const void* v_old,
                                 const void* v_ref, void* dv, int64_t B, int64_t D, int64_t chunks,
                                 bool use_old, bool use_ref, cudaStream_t stream) {
  using S = typename TV::Storage;
  SumsBwdArgs<TV> p{g, static_cast<const S*>(v), static_cast<const uint32_t*>(xi), static_cast<const S*>(v_old),
                    static_cast<const S*>(v_ref), static_cast<S*>(dv), D, chunks, 0};
  // Streams that are not read do not constrain the path.
  const bool vec = aligned16(xi) && aligned16(dv) && (!(use_old || use_ref) || aligned16(v)) &&
                   (!use_old || aligned16(v_old)) && (!use_ref || aligned16(v_ref));
  const unsigned grid = static_cast<unsigned>(B * chunks);
  if (vec) {
    p.gpc = groups_per_chunk<TV::kVec>(D, chunks);
    flow_sums_bwd_dispatch<TV, true>(p, use_old, use_ref, grid, stream);
  } else {
    p.gpc = groups_per_chunk<1>(D, chunks);
    flow_sums_bwd_dispatch<TV, false>(p, use_old, use_ref, grid, stream);
  }
  return launched();
}

}  // namespace
}  // namespace unigrpo

using namespace unigrpo;

extern "C" {

// Bumped whenever a signature below changes; cuda_lib.py refuses a library with another version.
int unigrpo_cuda_abi_version(void) { return kAbiVersion; }

const char* unigrpo_cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

// cudaSuccess when this library has machine code (or PTX) the current device can run; else the error
// (no device, driver too old for this runtime, no image for the device's architecture).
int unigrpo_cuda_probe(void) {
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, reduce_partials_kernel<1>);
  cudaGetLastError();  // do not leave the probe's error for the next launch check
  return static_cast<int>(err);
}

// Chunks per row for B rows of D elements with v of dtype `v_dtype` on a device with `sm_count` SMs; the
// workspace holds B·chunks·K fp32 (K = 1 for the sde step, 3 for the flow sums). -1 on bad arguments.
int64_t unigrpo_flow_num_chunks(int64_t B, int64_t D, int v_dtype, int sm_count) {
  return plan_num_chunks(B, D, v_dtype, sm_count);
}

// x_next = a·x + b·v + s·ξ; sqsum[r] = Σ_d (x_next − μ)² from the stored fp32 values; mean = μ if non-null.
// x, xi, x_next, mean: [B, D] fp32; v: [B, D] of v_dtype; a, b, s, sqsum: [B] fp32; workspace: B·chunks fp32.
int unigrpo_sde_step_fwd(const void* x, const void* v, const void* xi, const float* a, const float* b,
                         const float* s, void* x_next, void* mean, float* sqsum, float* workspace, int64_t B,
                         int64_t D, int64_t chunks, int v_dtype, cudaStream_t stream) {
  cudaError_t err = check_sizes(B, D, chunks, v_dtype);
  if (err != cudaSuccess) return err;
  if (!x || !v || !xi || !a || !b || !s || !x_next || !sqsum || !workspace) return cudaErrorInvalidValue;
  switch (v_dtype) {
    case kCodeF32: err = sde_step_launch<F32>(x, v, xi, a, b, s, x_next, mean, sqsum, workspace, B, D, chunks, stream); break;
    case kCodeBF16: err = sde_step_launch<BF16>(x, v, xi, a, b, s, x_next, mean, sqsum, workspace, B, D, chunks, stream); break;
    default: err = sde_step_launch<F16>(x, v, xi, a, b, s, x_next, mean, sqsum, workspace, B, D, chunks, stream); break;
  }
  return static_cast<int>(err);
}

// sums[r] = (Σ ξ·(v − v_old), Σ (v − v_old)², Σ (v − v_ref)²). v, v_old, v_ref: [B, D] of v_dtype; xi: [B, D]
// fp32; sums: [B, 3] fp32; workspace: B·chunks·3 fp32.
int unigrpo_flow_sums_fwd(const void* v, const void* xi, const void* v_old, const void* v_ref, float* sums,
                          float* workspace, int64_t B, int64_t D, int64_t chunks, int v_dtype,
                          cudaStream_t stream) {
  cudaError_t err = check_sizes(B, D, chunks, v_dtype);
  if (err != cudaSuccess) return err;
  if (!v || !xi || !v_old || !v_ref || !sums || !workspace) return cudaErrorInvalidValue;
  switch (v_dtype) {
    case kCodeF32: err = flow_sums_launch<F32>(v, xi, v_old, v_ref, sums, workspace, B, D, chunks, stream); break;
    case kCodeBF16: err = flow_sums_launch<BF16>(v, xi, v_old, v_ref, sums, workspace, B, D, chunks, stream); break;
    default: err = flow_sums_launch<F16>(v, xi, v_old, v_ref, sums, workspace, B, D, chunks, stream); break;
  }
  return static_cast<int>(err);
}

// dv = g0·ξ + 2·g1·(v − v_old)·[use_old] + 2·g2·(v − v_ref)·[use_ref]. g: [B, 3] fp32; v, v_old, v_ref, dv:
// [B, D] of v_dtype (a stream whose flag is off is never read and may be null); xi: [B, D] fp32.
int unigrpo_flow_sums_bwd(const float* g, const void* v, const void* xi, const void* v_old, const void* v_ref,
                          void* dv, int64_t B, int64_t D, int64_t chunks, int v_dtype, int use_old, int use_ref,
                          cudaStream_t stream) {
  cudaError_t err = check_sizes(B, D, chunks, v_dtype);
  if (err != cudaSuccess) return err;
  if (!g || !xi || !dv || ((use_old || use_ref) && !v) || (use_old && !v_old) || (use_ref && !v_ref))
    return cudaErrorInvalidValue;
  const bool uo = use_old != 0, ur = use_ref != 0;
  switch (v_dtype) {
    case kCodeF32: err = flow_sums_bwd_launch<F32>(g, v, xi, v_old, v_ref, dv, B, D, chunks, uo, ur, stream); break;
    case kCodeBF16: err = flow_sums_bwd_launch<BF16>(g, v, xi, v_old, v_ref, dv, B, D, chunks, uo, ur, stream); break;
    default: err = flow_sums_bwd_launch<F16>(g, v, xi, v_old, v_ref, dv, B, D, chunks, uo, ur, stream); break;
  }
  return static_cast<int>(err);
}

}  // extern "C"
