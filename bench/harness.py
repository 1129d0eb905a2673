"""The bench harness: command line, device ceilings, timing, reference checks, rows, and the writers.

    python -m bench [suite ...] [--quick] [--out DIR] [--providers LIST] [--device DEV] [--list]

Protocol (docs/DESIGN.md "Benchmarks", STYLE.md item 14; METHOD.md of the lent GPU machines):
1. The device's own ceilings are measured first, in the same run: a large device-to-device copy in GB/s
   (bytes read + bytes written) and a large matmul in TFLOP/s (8192³ bf16 on GPU; on CPU a memcpy of a
   256 MiB tensor and a 2048³ fp32 matmul — 64 MiB / 1024³ with --quick). Achieved throughput is reported
   as a fraction of these, never of a datasheet.
2. Each case checks every provider against the torch reference on the very inputs it will time, before
   timing: ‖out − ref‖ / ‖ref‖ (float64) per output and per input gradient, against the case's stated
   tolerance; NaN/Inf fail. A provider that fails is not timed, its rows say why, and the run exits 1.
3. Timing excludes warm-up (the check already ran every provider once, so torch.compile's compile and
   Triton's JIT happen there). GPU: the loop of `triton.testing.do_bench` — CUDA events around each call,
   the L2 flushed with a 256 MB write before each call, warm-up and call count sized from a 5-call estimate,
   p20/p50/p80 over ~200 ms of calls (40 ms with --quick) — written out here so that each call can have an
   untimed setup: backward-only timing then gets a fresh graph every call instead of retain_graph, which
   torch.compile's backward refuses (donated buffers). GPU op rows also get `kernel_ms`: the device time of
   the call's own kernels (torch.profiler's CUDA activity; see `kernel_ms`), so a fused op of tens of µs
   shows how much of its end-to-end time is host dispatch. CPU: time.perf_counter around each call,
   p20/p50/p80 of 5–100 calls; CPU inputs at these shapes stay in cache, so CPU figures are smoke tests of
   the harness, not claims.
4. One long-format row per (suite, op, provider, mode, shape, dtype); see ROW_FIELDS and bench/README.md.
   Speed-ups over "torch" (eager reference) and "torch.compile" are filled in after all rows exist.
5. Results: <out>/<device-slug>-<YYYY-MM-DD>[-N].json, .md and one PNG bar chart per suite.

Test hook: TEST_PROVIDERS (op → {provider name → callable with the op's keyword signature}) is merged into
every OpCase of that op, whatever --providers says. tests/test_bench.py injects a deliberately wrong
provider this way and checks that the run exits non-zero. Nothing else reads it.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "bench", "results")
QUANTILES = (0.2, 0.5, 0.8)
CPU_DEFAULT_PROVIDERS = ("torch", "torch.compile")
"""On CPU only these run unless --providers names others (Triton there is the ~1000× slower interpreter)."""

TEST_PROVIDERS: dict[str, dict[str, Callable]] = {}
"""Test hook (see the module docstring): op → {provider name → fn}; merged into every OpCase of that op."""

ROW_FIELDS = (
    "suite", "op", "provider", "mode", "shape", "dtype",
    "ms_p20", "ms_p50", "ms_p80", "unit", "value", "ceiling", "ceiling_frac",
    "speedup_vs_torch", "speedup_vs_compile", "peak_mem_mib", "kernel_ms", "check_ratio", "ok", "note", "extra",
    "device", "device_kind", "torch", "triton", "cuda", "commit",
)


# ---------------------------------------------------------------------------------------------- context

@dataclass
class Context:
    """What a suite sees of the run."""

    device: torch.device
    quick: bool = False
    providers: tuple[str, ...] | None = None
    """--providers (None = the device's default set)"""
    ceilings: dict = field(default_factory=dict)
    """"copy" / "matmul" → {"value", "unit", "ms", "what"}"""
    env: dict = field(default_factory=dict)
    verbose: bool = True

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def wants(self, provider: str) -> bool:
        """True when `provider` should run: named in --providers, or (no --providers) every provider on
        GPU and CPU_DEFAULT_PROVIDERS on CPU."""
        if self.providers is not None:
            return provider in self.providers
        return self.is_cuda or provider in CPU_DEFAULT_PROVIDERS

    def log(self, msg: str) -> None:
        if self.verbose:
            print(msg, flush=True)


# ------------------------------------------------------------------------------------------------- rows

@dataclass
class Row:
    """One long-format result row (bench/README.md describes every field)."""

    suite: str
    op: str
    provider: str
    mode: str
    shape: str
    dtype: str
    ms_p20: float | None = None
    ms_p50: float | None = None
    ms_p80: float | None = None
    unit: str | None = None
    """"GB/s" or "TFLOP/s" (or None when the row has no throughput)"""
    value: float | None = None
    """throughput at the median time: counted bytes or FLOPs / ms_p50"""
    ceiling: str | None = None
    """which measured ceiling `ceiling_frac` divides by: "copy" or "matmul\""""
    ceiling_frac: float | None = None
    speedup_vs_torch: float | None = None
    speedup_vs_compile: float | None = None
    peak_mem_mib: float | None = None
    kernel_ms: float | None = None
    """GPU op rows: mean device time of the call's kernels per call (profiler), host dispatch excluded"""
    check_ratio: float | None = None
    """largest (error / tolerance) over the checked outputs; ≤ 1 passes; 0 for the reference itself"""
    ok: bool = True
    note: str = ""
    extra: dict = field(default_factory=dict)
    device: str = ""
    device_kind: str = ""
    torch: str = ""
    triton: str = ""
    cuda: str = ""
    commit: str = ""


def make_row(ctx: Context, *, suite: str, op: str, provider: str, mode: str, shape: str, dtype: str,
             ms: tuple[float, float, float] | None = None, work: float | None = None, unit: str | None = None,
             ceiling: str | None = None, peak_mem_mib: float | None = None, kernel_ms: float | None = None,
             check_ratio: float | None = None,
             ok: bool = True, note: str = "", extra: dict | None = None) -> Row:
    """A Row with the throughput computed from `work` (bytes for unit "GB/s", FLOPs for "TFLOP/s") over the
    median time, its fraction of the measured `ceiling`, and the run's environment fields."""
    value = frac = None
    if ms is not None and work is not None and unit is not None and ms[1] > 0:
        scale = {"GB/s": 1e9, "TFLOP/s": 1e12}[unit]
        value = work / (ms[1] * 1e-3) / scale
        ceil = ctx.ceilings.get(ceiling or "", {})
        if ceil.get("value"):
            frac = value / ceil["value"]
    env = ctx.env
    return Row(suite=suite, op=op, provider=provider, mode=mode, shape=shape, dtype=dtype,
               ms_p20=ms[0] if ms else None, ms_p50=ms[1] if ms else None, ms_p80=ms[2] if ms else None,
               unit=unit, value=value, ceiling=ceiling if value is not None else None, ceiling_frac=frac,
               peak_mem_mib=peak_mem_mib, kernel_ms=kernel_ms, check_ratio=check_ratio, ok=ok, note=note,
               extra=dict(extra or {}),
               device=env.get("device", str(ctx.device)), device_kind=ctx.device.type,
               torch=env.get("torch", ""), triton=env.get("triton", ""), cuda=env.get("cuda") or "",
               commit=env.get("commit", ""))


def fill_speedups(rows: list[Row]) -> None:
    """speedup_vs_torch / _compile = that provider's median / this row's median, within one
    (suite, op, mode, shape, dtype) group; None where either is missing."""
    base: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r.ms_p50 and r.provider in ("torch", "torch.compile"):
            base.setdefault((r.suite, r.op, r.mode, r.shape, r.dtype), {})[r.provider] = r.ms_p50
    for r in rows:
        b = base.get((r.suite, r.op, r.mode, r.shape, r.dtype), {})
        if r.ms_p50:
            r.speedup_vs_torch = b["torch"] / r.ms_p50 if "torch" in b else None
            r.speedup_vs_compile = b["torch.compile"] / r.ms_p50 if "torch.compile" in b else None


# ----------------------------------------------------------------------------------------------- timing

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(ctx: Context, fn: Callable[[Any], Any], *, setup: Callable[[], Any] | None = None
            ) -> tuple[float, float, float]:
    """(p20, p50, p80) milliseconds of fn(state) on ctx.device (protocol step 3), where state = setup() runs
    untimed before every call (default: state None). Backward-only modes use setup to build a fresh graph
    and reset .grad, so no call needs retain_graph (torch.compile's backward refuses it: donated buffers)."""
    setup = setup or (lambda: None)
    if ctx.is_cuda:
        return _time_cuda(fn, setup, warmup_ms=10 if ctx.quick else 25, rep_ms=40 if ctx.quick else 200)
    return _time_cpu(fn, setup, budget_s=0.3 if ctx.quick else 2.0)


def _quantiles(times_ms: list[float]) -> tuple[float, float, float]:
    t = torch.tensor(times_ms, dtype=torch.float64)
    return tuple(float(torch.quantile(t, q)) for q in QUANTILES)


def _time_cpu(fn, setup, budget_s: float, min_reps: int = 5, max_reps: int = 100):
    state = setup()
    t0 = time.perf_counter()
    fn(state)  # one more warm-up call, which also sizes the run
    est = max(time.perf_counter() - t0, 1e-6)
    reps = int(min(max(budget_s / est, min_reps), max_reps))
    times = []
    for _ in range(reps):
        state = setup()
        t0 = time.perf_counter()
        fn(state)
        times.append((time.perf_counter() - t0) * 1e3)
        del state
    return _quantiles(times)


def _time_cuda(fn, setup, warmup_ms: float, rep_ms: float, max_reps: int = 1000):
    """triton.testing.do_bench's loop (CUDA events around each call, the L2 flushed by a 256 MB write
    before it, call counts sized from a 5-call estimate), plus the untimed per-call setup."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")

    def once(s=None, e=None):
        state = setup()
        flush.zero_()
        if s is not None:
            s.record()
        fn(state)
        if e is not None:
            e.record()

    once()
    torch.cuda.synchronize()
    evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(5)]
    for s, e in evs:
        once(s, e)
    torch.cuda.synchronize()
    est = max(sum(s.elapsed_time(e) for s, e in evs) / 5, 1e-4)
    for _ in range(max(1, int(warmup_ms / est))):
        once()
    n = int(min(max(rep_ms / est, 5), max_reps))
    evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for s, e in evs:
        once(s, e)
    torch.cuda.synchronize()
    return _quantiles([s.elapsed_time(e) for s, e in evs])


def peak_mem_mib(ctx: Context, fn: Callable[[Any], Any], *, setup: Callable[[], Any] | None = None
                 ) -> float | None:
    """GPU: the most memory one fn(setup()) call allocates above what was allocated before it (outputs,
    workspace, saved activations; inputs and setup's products excluded), MiB. None on CPU (no allocator
    statistics there)."""
    if not ctx.is_cuda:
        return None
    state = (setup or (lambda: None))()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn(state)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out, state
    return (peak - before) / 2**20


_MARK = "unigrpo_bench_timed"


def attribute_device_time(events, marker: str = _MARK) -> tuple[float, int]:
    """(total µs of device events that start inside a host `marker` range, number of marker ranges).
    events: (name, on_device, start_us, end_us) tuples on the profiler's one clock. Device events named
    `marker` (the profiler's GPU-side copy of the annotation, spanning the kernels) are not counted."""
    wins = sorted((s, e) for name, dev, s, e in events if name == marker and not dev)
    total = 0.0
    for name, dev, s, e in events:
        if dev and name != marker and any(a <= s <= b for a, b in wins):
            total += e - s
    return total, len(wins)


def kernel_ms(ctx: Context, fn: Callable[[Any], Any], *, setup: Callable[[], Any] | None = None,
              reps: int = 5) -> float | None:
    """GPU: mean device time (ms) of the kernels, memsets and copies that fn(setup()) launches, over `reps`
    calls profiled with torch.profiler's CUDA activity; host time between launches is excluded. Each call
    runs inside a host range opened after setup's work has finished and closed after a synchronize, so the
    setup's kernels (the forward of a backward-only mode) are not counted. None on CPU (no device timeline)
    or when the profiler yields no device events (e.g. CUPTI unavailable)."""
    if not ctx.is_cuda:
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    setup = setup or (lambda: None)
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                state = setup()
                torch.cuda.synchronize()
                with record_function(_MARK):
                    fn(state)
                    torch.cuda.synchronize()
                del state
        events = [(e.name, e.device_type == DeviceType.CUDA, e.time_range.start, e.time_range.end)
                  for e in prof.events()]
    except Exception as err:  # noqa: BLE001 - a profiler that cannot run must not fail the bench
        ctx.log(f"  kernel time unavailable: {type(err).__name__}: {err}")
        return None
    total_us, n = attribute_device_time(events)
    return total_us / n / 1e3 if n and total_us > 0 else None


# --------------------------------------------------------------------------------------------- ceilings

def _time_copy(ctx: Context, nbytes: int) -> tuple[float, float, float]:
    g = torch.Generator(device=ctx.device).manual_seed(0)
    src = torch.randn(nbytes // 4, generator=g, device=ctx.device)
    dst = torch.empty_like(src)
    return time_ms(ctx, lambda _: dst.copy_(src))


def _time_matmul(ctx: Context, n: int, dtype: torch.dtype) -> tuple[float, float, float]:
    g = torch.Generator(device=ctx.device).manual_seed(1)
    a = torch.randn(n, n, generator=g, device=ctx.device).to(dtype)
    b = torch.randn(n, n, generator=g, device=ctx.device).to(dtype)
    c = torch.empty(n, n, device=ctx.device, dtype=dtype)
    return time_ms(ctx, lambda _: torch.matmul(a, b, out=c))


def measure_ceilings(ctx: Context) -> dict:
    """Copy bandwidth (GB/s, bytes read + written) and matmul rate (TFLOP/s) of ctx.device, measured now
    with the same timer as the cases. Random data, never zeros (METHOD.md: zeros can run faster)."""
    if ctx.is_cuda:
        copy_bytes, n, mm_dtype = (256 if ctx.quick else 1024) * 2**20, 8192, torch.bfloat16
    else:
        copy_bytes, n, mm_dtype = (64 if ctx.quick else 256) * 2**20, (1024 if ctx.quick else 2048), torch.float32
    ms = _time_copy(ctx, copy_bytes)
    ms_mm = _time_matmul(ctx, n, mm_dtype)
    where = "GPU" if ctx.is_cuda else "CPU"
    dt = str(mm_dtype).replace("torch.", "")
    return {
        "copy": {"value": 2 * copy_bytes / (ms[1] * 1e-3) / 1e9, "unit": "GB/s", "ms": list(ms),
                 "what": f"{where} copy of {copy_bytes // 2**20} MiB fp32 (bytes read + written)"},
        "matmul": {"value": 2 * n**3 / (ms_mm[1] * 1e-3) / 1e12, "unit": "TFLOP/s", "ms": list(ms_mm),
                   "what": f"{where} {n}³ {dt} matmul", "dtype": dt},
    }


# --------------------------------------------------------------------------------------------- op cases

@dataclass
class OpCase:
    """One op at one shape/dtype, benchmarked by `run_op_case` (see bench/suites/__init__.py)."""

    suite: str
    op: str
    """op name; also the TEST_PROVIDERS key"""
    shape: str
    """e.g. "B=72 D=262144\""""
    dtype: str
    """e.g. "v=bf16 x,ξ=fp32\""""
    make_inputs: Callable[[], dict]
    """fresh keyword inputs, identical values on every call (seeded inside); grad_inputs require grad"""
    providers: dict[str, Callable]
    """name → fn(**inputs); must hold "torch" (the reference, kernels/reference)"""
    outputs: Callable[[Any], dict[str, torch.Tensor]]
    """a provider's return value → named outputs to check"""
    tol: dict[str, float]
    """output name, and "grad:<input>" for gradients → tolerance on ‖out − ref‖/‖ref‖"""
    modes: tuple[str, ...] = ("fwd",)
    """of "fwd", "bwd" (backward only, graph retained), "full" (forward + backward)"""
    loss: Callable[[Any], torch.Tensor] | None = None
    """return value → the scalar to back-propagate (bwd/full modes, gradient checks)"""
    grad_inputs: tuple[str, ...] = ()
    bytes: dict[str, int] = field(default_factory=dict)
    """mode → bytes that must move (unit GB/s, ceiling "copy")"""
    flops: dict[str, int] = field(default_factory=dict)
    """mode → FLOPs (unit TFLOP/s, ceiling "matmul"); used when `bytes` lacks the mode"""
    note: str = ""

    @property
    def name(self) -> str:
        return f"{self.op} {self.shape} {self.dtype}"


def compiled(fn: Callable) -> Callable:
    """The "torch.compile" provider of a reference op: torch.compile(fn, dynamic=False), built on the first
    call (so building or listing cases never imports dynamo; the compile happens in the check, untimed)."""
    box: list[Callable] = []

    def call(*args, **kwargs):
        if not box:
            box.append(torch.compile(fn, dynamic=False))
        return box[0](*args, **kwargs)

    return call


def _run_and_collect(case: OpCase, fn: Callable) -> dict[str, torch.Tensor]:
    inputs = case.make_inputs()
    res = fn(**inputs)
    outs = {k: v.detach() for k, v in case.outputs(res).items()}
    if case.grad_inputs and case.loss is not None:
        case.loss(res).backward()
        for name in case.grad_inputs:
            g = inputs[name].grad
            outs[f"grad:{name}"] = g if g is not None else torch.full_like(inputs[name], float("nan"))
    return outs


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (‖out − ref‖ when ref is 0); inf for NaN/Inf or a shape mismatch."""
    if out.shape != ref.shape:
        return math.inf
    o, r = out.detach().double(), ref.detach().double()
    if not bool(torch.isfinite(o).all()):
        return math.inf
    diff = float(torch.linalg.vector_norm(o - r))
    nrm = float(torch.linalg.vector_norm(r))
    return diff / nrm if nrm > 0 else diff


def check_outputs(got: dict, ref: dict, tol: dict) -> tuple[float, str]:
    """(largest err/tol, message naming the worst output). ≤ 1 passes; inf for NaN/Inf or a missing output."""
    worst, msg = -1.0, ""
    for name, r in ref.items():
        e = rel_err(got[name], r) if name in got else math.inf
        if e / tol[name] > worst:
            worst, msg = e / tol[name], f"{name}: rel err {e:.2e} vs tol {tol[name]:.0e}"
    return max(worst, 0.0), msg


def _timed_callable(case: OpCase, fn: Callable, inputs: dict, mode: str):
    """(fn(state), setup) for time_ms: what one timed call of `mode` does, and its untimed preparation."""
    leaves = [inputs[n] for n in case.grad_inputs]

    def reset():
        for t in leaves:
            t.grad = None

    if mode == "fwd":
        return (lambda _: fn(**inputs)), None
    if case.loss is None or not leaves:
        raise ValueError(f"{case.name}: mode {mode!r} needs `loss` and `grad_inputs`")
    if mode == "bwd":  # a fresh graph per call, built untimed
        return (lambda loss: loss.backward()), (lambda: (reset(), case.loss(fn(**inputs)))[1])
    if mode == "full":
        return (lambda _: case.loss(fn(**inputs)).backward()), reset
    raise ValueError(f"unknown mode {mode!r}; expected fwd, bwd or full")


def run_op_case(case: OpCase, ctx: Context) -> list[Row]:
    """The protocol for one OpCase: check every wanted provider against "torch", then time each mode."""
    if "torch" not in case.providers:
        raise ValueError(f"{case.name}: providers must include the 'torch' reference")
    provs = {n: f for n, f in case.providers.items() if n == "torch" or ctx.wants(n)}
    provs.update(TEST_PROVIDERS.get(case.op, {}))
    ref = _run_and_collect(case, case.providers["torch"])
    rows = []
    for name, fn in provs.items():
        kw = dict(suite=case.suite, op=case.op, provider=name, shape=case.shape, dtype=case.dtype)
        if name == "torch":
            ratio, msg = 0.0, "reference"
        else:
            try:
                ratio, msg = check_outputs(_run_and_collect(case, fn), ref, case.tol)
            except Exception as err:  # a provider that crashes is a failed provider, not a crashed run
                ratio, msg = math.inf, f"raised {type(err).__name__}: {err}"
        if not ratio <= 1.0:
            ctx.log(f"  FAIL {case.name} [{name}]: {msg}")
            rows += [make_row(ctx, mode=m, check_ratio=ratio, ok=False, note=f"check failed: {msg}", **kw)
                     for m in case.modes]
            continue
        inputs = case.make_inputs()
        for mode in case.modes:
            call, setup = _timed_callable(case, fn, inputs, mode)
            ms = time_ms(ctx, call, setup=setup)
            mem = peak_mem_mib(ctx, call, setup=setup)
            kms = kernel_ms(ctx, call, setup=setup, reps=3 if ms[1] > 20 else 5)
            if mode in case.bytes:
                work, unit, ceiling = case.bytes[mode], "GB/s", "copy"
            elif mode in case.flops:
                work, unit, ceiling = case.flops[mode], "TFLOP/s", "matmul"
            else:
                work = unit = ceiling = None
            note = case.note if name == "torch" else ""
            if name == "triton" and not ctx.is_cuda:
                note = "Triton CPU interpreter (TRITON_INTERPRET=1): not a speed figure"
            row = make_row(ctx, mode=mode, ms=ms, work=work, unit=unit, ceiling=ceiling, peak_mem_mib=mem,
                           kernel_ms=kms, check_ratio=ratio, note=note, **kw)
            ctx.log(f"  {case.name} [{name}] {mode}: {ms[1]:.4g} ms"
                    + (f", {row.value:.4g} {unit} ({row.ceiling_frac:.1%} of {ceiling})" if row.value else ""))
            rows.append(row)
        del inputs
    return rows


# ------------------------------------------------------------------------------------------ environment

def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return ""


def git_commit() -> str:
    """HEAD of the checkout bench/ lives in, with "+dirty" when the tree has changes; "unknown" without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("+dirty" if dirty else "")) if head else "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """Versions, device and commit of this run (pynvml telemetry is separate: gpu_telemetry)."""
    env = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "triton": _version("triton"), "cuda": torch.version.cuda, "cpu": _cpu_model(),
           "cpu_threads": torch.get_num_threads(), "commit": git_commit(),
           "triton_interpret": os.environ.get("TRITON_INTERPRET", "0")}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["device"] = torch.cuda.get_device_name(device)
        env["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                      "memory_gib": round(p.total_memory / 2**30, 2),
                      "l2_mib": round(getattr(p, "L2_cache_size", 0) / 2**20, 2) or None}
        env["cudnn"] = torch.backends.cudnn.version()
    else:
        env["device"] = f"CPU ({env['cpu']})"
    return env


def gpu_telemetry(device: torch.device) -> dict:
    """Clocks, power, temperature and throttle reasons from pynvml. Guarded at every call: pynvml may be
    missing, and it fails on machines without an NVIDIA driver."""
    if device.type != "cuda":
        return {"available": False, "reason": "not a CUDA device"}
    try:
        import pynvml
    except Exception as err:
        return {"available": False, "reason": f"pynvml not importable ({err}); pip install nvidia-ml-py"}
    try:
        pynvml.nvmlInit()
    except Exception as err:
        return {"available": False, "reason": f"nvmlInit failed: {err}"}
    out: dict[str, Any] = {"available": True}
    try:
        handle = None
        uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
        if uuid is not None:
            try:
                handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
            except Exception:
                handle = None
        if handle is None:
            handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)

        def get(key, f, *args, scale=1.0):
            try:
                v = f(handle, *args)
                out[key] = v * scale if isinstance(v, (int, float)) and scale != 1.0 else v
            except Exception as err:
                out[key] = f"n/a ({type(err).__name__})"

        get("sm_clock_mhz", pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_SM)
        get("mem_clock_mhz", pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_MEM)
        get("sm_clock_max_mhz", pynvml.nvmlDeviceGetMaxClockInfo, pynvml.NVML_CLOCK_SM)
        get("mem_clock_max_mhz", pynvml.nvmlDeviceGetMaxClockInfo, pynvml.NVML_CLOCK_MEM)
        get("power_w", pynvml.nvmlDeviceGetPowerUsage, scale=1e-3)
        get("power_limit_w", pynvml.nvmlDeviceGetEnforcedPowerLimit, scale=1e-3)
        get("temperature_c", pynvml.nvmlDeviceGetTemperature, pynvml.NVML_TEMPERATURE_GPU)
        reasons_fn = (getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
                      or getattr(pynvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None))
        if reasons_fn is not None:
            try:
                mask = int(reasons_fn(handle))
                out["throttle_mask"] = mask
                names = set()
                for attr in dir(pynvml):
                    m = re.match(r"nvmlClocks(?:Throttle|Event)Reason(\w+)$", attr)
                    val = getattr(pynvml, attr)
                    if m and isinstance(val, int) and m.group(1) not in ("All", "None", "Unknown") \
                            and val and (mask & val) == val:
                        names.add(m.group(1))
                out["throttle_reasons"] = sorted(names)
            except Exception as err:
                out["throttle_reasons"] = f"n/a ({type(err).__name__})"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return out


def device_slug(env: dict, device: torch.device) -> str:
    """"nvidia-h100-80gb-hbm3" / "cpu-intel-xeon-platinum-8481c": lower-case letters, digits and dashes."""
    if device.type == "cuda":
        name = env["device"].lower()
    else:
        model = re.sub(r"\((r|tm)\)|\bcpu\b|@.*$", " ", env.get("cpu", "").lower())
        name = "cpu " + model
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")[:60] or device.type


# ---------------------------------------------------------------------------------------------- writers

def _fmt(x, spec: str = ".3g", none: str = "—") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, spec)


def _row_md(r: Row) -> str:
    if not r.ok:
        status = f"**FAIL** ({r.note.removeprefix('check failed: ')})"
    elif r.check_ratio == 0.0 and r.provider == "torch":
        status = "ref"
    elif r.check_ratio is not None:
        status = f"ok ({r.check_ratio:.1g})"
    else:
        status = "—"
    time_s = f"{r.ms_p50:.4g} [{r.ms_p20:.4g}, {r.ms_p80:.4g}]" if r.ms_p50 is not None else (
        r.note if r.ok and r.note else "—")
    thr = f"{r.value:.4g} {r.unit}" if r.value is not None else "—"
    frac = f"{r.ceiling_frac:.1%} {r.ceiling}" if r.ceiling_frac is not None else "—"
    extra = "; ".join([f"{k} {_fmt(v) if isinstance(v, float) else v}" for k, v in r.extra.items()]
                      + ([r.note] if r.ok and r.note and r.ms_p50 is not None else []))
    cells = [r.op, r.provider, r.mode, r.shape, r.dtype, time_s, thr, frac, _fmt(r.speedup_vs_torch, ".2f"),
             _fmt(r.speedup_vs_compile, ".2f"), _fmt(r.peak_mem_mib, ".1f"), _fmt(r.kernel_ms, ".4g"), status, extra]
    return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"


MD_HEADER = ("| op | provider | mode | shape | dtype | ms p50 [p20, p80] | throughput | of ceiling | × torch "
             "| × compile | peak MiB | kernel ms | check (err/tol) | extra |\n|" + "---|" * 14)


def render_markdown(result: dict, rows: list[Row]) -> str:
    env, ceil = result["environment"], result["ceilings"]
    cpu = result["device_kind"] != "cuda"
    lines = [f"# bench: {env['device']}, {result['date']}", ""]
    if cpu:
        lines += ["**CPU figures** — small shapes, cache-resident inputs: a smoke test of the harness, not a "
                  "performance claim.", ""]
    lines += [f"Command: `{result['command']}`  ", f"Commit: `{env['commit']}`  ",
              f"torch {env['torch']}, triton {env['triton'] or '—'}, CUDA {env['cuda'] or '—'}, "
              f"Python {env['python']}, {env['cpu_threads']} CPU threads  ",
              f"Ceilings measured in this run: copy **{ceil['copy']['value']:.4g} GB/s** ({ceil['copy']['what']}); "
              f"matmul **{ceil['matmul']['value']:.4g} TFLOP/s** ({ceil['matmul']['what']})  "]
    tel = result.get("telemetry", {}).get("start", {})
    if tel.get("available"):
        lines.append("GPU at start: " + ", ".join(f"{k} {v}" for k, v in tel.items() if k != "available") + "  ")
    elif result["device_kind"] == "cuda":
        lines.append(f"GPU telemetry: {tel.get('reason', 'n/a')}  ")
    lines.append("")
    for suite in dict.fromkeys(r.suite for r in rows):
        lines += [f"## {suite}", "", MD_HEADER]
        lines += [_row_md(r) for r in rows if r.suite == suite]
        lines.append("")
    lines += ["Columns are described in bench/README.md. Times in ms; throughput = counted bytes or FLOPs / "
              "median time; × torch / × compile = speed-up over the eager / compiled reference (> 1 is faster); "
              "check = largest error/tolerance against the torch reference (≤ 1 passes).", ""]
    return "\n".join(lines)


def plot_suite(rows: list[Row], suite: str, path: str) -> str | None:
    """Grouped bar chart of median ms (p20–p80 whiskers): one panel per (op, shape, dtype), modes along x,
    one bar per provider. None when matplotlib is missing or nothing was timed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    timed = [r for r in rows if r.suite == suite and r.ms_p50 is not None]
    panels: dict[tuple, list[Row]] = {}
    for r in timed:
        panels.setdefault((r.op, r.shape, r.dtype), []).append(r)
    if not panels:
        return None
    keys = list(panels)[:12]
    ncol = min(2, len(keys))
    nrow = math.ceil(len(keys) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.5 * ncol, 3.6 * nrow), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        rs = panels[key]
        modes = list(dict.fromkeys(r.mode for r in rs))
        provs = list(dict.fromkeys(r.provider for r in rs))
        width = 0.8 / len(provs)
        for j, prov in enumerate(provs):
            xs, p50, lo, hi = [], [], [], []
            for i, mode in enumerate(modes):
                r = next((r for r in rs if r.mode == mode and r.provider == prov), None)
                if r is not None:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    p50.append(r.ms_p50)
                    lo.append(r.ms_p50 - r.ms_p20)
                    hi.append(r.ms_p80 - r.ms_p50)
            ax.bar(xs, p50, width, yerr=[lo, hi], capsize=2, label=prov, color=f"C{j}")
        ax.set_xticks(range(len(modes)), modes, fontsize=8)
        ax.set_ylabel("ms (median; p20–p80)", fontsize=8)
        ax.set_title(f"{key[0]}  {key[1]}  {key[2]}", fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"bench {suite}: lower is better", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _unique_stem(out_dir: str, stem: str) -> str:
    cand, n = stem, 2
    while os.path.exists(os.path.join(out_dir, cand + ".json")):
        cand, n = f"{stem}-{n}", n + 1
    return cand


def write_results(result: dict, rows: list[Row], out_dir: str) -> dict[str, str]:
    """<out>/<slug>-<date>[-N].json / .md / -<suite>.png. Returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    stem = _unique_stem(out_dir, f"{result['slug']}-{result['date']}")
    paths = {"json": os.path.join(out_dir, stem + ".json"), "md": os.path.join(out_dir, stem + ".md")}
    payload = dict(result, rows=[dataclasses.asdict(r) for r in rows])
    with open(paths["json"], "w") as f:
        json.dump(payload, f, indent=1, default=str)
        f.write("\n")
    with open(paths["md"], "w") as f:
        f.write(render_markdown(result, rows))
    for suite in dict.fromkeys(r.suite for r in rows):
        png = plot_suite(rows, suite, os.path.join(out_dir, f"{stem}-{suite}.png"))
        if png:
            paths[f"png:{suite}"] = png
    return paths


# ------------------------------------------------------------------------------------------------- main

def parse_args(argv):
    from bench import suites

    ap = argparse.ArgumentParser(prog="python -m bench", description=(
        "Benchmarks of the fused ops and whole UniGRPO steps against the torch reference; writes "
        "<out>/<device>-<date>.json/.md/.png. Exit 1 if any provider disagrees with the reference."))
    ap.add_argument("suites", nargs="*", help=f"suites to run (default: all of {', '.join(suites.available())})")
    ap.add_argument("--quick", action="store_true", help="smaller shapes and shorter timing (CI smoke test)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="results directory (default: bench/results)")
    ap.add_argument("--providers", default=None,
                    help="comma-separated providers to run (torch always runs: it is the reference), e.g. "
                         "torch,torch.compile,triton,cuda. Default: all on GPU; torch,torch.compile on CPU")
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    ap.add_argument("--list", action="store_true", help="list suites and their cases, run nothing")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the suites; 0 if every check passed, 1 if any provider disagreed with the reference, 2 on a usage
    error."""
    from bench import suites as registry

    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench: error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    providers = tuple(p.strip() for p in args.providers.split(",") if p.strip()) if args.providers else None
    if device.type == "cpu" and providers and "triton" in providers:
        # Triton on CPU tensors is its interpreter: it must be chosen before any @triton.jit runs.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        names = args.suites or registry.available()
        mods = [registry.load(n) for n in names]
    except ValueError as err:
        print(f"bench: error: {err}", file=sys.stderr)
        return 2
    ctx = Context(device=device, quick=args.quick, providers=providers)
    if args.list:
        for m in mods:
            print(f"{m.NAME}: {m.DESCRIPTION}")
            for c in m.cases(ctx):
                print(f"  {c.name}")
        return 0
    ctx.env = environment(device)
    started = _dt.datetime.now()
    telemetry = {"start": gpu_telemetry(device)}
    ctx.log(f"bench on {ctx.env['device']} (commit {ctx.env['commit']}); measuring ceilings ...")
    ctx.ceilings = measure_ceilings(ctx)
    ctx.log(f"  copy {ctx.ceilings['copy']['value']:.4g} GB/s, matmul {ctx.ceilings['matmul']['value']:.4g} "
            f"TFLOP/s ({ctx.ceilings['matmul']['dtype']})")
    rows: list[Row] = []
    for m in mods:
        for case in m.cases(ctx):
            ctx.log(f"{m.NAME}: {case.name}")
            rows += m.run(case, ctx)
    fill_speedups(rows)
    telemetry["end"] = gpu_telemetry(device)
    cmd = "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"schema": 1, "date": started.strftime("%Y-%m-%d"), "started": started.isoformat(timespec="seconds"),
              "wall_s": round((_dt.datetime.now() - started).total_seconds(), 1), "command": cmd.strip(),
              "device_kind": device.type, "slug": device_slug(ctx.env, device), "quick": args.quick,
              "suites": [m.NAME for m in mods], "environment": ctx.env, "ceilings": ctx.ceilings,
              "telemetry": telemetry, "row_fields": list(ROW_FIELDS)}
    paths = write_results(result, rows, args.out)
    bad = [r for r in rows if not r.ok]
    print(render_markdown(result, rows))
    print("written: " + ", ".join(paths.values()))
    if bad:
        print(f"bench: {len(bad)} row(s) FAILED the reference check: "
              + "; ".join(sorted({f'{r.op} [{r.provider}]: {r.note}' for r in bad})), file=sys.stderr)
        return 1
    return 0
