"""The op cases and their reference checks (protocol step 2 of bench/harness.py's docstring): `OpCase` (one op
at one shape and dtype, its providers with "torch" as the reference, outputs and tolerances, modes and counted
work), `compiled` (the lazily built torch.compile provider), `rel_err` / `check_outputs` (‖out − ref‖ / ‖ref‖
in float64 against the tolerances), and `run_op_case`, the whole protocol for one OpCase: check every wanted
provider against the reference, then time each mode. TEST_PROVIDERS is the test hook: op → {provider name
→ callable with the op's keyword signature}, merged into every OpCase of that op whatever --providers says
(tests/test_bench.py injects a deliberately wrong provider through it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .context import Context, Row, make_row
from .timing import kernel_ms, peak_mem_mib, time_ms

TEST_PROVIDERS: dict[str, dict[str, Callable]] = {}
"""Test hook (see the module docstring): op → {provider name → fn}; merged into every OpCase of that op."""


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
