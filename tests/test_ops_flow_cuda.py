"""Tests of the CUDA backend of the flow ops: kernels/cuda/*.cu (through kernels/cuda_lib.py) against float64
torch computations of the same formulas (kernels/reference/flow.py: `sde_step`'s per-element part,
`flow_row_sums` and its gradient).

Layers:
- CPU, needs nvcc: the .cu sources compile for sm_80 and sm_90a with no register spills or stack frames;
  a host emulation runs the kernels' per-thread bodies (flow_thread.cuh) for every thread of every block
  and checks, bit for bit, that every element is read and written exactly once by its own row, that all
  16-byte accesses are aligned, that flags that are off read nothing, and that guard zones stay untouched.
- CPU: cuda_lib's argument errors name the bad value; the backend is unavailable without a GPU; the
  tolerance checkers below accept a torch fp32 computation of the same math and reject a perturbed one.
- GPU (skipped without a CUDA device or the library): the three functions vs float64 over random shapes
  (hypothesis: odd D, D % 8 != 0 so the scalar head/tail run, misaligned bases so the scalar path runs,
  forced chunk counts), outputs and workspace poisoned with NaN before each run, two runs bit-identical;
  and the paper's shape (B = 72, D = 262,144).

Shape legend: B rows, D latent elements per row.

Tolerances: |got − ref64| ≤ atol + rtol·scale, ref64 the float64 formula on the same (already rounded)
inputs, scale = Σ|addends| (elementwise: the formula's terms, e.g. |a·x| + |b·v| + |s·ξ|; row sums:
Σ_d |term_d|), so cancellation never makes a bound tighter than fp32 can deliver. u = 2^-24.
| output                      | dtype | atol   | rtol  | why                                                   |
|-----------------------------|-------|--------|-------|-------------------------------------------------------|
| x', μ, dv (elementwise)     | fp32  | 1e-30  | 1e-6  | ≤ 5 fp32 roundings of ≤ u·scale each; 1e-6 ≈ 16u      |
| dv                          | bf16  | 1e-30  | 2^-8  | + one round-to-nearest to bf16 (≤ 2^-9·scale): 2×     |
| dv                          | fp16  | 2^-24  | 2^-10 | + one rounding to fp16: 2^-11 relative, 2^-25 absolute |
|                             |       |        |       | below 2^-14 (subnormals): 2×                          |
| row sums, Σ (x' − μ)²       | fp32  | 1e-30  | 1e-5  | fp32 accumulation; per thread ≤ D/256 serial adds, an |
|                             |       |        |       | 8-level warp/block tree, ≤ 32 + 5 for the chunks:     |
|                             |       |        |       | ≤ ~60u ≈ 3.6e-6, plus 3u per term                     |
| Σ (x' − μ)² vs Σ (s·ξ)²     | fp32  | 1e-30  | 1e-5  | plus Σ e(2|sξ| + e), e = 2u(|μ| + 2|sξ|): x' − μ in    |
|                             |       |        |       | fp32 loses up to u·|x'| to the rounding of x'         |
Σ (x' − μ)² is checked against the float64 sum of the kernel's own stored x' and μ (the contract: "from
the stored fp32 values"), and, looser, against Σ (s·ξ)².
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import unigrpo_kernels.cuda_lib as cl

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "kernels" / "cuda"
U = 2.0 ** -24
V_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ELEMENTWISE_TOL = {torch.float32: (1e-30, 1e-6), torch.bfloat16: (1e-30, 2.0 ** -8), torch.float16: (2.0 ** -24, 2.0 ** -10)}
SUM_TOL = (1e-30, 1e-5)
GPU_SETTINGS = settings(max_examples=60, deadline=None)


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME")
    path = os.path.join(home, "bin", "nvcc") if home else None
    return path if path and os.path.exists(path) else None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")


def _gpu_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not cl.cuda_library_available():
        return f"CUDA library: {cl.cuda_library_status()}"
    return None


_GPU_SKIP = _gpu_skip_reason()
needs_gpu = pytest.mark.skipif(_GPU_SKIP is not None, reason=_GPU_SKIP or "")


# ------------------------------------------------------------------------------------ compile (CPU)

_HDR = (CUDA_DIR / "flow_thread.cuh").read_text()
STREAM_REGS = 65536 // (int(re.search(r"kThreads = (\d+)", _HDR).group(1))
                        * int(re.search(r"kMinBlocksPerSm = (\d+)", _HDR).group(1))) // 8 * 8
"""the register cap __launch_bounds__(kThreads, kMinBlocksPerSm) puts on the streaming kernels (80)"""
ARCH_FLAGS = {"sm_80": "-gencode=arch=compute_80,code=sm_80", "sm_90a": "-gencode=arch=compute_90a,code=sm_90a"}


@needs_nvcc
def test_cuda_sources_compile_for_sm80_and_sm90a_without_spills(tmp_path):
    sources = sorted(CUDA_DIR.glob("*.cu"))
    assert sources, f"no .cu sources in {CUDA_DIR}"
    procs = {}
    for arch, flag in ARCH_FLAGS.items():          # the archs in parallel: ~10 s each with nvcc 13.0
        for src in sources:
            cmd = [NVCC, flag, "-std=c++17", "-O3", "-Xcompiler=-fPIC", "--resource-usage",
                   "-Xptxas=-warn-spills,-warn-lmem-usage", "-c", str(src), "-o", str(tmp_path / f"{src.stem}_{arch}.o")]
            procs[(arch, src.name)] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for (arch, name), proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"nvcc {name} for {arch} failed:\n{out[-4000:]}"
        kernels = re.findall(r"Compiling entry function '(\S+)' for '(\w+)'", out)
        props = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", out)
        assert kernels and len(props) == len(kernels), f"{name} {arch}: no resource report:\n{out[-2000:]}"
        assert all(target == arch for _, target in kernels), f"{name}: compiled for {set(kernels)} not {arch}"
        bad = [(k, p) for (k, _), p in zip(kernels, props) if any(int(n) for n in p)]
        assert not bad, f"{name} {arch}: stack frame / spills (bytes frame, stores, loads): {bad}"
        assert "warning" not in out.lower(), f"{name} {arch}: compiler warnings:\n{out[-4000:]}"
        # registers as __launch_bounds__(kThreads, kMinBlocksPerSm) caps them: 65,536 / (256 · 3) rounded down
        # to the allocation unit of 8 = 80 for the streaming kernels; the 32-thread reduction has no floor
        regs = [int(n) for n in re.findall(r"Used (\d+) registers", out)]
        assert len(regs) == len(kernels), f"{name} {arch}: {len(regs)} register reports for {len(kernels)} kernels"
        over = [(k, r) for (k, _), r in zip(kernels, regs) if r > (255 if "reduce_partials" in k else STREAM_REGS)]
        assert not over, f"{name} {arch}: registers per thread over the launch-bounds cap {STREAM_REGS}: {over}"


# ----------------------------------------------------------------------------- host emulation (CPU)

EMULATION_SOURCE = r"""// Host emulation of the flow kernels' per-thread bodies (kernels/cuda/flow_thread.cuh), written out and built by
// tests/test_ops_flow_cuda.py. Runs every thread of every (row, chunk) block on the CPU, as flow.cu launches
// them (same groups_per_chunk, chunk counts from plan_num_chunks and forced ones), for each dtype, both paths
// (16-byte vectors on aligned buffers; scalar on buffers one element past a boundary) and every flag. Checks:
// - coverage: with inputs that make every element contribute exactly 1, each row's total is exactly D (an
//   element read twice, skipped, or read by another row's block changes it);
// - values: outputs equal, bit for bit, the same fp32 formula applied element by element; row sums agree
//   with float64 to 1e-5 of Σ|terms| (the warp/block reductions are device-only and not emulated);
// - no access outside a buffer (poisoned guard zones stay poisoned), every 16-byte access aligned, streams
//   whose flag is off passed as null (a read would crash), mean untouched without want_mean.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

static long g_misaligned = 0;
#ifdef __CUDA_ARCH__
#define UNIGRPO_CHECK_ALIGNED16(ptr) ((void)0)
#else
#define UNIGRPO_CHECK_ALIGNED16(ptr) \
  do { if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) ++g_misaligned; } while (0)
#endif
#include "flow_thread.cuh"

using namespace unigrpo;

static long g_fail = 0, g_runs = 0;
#define CHECK(cond, ...)                                              \
  do {                                                                \
    if (!(cond)) {                                                    \
      if (g_fail++ < 20) { std::fprintf(stderr, __VA_ARGS__); std::fprintf(stderr, "\n"); } \
    }                                                                 \
  } while (0)

constexpr int64_t kGuard = 40;  // poisoned elements before and after every buffer

// A [n] buffer of storage S with poisoned guard zones; `misalign` shifts the base by one element.
template <class S>
struct Buf {
  std::vector<unsigned char> raw;
  S* p;
  int64_t n;
  S poison;
  Buf(int64_t n_, bool misalign, S poison_) : n(n_), poison(poison_) {
    raw.resize(static_cast<size_t>((n + 2 * kGuard + 1) * sizeof(S) + 64));
    uintptr_t base = (reinterpret_cast<uintptr_t>(raw.data()) + 63) / 64 * 64;  // 64-byte aligned
    S* all = reinterpret_cast<S*>(base);
    for (int64_t i = 0; i < n + 2 * kGuard + (misalign ? 1 : 0); ++i) all[i] = poison;
    p = all + kGuard + (misalign ? 1 : 0);
  }
  bool guards_ok() const {
    for (int64_t i = 1; i <= kGuard - 1; ++i)
      if (p[-i] != poison || p[n + i - 1] != poison) return false;
    return true;
  }
};

template <class TT>
typename TT::Storage enc(float f) { return TT::encode(f); }

struct Case {
  int64_t B, D, chunks;
  bool vec;
};

template <class TV>
const char* name() { return sizeof(typename TV::Storage) == 4 ? "f32" : (TV::decode(0x3c00) == 1.0f ? "f16" : "bf16"); }

template <class TV>
int64_t gpc_for(const Case& c) { return c.vec ? groups_per_chunk<TV::kVec>(c.D, c.chunks) : groups_per_chunk<1>(c.D, c.chunks); }

// ------------------------------------------------------------------------------------------- sde step
template <class TV, bool kVec, bool kMean>
void run_sde(const Case& c, std::mt19937& rng, bool coverage) {
  using S = typename TV::Storage;
  constexpr int VEC = kVec ? TV::kVec : 1;
  const int64_t n = c.B * c.D;
  const bool mis = !c.vec;
  std::normal_distribution<float> nd(0.f, 1.f);
  Buf<uint32_t> x(n, mis, 0x7fc00001u), xi(n, mis, 0x7fc00001u), xn(n, mis, 0x7fc00002u), mu(n, mis, 0x7fc00003u);
  Buf<S> v(n, mis, static_cast<S>(0x7fff));
  std::vector<float> a(c.B), b(c.B), s(c.B);
  for (int64_t r = 0; r < c.B; ++r) {
    a[r] = coverage ? 0.f : 1.f + 0.1f * nd(rng);
    b[r] = coverage ? 0.f : -0.3f + 0.1f * nd(rng);
    s[r] = coverage ? 1.f : 0.5f + 0.1f * nd(rng);
  }
  for (int64_t i = 0; i < n; ++i) {
    x.p[i] = enc<F32>(nd(rng));
    v.p[i] = enc<TV>(nd(rng));
    xi.p[i] = enc<F32>(coverage ? 1.f : nd(rng));
  }
  SdeArgs<TV> p{x.p, v.p, xi.p, a.data(), b.data(), s.data(), xn.p, kMean ? mu.p : nullptr, nullptr,
                c.D, c.chunks, gpc_for<TV>(c)};
  std::vector<double> row_sum(c.B, 0.0);
  for (int64_t blk = 0; blk < c.B * c.chunks; ++blk) {
    const int64_t row = blk / c.chunks, chunk = blk % c.chunks;
    for (int t = 0; t < kThreads; ++t) {
      float acc = 0.f;
      sde_step_thread<TV, VEC, kVec, kMean>(p, t, row, chunk, acc);
      row_sum[row] += acc;
    }
  }
  for (int64_t r = 0; r < c.B; ++r) {
    double want = 0.0, scale = 0.0;
    for (int64_t d = 0; d < c.D; ++d) {
      const int64_t i = r * c.D + d;
      const float m = fmaf(a[r], F32::decode(x.p[i]), b[r] * TV::decode(v.p[i]));
      const float q = fmaf(s[r], F32::decode(xi.p[i]), m);
      CHECK(xn.p[i] == F32::encode(q), "sde %s B=%ld D=%ld chunks=%ld vec=%d: x_next[%ld,%ld] wrong", name<TV>(),
            (long)c.B, (long)c.D, (long)c.chunks, (int)c.vec, (long)r, (long)d);
      if (kMean) CHECK(mu.p[i] == F32::encode(m), "sde %s D=%ld: mean[%ld,%ld] wrong", name<TV>(), (long)c.D, (long)r, (long)d);
      const double dd = double(q - m);
      want += dd * dd;
      scale += dd * dd;
    }
    if (coverage) {
      CHECK(row_sum[r] == double(c.D), "sde coverage %s B=%ld D=%ld chunks=%ld vec=%d row %ld: counted %.1f",
            name<TV>(), (long)c.B, (long)c.D, (long)c.chunks, (int)c.vec, (long)r, row_sum[r]);
    } else {
      CHECK(std::fabs(row_sum[r] - want) <= 1e-5 * scale + 1e-30, "sde %s D=%ld row %ld: sum %.9g want %.9g",
            name<TV>(), (long)c.D, (long)r, row_sum[r], want);
    }
  }
  CHECK(x.guards_ok() && xi.guards_ok() && v.guards_ok() && xn.guards_ok() && mu.guards_ok(),
        "sde %s D=%ld: a guard zone was written", name<TV>(), (long)c.D);
  if (!kMean) {
    bool untouched = true;
    for (int64_t i = 0; i < n; ++i) untouched &= mu.p[i] == mu.poison;
    CHECK(untouched, "sde %s D=%ld: mean written without want_mean", name<TV>(), (long)c.D);
  }
  ++g_runs;
}

// ------------------------------------------------------------------------------------------ row sums
template <class TV, bool kVec>
void run_sums(const Case& c, std::mt19937& rng, bool coverage) {
  using S = typename TV::Storage;
  constexpr int VEC = kVec ? TV::kVec : 1;
  const int64_t n = c.B * c.D;
  const bool mis = !c.vec;
  std::normal_distribution<float> nd(0.f, 1.f);
  Buf<uint32_t> xi(n, mis, 0x7fc00001u);
  Buf<S> v(n, mis, static_cast<S>(0x7fff)), vo(n, mis, static_cast<S>(0x7fff)), vr(n, mis, static_cast<S>(0x7fff));
  for (int64_t i = 0; i < n; ++i) {
    v.p[i] = enc<TV>(coverage ? 1.f : nd(rng));
    vo.p[i] = enc<TV>(coverage ? 0.f : nd(rng));
    vr.p[i] = enc<TV>(coverage ? 0.f : nd(rng));
    xi.p[i] = enc<F32>(coverage ? 1.f : nd(rng));
  }
  SumsArgs<TV> p{v.p, xi.p, vo.p, vr.p, nullptr, c.D, c.chunks, gpc_for<TV>(c)};
  std::vector<double> row_sum(3 * c.B, 0.0);
  for (int64_t blk = 0; blk < c.B * c.chunks; ++blk) {
    const int64_t row = blk / c.chunks, chunk = blk % c.chunks;
    for (int t = 0; t < kThreads; ++t) {
      float acc[3] = {0.f, 0.f, 0.f};
      flow_sums_thread<TV, VEC, kVec>(p, t, row, chunk, acc);
      for (int k = 0; k < 3; ++k) row_sum[3 * row + k] += acc[k];
    }
  }
  for (int64_t r = 0; r < c.B; ++r) {
    double want[3] = {0, 0, 0}, scale[3] = {0, 0, 0};
    for (int64_t d = 0; d < c.D; ++d) {
      const int64_t i = r * c.D + d;
      const double dv = double(TV::decode(v.p[i])), x = double(F32::decode(xi.p[i]));
      const double d_old = dv - double(TV::decode(vo.p[i])), d_ref = dv - double(TV::decode(vr.p[i]));
      want[0] += x * d_old; scale[0] += std::fabs(x * d_old);
      want[1] += d_old * d_old; scale[1] += d_old * d_old;
      want[2] += d_ref * d_ref; scale[2] += d_ref * d_ref;
    }
    for (int k = 0; k < 3; ++k) {
      const double got = row_sum[3 * r + k];
      if (coverage) {
        CHECK(got == double(c.D), "sums coverage %s B=%ld D=%ld chunks=%ld vec=%d row %ld col %d: counted %.1f",
              name<TV>(), (long)c.B, (long)c.D, (long)c.chunks, (int)c.vec, (long)r, k, got);
      } else {
        CHECK(std::fabs(got - want[k]) <= 1e-5 * scale[k] + 1e-30, "sums %s D=%ld row %ld col %d: %.9g want %.9g",
              name<TV>(), (long)c.D, (long)r, k, got, want[k]);
      }
    }
  }
  CHECK(xi.guards_ok() && v.guards_ok() && vo.guards_ok() && vr.guards_ok(), "sums: a guard zone was written");
  ++g_runs;
}

// ------------------------------------------------------------------------------------- row sums, bwd
template <class TV, bool kVec, bool kOld, bool kRef>
void run_bwd(const Case& c, std::mt19937& rng) {
  using S = typename TV::Storage;
  constexpr int VEC = kVec ? TV::kVec : 1;
  const int64_t n = c.B * c.D;
  const bool mis = !c.vec;
  std::normal_distribution<float> nd(0.f, 1.f);
  Buf<uint32_t> xi(n, mis, 0x7fc00001u);
  Buf<S> v(n, mis, static_cast<S>(0x7fff)), vo(n, mis, static_cast<S>(0x7fff)), vr(n, mis, static_cast<S>(0x7fff));
  Buf<S> dv(n, mis, static_cast<S>(0x7ffe));
  std::vector<float> g(3 * c.B);
  for (auto& e : g) e = nd(rng);
  for (int64_t i = 0; i < n; ++i) {
    v.p[i] = enc<TV>(nd(rng));
    vo.p[i] = enc<TV>(nd(rng));
    vr.p[i] = enc<TV>(nd(rng));
    xi.p[i] = enc<F32>(nd(rng));
  }
  // streams whose flag is off are passed as null: the emulation would crash if one were read
  SumsBwdArgs<TV> p{g.data(), (kOld || kRef) ? v.p : nullptr, xi.p, kOld ? vo.p : nullptr, kRef ? vr.p : nullptr,
                    dv.p, c.D, c.chunks, gpc_for<TV>(c)};
  for (int64_t blk = 0; blk < c.B * c.chunks; ++blk) {
    const int64_t row = blk / c.chunks, chunk = blk % c.chunks;
    for (int t = 0; t < kThreads; ++t) flow_sums_bwd_thread<TV, VEC, kVec, kOld, kRef>(p, t, row, chunk);
  }
  for (int64_t r = 0; r < c.B; ++r) {
    for (int64_t d = 0; d < c.D; ++d) {
      const int64_t i = r * c.D + d;
      const float want = sums_bwd_elem<kOld, kRef>(g[3 * r], 2.f * g[3 * r + 1], 2.f * g[3 * r + 2],
                                                   TV::decode(v.p[i]), F32::decode(xi.p[i]),
                                                   TV::decode(vo.p[i]), TV::decode(vr.p[i]));
      CHECK(dv.p[i] == TV::encode(want), "bwd %s B=%ld D=%ld chunks=%ld vec=%d old=%d ref=%d: dv[%ld,%ld] wrong",
            name<TV>(), (long)c.B, (long)c.D, (long)c.chunks, (int)c.vec, (int)kOld, (int)kRef, (long)r, (long)d);
    }
  }
  CHECK(dv.guards_ok() && xi.guards_ok(), "bwd %s D=%ld: a guard zone was written", name<TV>(), (long)c.D);
  ++g_runs;
}

template <class TV, bool kVec>
void run_all(const Case& c, std::mt19937& rng) {
  for (bool cov : {true, false}) {
    run_sde<TV, kVec, true>(c, rng, cov);
    run_sde<TV, kVec, false>(c, rng, cov);
    run_sums<TV, kVec>(c, rng, cov);
  }
  run_bwd<TV, kVec, false, false>(c, rng);
  run_bwd<TV, kVec, true, false>(c, rng);
  run_bwd<TV, kVec, false, true>(c, rng);
  run_bwd<TV, kVec, true, true>(c, rng);
}

template <class TV>
void run_dtype(int code, std::mt19937& rng) {
  std::vector<int64_t> Ds;
  for (int64_t d = 1; d <= 40; ++d) Ds.push_back(d);
  for (int64_t d : {63, 64, 65, 127, 255, 256, 257, 1000, 1023, 1025, 2047, 2048, 2049, 4096, 4103, 8191, 12345})
    Ds.push_back(d);
  for (int64_t B : {1, 3}) {
    for (int64_t D : Ds) {
      std::vector<int64_t> chunk_list;
      for (int64_t ch : {plan_num_chunks(B, D, code, 132), plan_num_chunks(B, D, code, 1), int64_t(1), int64_t(3),
                         int64_t(D >= 4096 ? 7 : 1)}) {
        bool seen = false;
        for (int64_t c : chunk_list) seen |= c == ch;
        if (!seen) chunk_list.push_back(ch);
      }
      for (int64_t ch : chunk_list) {
        if (ch < 1) { CHECK(false, "plan_num_chunks(%ld, %ld) = %ld", (long)B, (long)D, (long)ch); continue; }
        run_all<TV, true>(Case{B, D, ch, true}, rng);
        run_all<TV, false>(Case{B, D, ch, false}, rng);
      }
    }
  }
}

int main() {
  std::mt19937 rng(1234);
  run_dtype<F32>(kCodeF32, rng);
  run_dtype<BF16>(kCodeBF16, rng);
  run_dtype<F16>(kCodeF16, rng);
  // the planner at the paper's shape, and its bounds
  std::printf("paper_chunks_bf16=%ld paper_chunks_f32=%ld\n", (long)plan_num_chunks(72, 262144, kCodeBF16, 132),
              (long)plan_num_chunks(72, 262144, kCodeF32, 132));
  CHECK(plan_num_chunks(0, 5, kCodeF32, 132) == -1 && plan_num_chunks(1, 5, 7, 132) == -1, "planner bounds");
  CHECK(g_misaligned == 0, "%ld misaligned 16-byte accesses", g_misaligned);
  std::printf("runs=%ld failures=%ld misaligned=%ld\n", g_runs, g_fail, g_misaligned);
  return g_fail == 0 ? 0 : 1;
}
"""


@needs_nvcc
def test_host_emulation_of_the_thread_bodies(tmp_path):
    """Every thread of every (row, chunk) block of each kernel body, run on the CPU (see EMULATION_SOURCE)."""
    src = tmp_path / "emulate.cu"
    src.write_text(EMULATION_SOURCE)
    exe = tmp_path / "emulate"
    build = subprocess.run([NVCC, "-x", "cu", "-std=c++17", "-O1", "-Xcompiler=-fno-strict-aliasing",
                            f"-I{CUDA_DIR}", str(src), "-o", str(exe)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, f"building the emulation failed:\n{build.stdout[-3000:]}{build.stderr[-3000:]}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"emulation found errors:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    assert "failures=0 misaligned=0" in run.stdout, run.stdout


# --------------------------------------------------------------------------- reference checks (any device)

def _assert_close(what: str, got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, atol: float, rtol: float):
    """|got − want| ≤ atol + rtol·scale everywhere (NaN fails); the message says where and by how much."""
    got64 = got.detach().double()
    err = (got64 - want).abs()
    bound = atol + rtol * scale
    ok = err <= bound
    if not bool(ok.all()):
        bad = (~ok).nonzero()
        idx = tuple(int(i) for i in bad[0])
        raise AssertionError(
            f"{what}: {bad.shape[0]} of {ok.numel()} outside |err| <= {atol:g} + {rtol:g}*scale; first at {idx}: "
            f"got {float(got64[idx]):.9g}, want {float(want[idx]):.9g}, err {float(err[idx]):.3g}, "
            f"bound {float(bound[idx]):.3g}; worst err/bound {float((err / bound).nan_to_num(float('inf')).max()):.3g}")


def check_sde(inp: dict, x_next, sqsum, mean) -> None:
    """x' and μ vs float64 §3; Σ (x' − μ)² vs the float64 sum over the stored x', μ (needs mean) and vs Σ (s·ξ)²."""
    x, v, xi = inp["x"].double(), inp["v"].double(), inp["xi"].double()
    a, b, s = inp["a"].double()[:, None], inp["b"].double()[:, None], inp["s"].double()[:, None]
    atol, rtol = ELEMENTWISE_TOL[torch.float32]
    mean64 = a * x + b * v
    s_xi = s * xi
    _assert_close("x_next", x_next, mean64 + s_xi, (a * x).abs() + (b * v).abs() + s_xi.abs(), atol, rtol)
    if mean is not None:
        _assert_close("mean", mean, mean64, (a * x).abs() + (b * v).abs(), atol, rtol)
        d2 = (x_next.double() - mean.double()) ** 2
        _assert_close("sqsum vs stored x'/mean", sqsum, d2.sum(1), d2.sum(1), *SUM_TOL)
    e = 2 * U * (mean64.abs() + 2 * s_xi.abs())
    loose = (e * (2 * s_xi.abs() + e)).sum(1) * 1.01
    want = (s_xi ** 2).sum(1)
    _assert_close("sqsum vs (s*xi)^2", sqsum, want, want + loose / SUM_TOL[1], *SUM_TOL)


def check_sums(inp: dict, sums) -> None:
    v, xi, vo, vr = inp["v"].double(), inp["xi"].double(), inp["v_old"].double(), inp["v_ref"].double()
    d_old, d_ref = v - vo, v - vr
    terms = (xi * d_old, d_old * d_old, d_ref * d_ref)
    for k, (name, t) in enumerate(zip(("xi*(v-v_old)", "(v-v_old)^2", "(v-v_ref)^2"), terms)):
        _assert_close(f"sums[:, {k}] {name}", sums[:, k], t.sum(1), t.abs().sum(1), *SUM_TOL)


def check_bwd(inp: dict, g, use_old: bool, use_ref: bool, dv) -> None:
    v, xi, vo, vr = inp["v"].double(), inp["xi"].double(), inp["v_old"].double(), inp["v_ref"].double()
    g64 = g.double()
    terms = [g64[:, 0:1] * xi]
    if use_old:
        terms.append(2 * g64[:, 1:2] * (v - vo))
    if use_ref:
        terms.append(2 * g64[:, 2:3] * (v - vr))
    assert dv.dtype == inp["v"].dtype, f"dv dtype {dv.dtype} != v dtype {inp['v'].dtype}"
    _assert_close(f"dv ({dv.dtype}, use_old={use_old}, use_ref={use_ref})", dv, sum(terms),
                  sum(t.abs() for t in terms), *ELEMENTWISE_TOL[dv.dtype])


def make_inputs(B: int, D: int, dtype: torch.dtype, seed: int, device, misalign: str = "none",
                old_gap: float = 1.0) -> dict:
    """Random streams with per-row magnitudes 10^[-2, 2]; v_old = v + old_gap·noise (0: on-policy).
    misalign: "none" | "all" (every stream starts 1 element past a 16-byte boundary) | "one" (only v)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    def place(t: torch.Tensor, name: str) -> torch.Tensor:
        if misalign == "all" or (misalign == "one" and name == "v"):
            buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=device)
            out = buf[1:].view(t.shape)
            out.copy_(t)
            assert out.data_ptr() % 16 != 0 and out.is_contiguous()
            return out
        return t.contiguous()

    scale = 10.0 ** (torch.rand(B, 1, generator=gen, device=device) * 4 - 2)
    v = (rand(B, D) * scale).to(dtype)
    inp = {
        "x": rand(B, D) * scale,
        "v": v,
        "xi": rand(B, D),
        "v_old": (v.float() + old_gap * rand(B, D) * scale).to(dtype),
        "v_ref": (rand(B, D) * scale).to(dtype),
        "a": 1.0 + 0.1 * rand(B),
        "b": -0.3 + 0.1 * rand(B),
        "s": (0.5 * rand(B)).abs(),
        "g": rand(B, 3),
    }
    if B > 1:
        inp["s"][0] = 0.0                                   # an ODE row: x' = μ, Σ (x' − μ)² = 0
    return {k: (place(t, k) if t.dim() == 2 and k != "g" else t.contiguous()) for k, t in inp.items()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


# --------------------------------------------------------------------------------------- CPU tests

@pytest.mark.parametrize("dtype", V_DTYPES)
@pytest.mark.parametrize("B,D", [(1, 1), (3, 7), (2, 1000), (4, 4097)])
def test_checkers_accept_fp32_math_and_reject_a_perturbation(dtype, B, D):
    """The tolerance table is not tighter than fp32 can deliver (torch fp32 in another order passes) and the
    checkers catch a wrong element."""
    inp = make_inputs(B, D, dtype, seed=B * 1000 + D, device="cpu", old_gap=0.01)
    x, v, xi, a, b, s = (inp[k] for k in ("x", "v", "xi", "a", "b", "s"))
    mean = a[:, None] * x + b[:, None] * v.float()
    x_next = mean + s[:, None] * xi
    sqsum = ((x_next - mean) ** 2).sum(1)
    check_sde(inp, x_next, sqsum, mean)
    check_sde(inp, x_next, sqsum, None)
    vf, vof, vrf = inp["v"].float(), inp["v_old"].float(), inp["v_ref"].float()
    sums = torch.stack([(xi * (vf - vof)).sum(1), ((vf - vof) ** 2).sum(1), ((vf - vrf) ** 2).sum(1)], 1)
    check_sums(inp, sums)
    g = inp["g"]
    for use_old in (False, True):
        for use_ref in (False, True):
            dv = g[:, 0:1] * xi + 2 * g[:, 1:2] * (vf - vof) * use_old + 2 * g[:, 2:3] * (vf - vrf) * use_ref
            check_bwd(inp, g, use_old, use_ref, dv.to(dtype))
    j = D // 2
    bad = x_next.clone()
    bad[-1, j] += 1e-3 * (x_next[-1, j].abs() + 1)
    with pytest.raises(AssertionError, match=r"x_next: 1 of"):
        check_sde(inp, bad, sqsum, mean)
    bad_sums = sums.clone()
    bad_sums[-1, 2] *= 1.001
    with pytest.raises(AssertionError, match=r"sums\[:, 2\]"):
        check_sums(inp, bad_sums)
    nan_dv = dv.to(dtype)
    nan_dv[0, 0] = float("nan")
    with pytest.raises(AssertionError, match="dv"):
        check_bwd(inp, g, True, True, nan_dv)


def test_cuda_library_unavailable_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert cl.cuda_library_available() is False
    assert cl.cuda_library_available("cuda:0") is False
    assert "no CUDA device" in cl.cuda_library_status()


def test_library_candidates_order(monkeypatch):
    monkeypatch.delenv(cl.ENV_VAR, raising=False)
    paths = cl.library_candidates()
    assert paths[0] == Path(cl.__file__).resolve().parent / "cuda" / cl.LIB_NAME
    if (ROOT / "CMakeLists.txt").is_file() and Path(cl.__file__).resolve().parent == ROOT / "kernels":
        assert paths[1:] == [ROOT / "build" / "cuda" / "lib" / cl.LIB_NAME]
    monkeypatch.setenv(cl.ENV_VAR, "/nowhere/libx.so")
    assert cl.library_candidates() == [Path("/nowhere/libx.so")]


def test_argument_errors_name_the_bad_value():
    B, D = 2, 5
    x = torch.zeros(B, D)
    v = torch.zeros(B, D, dtype=torch.bfloat16)
    xi = torch.zeros(B, D)
    a = b = s = torch.zeros(B)
    g = torch.zeros(B, 3)
    with pytest.raises(ValueError, match=r"v_BD has dtype float64; expected one of float32, bfloat16, float16"):
        cl.sde_step_fwd(x, v.double(), xi, a, b, s, False)
    with pytest.raises(ValueError, match=r"x_BD has dtype bfloat16; expected one of float32"):
        cl.sde_step_fwd(x.bfloat16(), v, xi, a, b, s, False)
    with pytest.raises(ValueError, match=r"xi_BD must have shape \[2, 5\], got \[2, 4\]"):
        cl.sde_step_fwd(x, v, xi[:, :4], a, b, s, False)
    with pytest.raises(ValueError, match=r"x_BD must be 2-D \[B, D\], got 3-D \[2, 5, 1\]"):
        cl.sde_step_fwd(x[..., None], v, xi, a, b, s, False)
    with pytest.raises(ValueError, match=r"std_B must have shape \[2\], got \[3\]"):
        cl.sde_step_fwd(x, v, xi, a, b, torch.zeros(3), False)
    with pytest.raises(ValueError, match=r"a_B must be a torch.Tensor, got float"):
        cl.sde_step_fwd(x, v, xi, 1.0, b, s, False)
    with pytest.raises(ValueError, match=r"v_BD must be contiguous, got strides \[1, 2\]"):
        cl.sde_step_fwd(x, torch.zeros(D, B, dtype=torch.bfloat16).t(), xi, a, b, s, False)
    with pytest.raises(ValueError, match=r"want_mean must be a bool, got 1"):
        cl.sde_step_fwd(x, v, xi, a, b, s, 1)
    with pytest.raises(ValueError, match=r"x_BD is on cpu; the cuda backend needs CUDA tensors"):
        cl.sde_step_fwd(x, v, xi, a, b, s, True)
    with pytest.raises(ValueError, match=r"v_old_BD has dtype float16; expected one of bfloat16"):
        cl.flow_sums_fwd(v, xi, v.half(), v)
    with pytest.raises(ValueError, match=r"v_ref_BD must have shape \[2, 5\], got \[1, 5\]"):
        cl.flow_sums_fwd(v, xi, v, v[:1])
    with pytest.raises(ValueError, match=r"xi_BD has dtype bfloat16; expected one of float32"):
        cl.flow_sums_fwd(v, xi.bfloat16(), v, v)
    with pytest.raises(ValueError, match=r"v_BD is on cpu; the cuda backend needs CUDA tensors"):
        cl.flow_sums_fwd(v, xi, v, v)
    with pytest.raises(ValueError, match=r"g_B3 must have shape \[2, 3\], got \[2, 2\]"):
        cl.flow_sums_bwd(g[:, :2].contiguous(), v, xi, v, v, True, True)
    with pytest.raises(ValueError, match=r"g_B3 has dtype bfloat16"):
        cl.flow_sums_bwd(g.bfloat16(), v, xi, v, v, True, True)
    with pytest.raises(ValueError, match=r"use_ref must be a bool, got 'yes'"):
        cl.flow_sums_bwd(g, v, xi, v, v, True, "yes")
    with pytest.raises(ValueError, match=r"v_BD is on cpu"):
        cl.flow_sums_bwd(g, v, xi, v, v, False, False)


# --------------------------------------------------------------------------------------- GPU tests

def _poisoned(*shape, dtype=torch.float32, misalign=False):
    if misalign:
        n = 1
        for d in shape:
            n *= d
        return torch.full((n + 1,), float("nan"), dtype=dtype, device="cuda")[1:].view(shape)
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


def _ws(n: int) -> torch.Tensor:
    return torch.full((n,), float("nan"), dtype=torch.float32, device="cuda")


def _planned(B, D, dtype) -> int:
    return cl._planned_chunks(B, D, cl._DTYPE_CODES[dtype], cl._sm_count(torch.cuda.current_device()))


def _run_sde(inp, want_mean, chunks, misalign_out=False):
    B, D = inp["x"].shape
    n = chunks or _planned(B, D, inp["v"].dtype)
    out = (_poisoned(B, D, misalign=misalign_out), _poisoned(B), _poisoned(B, D, misalign=misalign_out)
           if want_mean else None)
    res = cl.sde_step_fwd(inp["x"], inp["v"], inp["xi"], inp["a"], inp["b"], inp["s"], want_mean, chunks=chunks,
                          out=out, workspace=_ws(B * n))
    assert all(r is o for r, o in zip(res, out))
    return res


def _run_sums(inp, chunks):
    B, D = inp["v"].shape
    n = chunks or _planned(B, D, inp["v"].dtype)
    return cl.flow_sums_fwd(inp["v"], inp["xi"], inp["v_old"], inp["v_ref"], chunks=chunks, out=_poisoned(B, 3),
                            workspace=_ws(B * n * 3))


def _run_bwd(inp, use_old, use_ref, chunks, misalign_out=False):
    B, D = inp["v"].shape
    out = _poisoned(B, D, dtype=inp["v"].dtype, misalign=misalign_out)
    return cl.flow_sums_bwd(inp["g"], inp["v"], inp["xi"], inp["v_old"], inp["v_ref"], use_old, use_ref,
                            chunks=chunks, out=out)


SHAPES = dict(B=st.integers(1, 5), D=st.one_of(st.integers(1, 48), st.integers(49, 4200)),
              dtype=st.sampled_from(V_DTYPES), misalign=st.sampled_from(["none", "none", "all", "one"]),
              chunks=st.one_of(st.none(), st.integers(1, 6)), seed=st.integers(0, 2**31 - 1))


@needs_gpu
@GPU_SETTINGS
@given(**SHAPES, want_mean=st.booleans())
def test_sde_step_fwd_matches_float64(B, D, dtype, misalign, chunks, seed, want_mean):
    inp = make_inputs(B, D, dtype, seed, "cuda", misalign)
    x_next, sqsum, mean = _run_sde(inp, True, chunks, misalign_out=misalign == "all")
    check_sde(inp, x_next, sqsum, mean)
    x2, sq2, mean2 = _run_sde(inp, want_mean, chunks, misalign_out=misalign == "all")
    assert _same_bits(x2, x_next) and _same_bits(sq2, sqsum), "want_mean changed x_next or sqsum, or a rerun differed"
    assert (mean2 is None) == (not want_mean) and (mean2 is None or _same_bits(mean2, mean))
    plain = cl.sde_step_fwd(inp["x"], inp["v"], inp["xi"], inp["a"], inp["b"], inp["s"], want_mean)
    check_sde(inp, plain[0], plain[1], plain[2])
    again = cl.sde_step_fwd(inp["x"], inp["v"], inp["xi"], inp["a"], inp["b"], inp["s"], want_mean)
    assert all(p is None and q is None or _same_bits(p, q) for p, q in zip(plain, again)), "not bit-reproducible"


@needs_gpu
@GPU_SETTINGS
@given(**SHAPES, old_gap=st.sampled_from([0.0, 1e-2, 1.0]))
def test_flow_sums_fwd_matches_float64(B, D, dtype, misalign, chunks, seed, old_gap):
    inp = make_inputs(B, D, dtype, seed, "cuda", misalign, old_gap=old_gap)
    sums = _run_sums(inp, chunks)
    check_sums(inp, sums)
    if old_gap == 0.0:
        assert bool((sums[:, :2] == 0).all()), "on-policy (v_old == v) sums must be exactly 0"
    assert _same_bits(_run_sums(inp, chunks), sums), "not bit-reproducible"
    plain = cl.flow_sums_fwd(inp["v"], inp["xi"], inp["v_old"], inp["v_ref"])
    check_sums(inp, plain)
    assert _same_bits(plain, cl.flow_sums_fwd(inp["v"], inp["xi"], inp["v_old"], inp["v_ref"]))


@needs_gpu
@GPU_SETTINGS
@given(**SHAPES, use_old=st.booleans(), use_ref=st.booleans())
def test_flow_sums_bwd_matches_float64(B, D, dtype, misalign, chunks, seed, use_old, use_ref):
    inp = make_inputs(B, D, dtype, seed, "cuda", misalign)
    dv = _run_bwd(inp, use_old, use_ref, chunks, misalign_out=misalign == "all")
    check_bwd(inp, inp["g"], use_old, use_ref, dv)
    assert _same_bits(_run_bwd(inp, use_old, use_ref, chunks), dv), "not bit-reproducible"
    # a stream whose flag is off is not read: NaN there must not reach dv
    nan_inp = dict(inp)
    if not use_old:
        nan_inp["v_old"] = torch.full_like(inp["v_old"], float("nan"))
    if not use_ref:
        nan_inp["v_ref"] = torch.full_like(inp["v_ref"], float("nan"))
    if not (use_old or use_ref):
        nan_inp["v"] = torch.full_like(inp["v"], float("nan"))
    assert _same_bits(_run_bwd(nan_inp, use_old, use_ref, chunks), dv)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_paper_shape(dtype):
    """B = 72 rows (24 samples × 3 window steps) of D = 262,144: many chunks per row, deterministic."""
    B, D = 72, 262_144
    inp = make_inputs(B, D, dtype, 7, "cuda", old_gap=0.01)
    assert _planned(B, D, dtype) > 1
    res = _run_sde(inp, True, None)
    check_sde(inp, *res)
    assert all(_same_bits(p, q) for p, q in zip(res, _run_sde(inp, True, None)))
    sums = _run_sums(inp, None)
    check_sums(inp, sums)
    assert _same_bits(sums, _run_sums(inp, None))
    dv = _run_bwd(inp, True, True, None)
    check_bwd(inp, inp["g"], True, True, dv)
    assert _same_bits(dv, _run_bwd(inp, True, True, None))


@needs_gpu
def test_gpu_argument_errors_and_library_state():
    assert cl.cuda_library_available() and cl.cuda_library_available(torch.device("cuda", 0))
    assert cl.cuda_library_status().startswith("loaded ")
    inp = make_inputs(2, 9, torch.bfloat16, 0, "cuda")
    with pytest.raises(ValueError, match=r"chunks=0 must be an int >= 1"):
        cl.flow_sums_fwd(inp["v"], inp["xi"], inp["v_old"], inp["v_ref"], chunks=0)
    with pytest.raises(ValueError, match=r"workspace must be a contiguous float32 tensor"):
        cl.flow_sums_fwd(inp["v"], inp["xi"], inp["v_old"], inp["v_ref"], chunks=2, workspace=_ws(11))
    with pytest.raises(ValueError, match=r"xi_BD is on cpu but v_BD is on cuda"):
        cl.flow_sums_fwd(inp["v"], inp["xi"].cpu(), inp["v_old"], inp["v_ref"])
    # a side stream: the launch goes to torch's current stream
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        sums = cl.flow_sums_fwd(inp["v"], inp["xi"], inp["v_old"], inp["v_ref"])
    torch.cuda.current_stream().wait_stream(side)
    check_sums(inp, sums)
