"""End-of-run artefacts: the reward curve (PNG) and report.md (scores before/after with 95% intervals, the
time split, where everything is)."""
from __future__ import annotations

import json
import os

import numpy as np

from unigrpo.evaluate import format_summary, is_reward_summary, score_changes
from unigrpo.io import save_figure, write_text_atomic


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_reward_curve(history: list[dict], path: str, evals: list[tuple[int, float]] | None = None,
                      eval_label: str = "GenEval-style") -> str:
    """Training reward per iteration (and a moving average), plus held-out points (`eval_label`) if given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([m["step"] for m in history])
    reward = np.array([m["reward/mean"] for m in history])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, reward, color="0.7", lw=1, label="train reward (batch mean)")
    if len(reward) >= 5:
        k = max(2, len(reward) // 10)
        ma = np.convolve(reward, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], ma, color="C0", lw=2, label=f"moving average ({k})")
    if evals:
        xs, ys = zip(*evals)
        ax.plot(xs, ys, "o-", color="C3", label=f"held-out {eval_label}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("score")
    values = list(reward) + [y for _, y in (evals or [])]
    if values and 0.0 <= min(values) and max(values) <= 1.0:
        ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)


GRID_LEGEND = ("Frames: green passes strict, amber passes GenEval-style only (extra objects), red fails; each "
               "caption is the prompt | the reasoning.")


def write_report(out_dir: str, *, before: dict | None, after: dict | None, history: list[dict],
                 config: dict, extra: str = "") -> str:
    """report.md in out_dir; `before`/`after` are evaluate.summarize() or summarize_rewards() dicts."""
    lines = ["# UniGRPO run report", ""]
    if before and after and is_reward_summary(after):
        b, a = before["overall"]["rewards"], after["overall"]["rewards"]
        lines += ["| reward (held-out mean) | before | after | change |", "|---|---|---|---|"]
        lines += [f"| {k} | {b[k]['mean']:.4f} | {v['mean']:.4f} | {v['mean'] - b[k]['mean']:+.4f} |"
                  for k, v in a.items() if k in b]
        lines += ["", "Per-tag means with 95% intervals below.", ""]
    elif before and after:
        b, a = before["overall"], after["overall"]
        lines += [f"Held-out, 95% intervals: {score_changes(before, after, '→')}.", "",
                  "Strict is GenEval-style and exactly the asked-for objects, a reward-hacking indicator (never a "
                  "reward): a GenEval-style gain without a strict gain means extra objects.", ""]
        if "images" in b and "images" in a:
            bi, ai = b["images"], a["images"]
            lines += ["| image statistic | base | after | after / base |", "|---|---|---|---|"]
            lines += [f"| {k.replace('_', ' ')} | {bi[k]:.4f} | {ai[k]:.4f} | {ai[k] / bi[k] if bi[k] else float('nan'):.2f} |"
                      for k in bi if k in ai]
            lines += [""]
    for title, summ, sub in (("Before (base)", before, "eval_base"), ("After (UniGRPO)", after, "eval_final")):
        if summ:
            lines += [f"## {title}", "", "```", format_summary(summ), "```", ""]
            if os.path.exists(os.path.join(out_dir, sub, "grid.png")):
                legend = "Captions: prompt | reasoning." if is_reward_summary(summ) else GRID_LEGEND
                lines += [f"![{title}: held-out samples]({sub}/grid.png)", "", legend, ""]
    if history:
        keys = ("time/rollout_text", "time/rollout_image", "time/reward", "time/train")
        tot = {k: sum(m.get(k, 0.0) for m in history) for k in keys}
        all_t = sum(tot.values()) or 1.0
        lines += ["## Time split", "", "| part | seconds | share |", "|---|---|---|"]
        lines += [f"| {k.split('/')[1]} | {v:.0f} | {v / all_t:.0%} |" for k, v in tot.items()]
        lines += ["", f"{len(history)} iterations, {np.mean([m['samples_per_s'] for m in history]):.1f} samples/s", ""]
        lines += ["![reward curve](reward_curve.png)", ""]
    if extra:
        lines += [extra, ""]
    lines += ["## Config", "", "```json", json.dumps(config, indent=1), "```", ""]
    return write_text_atomic(os.path.join(out_dir, "report.md"), "\n".join(lines))
