"""The one-screen summary of bench/device_check.sh, and the merge of its per-suite bench results.

    python -m bench.device_summary STATUS_TSV RESULTS_DIR [--merge-to DIR]

STATUS_TSV: one line per step, tab-separated: name, kind (setup | test | bench), exit status, seconds,
budget seconds, log path (device_check.sh writes it). RESULTS_DIR: the `python -m bench --out` folder of the
steps (one <slug>-<date>[-N].json per bench invocation). The per-suite results are merged into one
<slug>-<date>.json / .md (rows concatenated in suite order; the header — environment, ceilings, telemetry —
is the first run's, every run's command and ceilings are kept under "runs") plus one plot per suite, written
to --merge-to (default RESULTS_DIR/..).

The summary: each step's verdict and time against its budget (a test file's pytest counts), then one line per
(suite, op, mode, shape) with, per non-reference provider, the median time, its fraction of the measured
roofline (copy GB/s or matmul TFLOP/s), × eager and × torch.compile, and the profiler's kernel time where it
was measured. Exit status 0 when every step passed (pytest's 5, "no tests collected", counts as passed) and
every row agrees with its reference; 1 otherwise.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import sys

from .context import Row
from .reporting import write_results

PASS_CODES = (0, 5)
SCREEN_OP_LINES = 30


def load_status(path: str) -> list[dict]:
    """The step lines of STATUS_TSV as dicts (name, kind, rc, seconds, budget, log)."""
    steps = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 6:
                raise ValueError(f"{path}:{n}: expected 6 tab-separated fields (name, kind, rc, seconds, budget, "
                                 f"log), got {len(parts)}: {line!r}")
            name, kind, rc, secs, budget, log = parts
            steps.append(dict(name=name, kind=kind, rc=int(rc), seconds=int(secs), budget=int(budget), log=log))
    return steps


def pytest_counts(log: str) -> str:
    """pytest's final tally ("12 passed, 3 skipped") from a log, or "" when the log has none."""
    try:
        with open(log, errors="replace") as f:
            text = f.read()[-20000:]
    except OSError:
        return ""
    found = re.findall(r"=*\s*((?:\d+ (?:passed|failed|skipped|error|errors|xfailed|xpassed|deselected|warnings?)"
                       r"(?:, )?)+) in [\d.]+s", text)
    return found[-1].strip().rstrip(",") if found else ""


def load_results(results_dir: str) -> list[dict]:
    """Every bench JSON in results_dir, oldest first (by its start time)."""
    runs = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            runs.append(json.load(f))
    return sorted(runs, key=lambda r: r.get("started", ""))


def merge(runs: list[dict]) -> tuple[dict, list[Row]]:
    """(header, rows) of the runs as one result (see the module docstring)."""
    if not runs:
        raise ValueError("no bench results to merge")
    fields = {f.name for f in dataclasses.fields(Row)}
    rows = [Row(**{k: v for k, v in r.items() if k in fields}) for run in runs for r in run["rows"]]
    head = {k: v for k, v in runs[0].items() if k != "rows"}
    head.update(suites=[s for run in runs for s in run["suites"]], wall_s=round(sum(r["wall_s"] for r in runs), 1),
                command="; ".join(r["command"] for r in runs), quick=[r["quick"] for r in runs],
                runs=[{k: r.get(k) for k in ("command", "started", "wall_s", "ceilings", "quick")} for r in runs])
    return head, rows


def write_merged(head: dict, rows: list[Row], out_dir: str) -> dict[str, str]:
    return write_results(head, rows, out_dir)


def _provider_cell(r: Row) -> str:
    if not r.ok:
        return f"{r.provider} FAIL"
    if r.ms_p50 is None:
        return f"{r.provider} —"
    cell = f"{r.provider} {r.ms_p50:.3g}ms"
    if r.ceiling_frac is not None:
        cell += f" {r.ceiling_frac:.0%}"
    sp = [f"×{x:.2g}" if x is not None else "×—" for x in (r.speedup_vs_torch, r.speedup_vs_compile)]
    cell += " " + "/".join(sp)
    if getattr(r, "kernel_ms", None) is not None:
        cell += f" k{r.kernel_ms:.3g}"
    return cell


def op_lines(rows: list[Row]) -> list[str]:
    """One line per (suite, op, mode, shape, dtype): the non-reference providers' cells (torch's own time
    first, as the yardstick)."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.suite, r.op, r.mode, r.shape, r.dtype), []).append(r)
    lines = []
    for (suite, op, mode, shape, _), rs in groups.items():
        ref = next((r for r in rs if r.provider == "torch"), None)
        head = f"{suite}/{op} {mode} {shape}"
        ref_s = f"torch {ref.ms_p50:.3g}ms" if ref is not None and ref.ms_p50 is not None else "torch —"
        cells = [_provider_cell(r) for r in rs if r.provider != "torch"]
        lines.append(f"{head}: {ref_s} | " + " | ".join(cells) if cells else f"{head}: {ref_s}")
    return lines


def failures(steps: list[dict], rows: list[Row]) -> tuple[list[str], list[Row]]:
    """(names of the steps that failed or timed out, rows that disagree with their reference)."""
    return [s["name"] for s in steps if s["rc"] not in PASS_CODES], [r for r in rows if not r.ok]


def render(steps: list[dict], rows: list[Row], paths: dict[str, str] | None = None) -> str:
    out = ["== device check summary =="]
    for s in steps:
        verdict = "ok" if s["rc"] in PASS_CODES else ("TIMEOUT" if s["rc"] in (124, 137) else f"FAIL rc={s['rc']}")
        counts = pytest_counts(s["log"]) if s["kind"] == "test" else ""
        out.append(f"{s['name']:<24} {verdict:<11} {s['seconds']:>4}s/{s['budget']}s  {counts}")
    if rows:
        out.append("-- ops: provider median, of roofline, ×eager/×compile, k = kernel ms (profiler) --")
        lines = op_lines(rows)
        out += lines[:SCREEN_OP_LINES]
        if len(lines) > SCREEN_OP_LINES:
            out.append(f"... {len(lines) - SCREEN_OP_LINES} more lines in the merged markdown")
    bad_steps, bad_rows = failures(steps, rows)
    for r in bad_rows[:5]:
        out.append(f"DISAGREES: {r.suite}/{r.op} [{r.provider}] {r.mode} {r.shape}: {r.note}")
    if paths:
        out.append("merged: " + ", ".join(paths.values()))
    out.append("RESULT: " + ("PASS" if not (bad_rows or bad_steps) else
                             f"FAIL ({len(bad_steps)} step(s): {', '.join(bad_steps) or '—'}; "
                             f"{len(bad_rows)} row(s) disagree with the reference)"))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.device_summary", description=__doc__.split("\n\n")[0])
    ap.add_argument("status")
    ap.add_argument("results_dir")
    ap.add_argument("--merge-to", default=None)
    args = ap.parse_args(argv)
    steps = load_status(args.status)
    runs = load_results(args.results_dir) if os.path.isdir(args.results_dir) else []
    rows, paths = [], None
    if runs:
        head, rows = merge(runs)
        paths = write_merged(head, rows, args.merge_to or os.path.dirname(os.path.abspath(args.results_dir)))
    print(render(steps, rows, paths))
    bad_steps, bad_rows = failures(steps, rows)
    return 1 if bad_steps or bad_rows else 0


if __name__ == "__main__":
    sys.exit(main())
