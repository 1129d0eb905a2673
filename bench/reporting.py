"""The writers of a run's results: the markdown table (`MD_HEADER`, `_row_md`, `render_markdown`), one PNG bar
chart per suite (`plot_suite`, matplotlib optional) and `write_results`, which writes
<out>/<device-slug>-<date>[-N].json / .md / -<suite>.png without overwriting an earlier run's files.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

from .context import Row


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
