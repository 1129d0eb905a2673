"""What a suite sees of the run and the rows it returns: `Context` (device, --quick, the --providers filter,
the measured ceilings, the environment, logging), CPU_DEFAULT_PROVIDERS, the long-format result `Row` with
its field list ROW_FIELDS, `make_row` (throughput and ceiling fraction from the counted work) and
`fill_speedups` (speed-ups over the eager and compiled torch references, filled in once all rows exist).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

CPU_DEFAULT_PROVIDERS = ("torch", "torch.compile")
"""On CPU only these run unless --providers names others (Triton there is the ~1000× slower interpreter)."""

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
