"""The bench command line: `python -m bench` / `unigrpo bench` parse here and run the suites.

    python -m bench [suite ...] [--quick] [--out DIR] [--providers LIST] [--device DEV] [--list]

Protocol (bench/README.md describes it too, with every column of the results):
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
   the call's own kernels (torch.profiler's CUDA activity; see `timing.kernel_ms`), so a fused op of tens of
   µs shows how much of its end-to-end time is host dispatch. CPU: time.perf_counter around each call,
   p20/p50/p80 of 5–100 calls; CPU inputs at these shapes stay in cache, so CPU figures are smoke tests of
   the harness, not claims.
4. One long-format row per (suite, op, provider, mode, shape, dtype); see context.ROW_FIELDS and
   bench/README.md.
   Speed-ups over "torch" (eager reference) and "torch.compile" are filled in after all rows exist.
5. Results: <out>/<device-slug>-<YYYY-MM-DD>[-N].json, .md and one PNG bar chart per suite.

Where each step lives: timing.py (1, 3), checks.py (2), context.py (4), reporting.py (5); environment.py
records versions, commit and GPU telemetry. This module holds only the command line.

Test hook: checks.TEST_PROVIDERS (op → {provider name → callable with the op's keyword signature}) is merged
into every OpCase of that op, whatever --providers says. tests/test_bench.py injects a deliberately wrong
provider this way and checks that the run exits non-zero. Nothing else reads it.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys

import torch

from .context import ROW_FIELDS, Context, Row, fill_speedups
from .environment import REPO_ROOT, device_slug, environment, gpu_telemetry
from .reporting import render_markdown, write_results
from .timing import measure_ceilings

DEFAULT_OUT = os.path.join(REPO_ROOT, "bench", "results")


def parse_args(argv):
    from . import suites

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
    from . import suites as registry

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
