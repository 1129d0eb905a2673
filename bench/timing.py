"""The timers and the device ceilings (protocol steps 1 and 3 of bench/harness.py's docstring): `sync`,
`time_ms` (p20/p50/p80 over QUANTILES, CUDA events with an L2 flush on GPU, time.perf_counter on CPU, each
call with an untimed setup), `peak_mem_mib`, `kernel_ms` (device time of a call's own kernels from
torch.profiler, attributed by `attribute_device_time` inside host ranges named _MARK), and
`measure_ceilings` (copy GB/s and matmul TFLOP/s of the device, measured in the same run with the same timer).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

from .context import Context

QUANTILES = (0.2, 0.5, 0.8)


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
    with the same timer as the cases. Random data, never zeros (zeros can run faster)."""
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
