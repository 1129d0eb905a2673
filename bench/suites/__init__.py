"""The suite registry: a suite is one module bench/suites/<name>.py; the harness discovers it by file name.

A suite module defines:

    NAME: str                              the suite's name (= the module name), e.g. "flow"
    DESCRIPTION: str                       one line for `python -m bench --list`
    def cases(ctx) -> list                 the cases to run on ctx.device (honour ctx.quick and ctx.is_cuda:
                                           small CPU shapes so CI smoke-tests the harness); each case has a
                                           `.name` (str) for logs and --list
    def run(case, ctx) -> list[Row]        check, then time, one case; returns context.Row objects

`ctx` is a context.Context: ctx.device, ctx.is_cuda, ctx.quick, ctx.wants(provider) (the --providers
filter), ctx.ceilings (measured copy GB/s and matmul TFLOP/s), ctx.log(msg).

Op suites (flow, token, ...) need not write `run` themselves: describe each case as a checks.OpCase
(inputs, providers with "torch" = the reference, outputs to check with their tolerances, modes, bytes or
FLOPs per mode) and set `run = checks.run_op_case`. That gives the whole protocol: each provider's outputs
(and gradients) are checked against the torch reference on the benchmarked inputs before anything is timed,
a provider that disagrees gets a failing row (and the run exits non-zero), then each mode is timed, its
throughput computed against the same run's ceiling, and its peak memory taken. bench/suites/flow.py is the
model to copy. Whole-program suites (step) build their Rows with context.make_row.

Suites: flow (sde_step, flow_grpo_loss), token (token_logprobs, linear_text_grpo_loss), attention (packed
text/image attention against dense causal FlashAttention), rollout (denoising loop with/without CFG and CUDA
graph, text decoding), step (one UniGRPO iteration).
"""
from __future__ import annotations

import importlib
import os
import pkgutil
from types import ModuleType

PLANNED = ("flow", "token", "attention", "rollout", "step")
"""The order suites run in when none is named (unknown extra modules follow, sorted)."""

_REQUIRED = ("NAME", "DESCRIPTION", "cases", "run")


def available() -> list[str]:
    """Names of the suite modules present, in PLANNED order then the rest sorted."""
    here = os.path.dirname(__file__)
    names = [m.name for m in pkgutil.iter_modules([here]) if not m.name.startswith("_")]
    return [n for n in PLANNED if n in names] + sorted(n for n in names if n not in PLANNED)


def load(name: str) -> ModuleType:
    """Import suite `name`; ValueError naming what is missing or which suites exist."""
    names = available()
    if name not in names:
        planned = [n for n in PLANNED if n not in names]
        raise ValueError(f"unknown bench suite {name!r}; available: {', '.join(names)}"
                         + (f" (planned, not written yet: {', '.join(planned)})" if planned else ""))
    mod = importlib.import_module(f"{__name__}.{name}")
    missing = [a for a in _REQUIRED if not hasattr(mod, a)]
    if missing:
        raise ValueError(f"bench suite module {mod.__name__} lacks {', '.join(missing)} "
                         "(see bench/suites/__init__.py for the interface)")
    return mod
