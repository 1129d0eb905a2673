"""The report of `unigrpo compare`: tables, claim checks and plots from the runs' result.json files.

Everything here reads finished runs only (`unigrpo compare --report-only` rebuilds it). A block between
`<!-- discussion -->` and `<!-- /discussion -->` in an existing report is kept, so hand-written analysis
survives regeneration.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from unigrpo.data import DataConfig, tag_order
from unigrpo.evaluate import EvalConfig, evaluate, mean_ci, wilson
from unigrpo.io import save_figure, write_text_atomic
from unigrpo.model.build import load_bundle
from unigrpo.report import read_metrics
from unigrpo.viz import save_image_grid

from .config import BASE, METHODS, CompareConfig, episode_rounds_of, method_spec, run_dir, shared_train_config, sweep_beta

DISCUSSION = ("<!-- discussion -->", "<!-- /discussion -->")
SCORES = ("ta", "geneval", "strict")
SCORE_NAMES = {"ta": "TA-style", "geneval": "GenEval-style", "strict": "strict"}


# ------------------------------------------------------------------------------------------------ loading
def load_results(cfg: CompareConfig) -> dict[str, list[dict]]:
    """{method: [result per finished seed]} for the base and every configured method (missing runs left out)."""
    out: dict[str, list[dict]] = {}
    tc = shared_train_config(cfg)
    data = (tc.data.eval, episode_rounds_of(tc))
    for m, seeds in [(BASE, [None])] + [(m, cfg.seeds) for m in cfg.all_methods]:
        rs = []
        for s in seeds:
            path = os.path.join(run_dir(cfg, m, s), "result.json")
            if os.path.exists(path):
                with open(path) as f:
                    r = json.load(f)
                _check_same_setup(cfg, r, path, data)
                rs.append(r)
        if rs:
            out[m] = rs
    return out


def _check_same_setup(cfg: CompareConfig, r: dict, path: str, data: tuple[str, int]) -> None:
    """A finished run from another budget or evaluation (data.eval, rounds) must not enter the table."""
    got = (r.get("eval_data", "shapes"), r.get("rounds", 1))   # files from before episodes: the shapes world
    if got != data:
        raise ValueError(f"{path} was evaluated on {got[0]!r} ({got[1]} round(s)), this comparison's train_config "
                         f"{cfg.train_config!r} evaluates on {data[0]!r} ({data[1]}); give it another out= (e.g. "
                         "out=runs/compare_edit for tiny_edit) or delete the run")
    n = len(r["nocfg"]["ta"])
    if n != cfg.eval_samples:
        raise ValueError(f"{path} holds {n} held-out samples, this comparison evaluates {cfg.eval_samples}; "
                         "delete the run or use the same eval_samples")
    tc = r.get("train_config")
    if tc is not None and tc["iterations"] != cfg.iterations:
        raise ValueError(f"{path} was trained for {tc['iterations']} iterations, this comparison for "
                         f"{cfg.iterations}; delete the run or use the same iterations")


def label(method: str) -> str:
    return "base (pre-trained)" if method == BASE else method_spec(method).label


def pooled(results: list[dict], score: str, ev: str = "nocfg", category: str | None = None) -> tuple[float, tuple]:
    """(mean, 95% interval) of one score over the held-out prompts (optionally one category). Every seed is
    evaluated on the same prompts, so each prompt's score is first averaged over the seeds and the interval
    is over prompts (mean ± 1.96·s/√n); a single run's 0/1 scores get the Wilson interval."""
    x = np.mean([np.asarray(r[ev][score], float) for r in results], 0)
    if category is not None:
        x = x[np.asarray(results[0][ev]["categories"]) == category]
    if len(x) == 0:
        return float("nan"), (float("nan"), float("nan"))
    ci = wilson(float(x.sum()), len(x)) if len(results) == 1 and score != "ta" else mean_ci(x)
    return float(x.mean()), ci


def per_seed(results: list[dict], score: str, ev: str = "nocfg") -> list[float]:
    return [float(np.mean(r[ev][score])) for r in results]


def paired(a: list[dict], b: list[dict], score: str, ev_a: str = "nocfg", ev_b: str = "nocfg") -> dict:
    """A − B over the shared held-out prompts: per prompt, each side averaged over its seeds; mean ± 1.96·s/√n.
    Also how many seed pairs (the same seed on both sides; every seed of A when B is the base) agree with
    the mean's sign."""
    xa = np.mean([np.asarray(r[ev_a][score], float) for r in a], 0)
    xb = np.mean([np.asarray(r[ev_b][score], float) for r in b], 0)
    d = xa - xb
    h = 1.96 * float(np.std(d, ddof=1)) / math.sqrt(len(d))
    mean_a = {r["seed"]: float(np.mean(r[ev_a][score])) for r in a}
    mean_b = {r["seed"]: float(np.mean(r[ev_b][score])) for r in b}
    if list(mean_b) == [None]:     # B is the base: every seed of A against its one evaluation
        pairs = [(x, mean_b[None]) for x in mean_a.values()]
    else:                          # the same seed on both sides
        pairs = [(mean_a[k], mean_b[k]) for k in mean_a if k in mean_b]
    sign = np.sign(d.mean())
    agree = sum(np.sign(x - y) == sign for x, y in pairs)
    return {"diff": float(d.mean()), "ci": (float(d.mean()) - h, float(d.mean()) + h), "agree": int(agree),
            "pairs": len(pairs)}


def verdict(p: dict, direction: int) -> str:
    """"holds" when the interval excludes 0 on the claimed side and every seed pair agrees; "reversed" when it
    excludes 0 on the other side; else "not supported"."""
    lo, hi = p["ci"]
    if direction > 0 and lo > 0 or direction < 0 and hi < 0:
        return "holds" if p["agree"] == p["pairs"] else "holds on the pooled interval, not on every seed"
    if direction > 0 and hi < 0 or direction < 0 and lo > 0:
        return "reversed"
    return "not supported (interval includes 0)"


# ------------------------------------------------------------------------------------------------ tables
def _ci(mean: float, ci: tuple) -> str:
    return f"{mean:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _mean_of(results: list[dict], key, ev: str = "nocfg") -> float:
    return float(np.mean([key(r[ev]["summary"]["overall"]) for r in results]))


def main_table(res: dict[str, list[dict]]) -> str:
    rows = ["| method | seeds | TA-style | GenEval-style | strict | GenEval-style per seed | plans valid | "
            "velocity drift | saturation | edge energy | lit fraction |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, rs in res.items():
        cells = [_ci(*pooled(rs, s)) for s in SCORES]
        seeds = ", ".join(f"{x:.3f}" for x in per_seed(rs, "geneval")) if m != BASE else "—"
        img = [_mean_of(rs, lambda o, k=k: o["images"][k]) for k in ("saturation", "edge_energy", "lit_fraction")]
        rows.append(f"| {label(m)} | {len(rs) if m != BASE else '—'} | {' | '.join(cells)} | {seeds} | "
                    f"{_mean_of(rs, lambda o: o['plan_valid']):.1%} | "
                    f"{np.mean([r['velocity_drift'] for r in rs]):.4f} | {img[0]:.3f} | {img[1]:.4f} | {img[2]:.3f} |")
    return "\n".join(rows)


def categories(res: dict[str, list[dict]]) -> list[str]:
    """The held-out prompts' categories (the shapes world's, or the edit kinds for episodes), in table order."""
    return tag_order(res[BASE][0]["nocfg"]["categories"])


def category_table(res: dict[str, list[dict]], score: str) -> str:
    cats = categories(res)
    rows = ["| method | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
    for m, rs in res.items():
        rows.append(f"| {label(m)} | " + " | ".join(_ci(*pooled(rs, score, category=c)) for c in cats) + " |")
    return "\n".join(rows)


def model_evaluations(train_config: dict, rounds: int) -> int:
    """Image-expert evaluations per training episode: N per round, twice with CFG (its unconditional branch);
    the R − 1 clean-block forwards and the text are the same for both and not counted (ALGORITHM.md §12)."""
    ro = train_config["rollout"]
    return rounds * ro["steps"] * (2 if ro.get("cfg_scale", 1.0) != 1.0 else 1)


def cost_table(res: dict[str, list[dict]]) -> str:
    """Model evaluations per episode and measured training time of the CFG-free and the CFG-rollout runs."""
    rows = ["| method | rounds R | steps N | model evaluations per episode | training time per run, median (s) | "
            "time ratio |", "|---|---|---|---|---|---|"]
    ref = None
    for m in ("unigrpo", "cfg_rollouts"):
        if m not in res:
            continue
        rs = res[m]
        R = rs[0].get("rounds", 1)
        t = float(np.median([r["train_s"] for r in rs]))
        ref = t if ref is None else ref
        rows.append(f"| {label(m)} | {R} | {rs[0]['train_config']['rollout']['steps']} | "
                    f"{model_evaluations(rs[0]['train_config'], R)} | {t:.0f} | {t / ref:.2f}× |")
    return "\n".join(rows) if len(rows) > 2 else ""


def cfg_table(res: dict[str, list[dict]]) -> str:
    rows = ["| method | evaluated | TA-style | GenEval-style | strict |", "|---|---|---|---|---|"]
    for m, rs in res.items():
        if "cfg" not in rs[0]:
            continue
        for ev, name in (("nocfg", "without CFG"), ("cfg", "with CFG")):
            rows.append(f"| {label(m)} | {name} | " + " | ".join(_ci(*pooled(rs, s, ev)) for s in SCORES) + " |")
    return "\n".join(rows)


ALL = SCORES
CLAIMS = [  # (statement, A, B, eval of A, eval of B, claimed sign of A − B (0: "not worse"), scores judged)
    ("UniGRPO beats FlowGRPO only", "unigrpo", "flowgrpo_only", "nocfg", "nocfg", +1, ALL),
    ("UniGRPO beats TextGRPO only", "unigrpo", "textgrpo_only", "nocfg", "nocfg", +1, ALL),
    ("FlowGRPO only beats the base", "flowgrpo_only", BASE, "nocfg", "nocfg", +1, ALL),
    ("TextGRPO only beats the base", "textgrpo_only", BASE, "nocfg", "nocfg", +1, ALL),
    ("UniGRPO beats ReFL", "unigrpo", "refl", "nocfg", "nocfg", +1, ALL),
    ("UniGRPO beats ReFL at lr/10", "unigrpo", "refl_low_lr", "nocfg", "nocfg", +1, ALL),
    ("CFG-free training is as good when evaluated with CFG (UniGRPO vs CFG rollouts, both with CFG)",
     "unigrpo", "cfg_rollouts", "cfg", "cfg", 0, ALL),
    ("No regulariser reward-hacks: lower on the strict check than velocity MSE", "reg_none", "unigrpo",
     "nocfg", "nocfg", -1, ("strict",)),
    ("Velocity MSE is not worse than latent KL", "unigrpo", "reg_latent_kl", "nocfg", "nocfg", 0, ALL),
    ("RatioNorm helps", "unigrpo", "ratio_norm_off", "nocfg", "nocfg", +1, ALL),
]


def claims_table(res: dict[str, list[dict]]) -> str:
    rows = ["| claim | score | A − B [95% CI] | seeds agreeing | verdict |", "|---|---|---|---|---|"]
    for text, a, b, ev_a, ev_b, direction, scores in CLAIMS:
        if a not in res or b not in res or ev_a not in res[a][0] or ev_b not in res[b][0]:
            continue
        for s in scores:
            p = paired(res[a], res[b], s, ev_a, ev_b)
            if direction == 0:   # "not worse": only a significant deficit refutes it; no difference is not proof
                lo, hi = p["ci"]
                v = ("not shown worse (interval includes 0)" if lo <= 0 <= hi else
                     "holds: better" if lo > 0 else "does not hold: worse")
            else:
                v = verdict(p, direction)
            rows.append(f"| {text} | {SCORE_NAMES[s]} | {p['diff']:+.3f} [{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}] | "
                        f"{p['agree']}/{p['pairs']} | {v} |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------ plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_curves(cfg: CompareConfig, method: str) -> np.ndarray:
    """Training reward per iteration: float [seeds, iterations] (NaN where a seed has fewer)."""
    curves = []
    for s in cfg.seeds:
        path = os.path.join(run_dir(cfg, method, s), "metrics.jsonl")
        if os.path.exists(path):   # a resumed run re-logs the steps after its checkpoint: keep the last
            by_step = {m["step"]: m["reward/mean"] for m in read_metrics(path)}
            curves.append([by_step[k] for k in sorted(by_step)])
    if not curves:
        return np.zeros((0, 0))
    n = max(map(len, curves))
    return np.array([c + [np.nan] * (n - len(c)) for c in curves])


def reward_name(res: dict[str, list[dict]]) -> str:
    """The training reward of the runs, as named in their configs (e.g. "shapes_clean")."""
    names = {"+".join(str(r["name"] if isinstance(r, dict) else r) for r in run["train_config"]["rewards"])
             for rs in res.values() for run in rs if run.get("train_config") and "rewards" in run["train_config"]}
    return ", ".join(sorted(names)) or "verifier"


def plot_curves(cfg: CompareConfig, methods: list[str], path: str, reward: str = "verifier") -> str:
    plt = _plt()
    panels = [["unigrpo", "flowgrpo_only", "textgrpo_only", "refl", "refl_low_lr"],
              ["unigrpo", "cfg_rollouts", "reg_none", "reg_latent_kl", "ratio_norm_off"]]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    for ax, panel, title in zip(axes, panels, ("baselines", "ablations")):
        for i, m in enumerate([m for m in panel if m in methods]):
            c = read_curves(cfg, m)
            if c.size == 0:
                continue
            k = min(5, c.shape[1])
            sm = np.array([np.convolve(row, np.ones(k) / k, mode="valid") for row in c])
            x = np.arange(k - 1, c.shape[1])
            ax.plot(x, np.nanmean(sm, 0), color=f"C{i}", lw=2, label=f"{label(m)} ({c.shape[0]} seeds)")
            ax.fill_between(x, np.nanmin(sm, 0), np.nanmax(sm, 0), color=f"C{i}", alpha=0.15)
        ax.set_title(f"training reward ({reward}, batch mean), {title}")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set_ylabel("reward, moving average of 5 (band: min–max over seeds)")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_categories(res: dict[str, list[dict]], path: str) -> str:
    plt = _plt()
    fig, axes = plt.subplots(2, 1, figsize=(13, 8))
    methods, cats = list(res), categories(res)
    w = 0.8 / len(methods)
    for ax, score in zip(axes, ("geneval", "ta")):
        for i, m in enumerate(methods):
            vals = [pooled(res[m], score, category=c) for c in cats]
            mean = np.array([v[0] for v in vals])
            err = np.array([[v[0] - v[1][0], v[1][1] - v[0]] for v in vals]).T
            ax.bar(np.arange(len(cats)) + (i - (len(methods) - 1) / 2) * w, mean, w, yerr=err, capsize=2,
                   color="0.5" if m == BASE else f"C{i}", label=label(m))
        ax.set_xticks(np.arange(len(cats)), cats)
        ax.set_ylabel(f"{SCORE_NAMES[score]} (95% CI)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7, ncol=3, loc="upper right")
    axes[0].set_title("held-out scores per category, seeds pooled, no CFG")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_hacking(res: dict[str, list[dict]], path: str) -> str:
    plt = _plt()
    methods = list(res)
    names = [label(m) for m in methods]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    x = np.arange(len(methods))
    ge = [pooled(res[m], "geneval")[0] for m in methods]
    st = [pooled(res[m], "strict")[0] for m in methods]
    axes[0].bar(x - 0.2, ge, 0.4, label="GenEval-style (presence)")
    axes[0].bar(x + 0.2, st, 0.4, label="strict (exact object count)")
    axes[0].set_title("verifier vs the stricter held-out check")
    axes[0].legend(fontsize=8)
    axes[1].bar(x, [np.mean([r["velocity_drift"] for r in res[m]]) for m in methods], color="C3")
    axes[1].set_title("velocity drift from the base (probe MSE)")
    lit = [_mean_of(res[m], lambda o: o["images"]["lit_fraction"]) for m in methods]
    sat = [_mean_of(res[m], lambda o: o["images"]["saturation"]) for m in methods]
    axes[2].bar(x - 0.2, lit, 0.4, label="lit fraction", color="C1")
    axes[2].bar(x + 0.2, sat, 0.4, label="saturation", color="C4")
    axes[2].set_title("image statistics (base: first bar)")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return save_figure(fig, path)


def sweep_methods(res: dict[str, list[dict]]) -> list[str]:
    """The finished β-sweep methods, ascending β."""
    return sorted((m for m in res if sweep_beta(m) is not None), key=sweep_beta)


def beta_sweep_table(res: dict[str, list[dict]]) -> str:
    """Per β: strict and GenEval-style pooled, strict paired against the base and against `reg_none`, the lit
    fraction as a multiple of the base's, and the velocity drift."""
    lit0 = _mean_of(res[BASE], lambda o: o["images"]["lit_fraction"])
    rows = ["| β | seeds | strict | GenEval-style | strict − base [95% CI] | strict − no regulariser [95% CI] | "
            "lit fraction / base | velocity drift |", "|---|---|---|---|---|---|---|---|"]
    for m in ([k for k in ("reg_none",) if k in res] + sweep_methods(res)):
        vs_base = paired(res[m], res[BASE], "strict")
        vs_none = paired(res[m], res["reg_none"], "strict") if "reg_none" in res and m != "reg_none" else None
        lit = _mean_of(res[m], lambda o: o["images"]["lit_fraction"])
        beta = "none (reg_none)" if m == "reg_none" else f"{sweep_beta(m):g}"
        rows.append(f"| {beta} | {len(res[m])} | {_ci(*pooled(res[m], 'strict'))} | {_ci(*pooled(res[m], 'geneval'))} | "
                    f"{vs_base['diff']:+.3f} [{vs_base['ci'][0]:+.3f}, {vs_base['ci'][1]:+.3f}] | "
                    + (f"{vs_none['diff']:+.3f} [{vs_none['ci'][0]:+.3f}, {vs_none['ci'][1]:+.3f}]" if vs_none else "—")
                    + f" | {lit / lit0:.2f}× | {np.mean([r['velocity_drift'] for r in res[m]]):.4f} |")
    return "\n".join(rows)


def plot_beta_sweep(res: dict[str, list[dict]], path: str) -> str:
    """Strict and GenEval-style (pooled, 95% intervals) and the lit fraction against β (log axis); the base and
    `reg_none` as horizontal lines."""
    plt = _plt()
    ms = sweep_methods(res)
    betas = [sweep_beta(m) for m in ms]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for score, color in (("strict", "C0"), ("geneval", "C2")):
        mean_ci = [pooled(res[m], score) for m in ms]
        y = np.array([v for v, _ in mean_ci])
        lo = np.array([c[0] for _, c in mean_ci])
        hi = np.array([c[1] for _, c in mean_ci])
        axes[0].errorbar(betas, y, yerr=[y - lo, hi - y], fmt="o-", color=color, capsize=3, label=SCORE_NAMES[score])
        for ref, style in ((BASE, ":"), ("reg_none", "--")):
            if ref in res:
                axes[0].axhline(pooled(res[ref], score)[0], color=color, ls=style, lw=1,
                                label=f"{SCORE_NAMES[score]}, {label(ref)}")
    axes[0].set_title("held-out scores vs β (seeds pooled)")
    lit = [_mean_of(res[m], lambda o: o["images"]["lit_fraction"]) for m in ms]
    axes[1].plot(betas, lit, "o-", color="C1", label="lit fraction")
    for ref, style in ((BASE, ":"), ("reg_none", "--")):
        if ref in res:
            axes[1].axhline(_mean_of(res[ref], lambda o: o["images"]["lit_fraction"]), color="C1", ls=style, lw=1,
                            label=f"lit fraction, {label(ref)}")
    axes[1].set_title("lit fraction vs β")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("β (velocity-MSE weight)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def sample_grid(cfg: CompareConfig, res: dict[str, list[dict]], path: str, per_category: int = 2) -> str:
    """Rows = methods (seed-0 runs or the first seed present), columns = the same held-out prompts and noise
    (for episodes each image is the x¹ | x² pair)."""
    cats = categories(res)
    methods, n = list(res), per_category * len(cats)
    data = DataConfig(eval=res[BASE][0].get("eval_data", "shapes"))
    images, captions, ok = [], [], []
    for m in methods:
        ckpt = cfg.base if m == BASE else next(
            (os.path.join(run_dir(cfg, m, s), "checkpoint") for s in cfg.seeds
             if os.path.exists(os.path.join(run_dir(cfg, m, s), "result.json"))), None)
        if ckpt is None:
            continue
        r = evaluate(load_bundle(ckpt), EvalConfig(samples=n, steps=cfg.eval_steps, seed=cfg.eval_seed, data=data),
                     progress=False)
        order = sorted(range(n), key=lambda i: (cats.index(r.categories[i]), i))
        images += [r.images[i] for i in order]
        captions += [(f"[{label(m)}] " if j == 0 else "") + r.prompts[i] for j, i in enumerate(order)]
        ok += [bool(r.geneval[i]) for i in order]
    return save_image_grid(np.stack(images), captions, path, ncol=n, tile=96, ok=ok)


# ------------------------------------------------------------------------------------------------ report
def command_line(cfg: CompareConfig, path: str) -> str:
    """The overrides that reproduce this comparison (the defaults left out)."""
    args = [f"out={cfg.out}", f"report={path}", f"iterations={cfg.iterations}", f"seeds=[{','.join(map(str, cfg.seeds))}]"]
    if cfg.methods != list(METHODS):
        args.append(f"methods=[{','.join(cfg.methods)}]")
    if cfg.betas:
        args.append(f"betas=[{','.join(f'{b:g}' for b in cfg.betas)}]")
    if cfg.overrides:
        args.append("'overrides=[" + ",".join(f'"{o}"' for o in cfg.overrides) + "]'")
    return " ".join(args)


def write_results(cfg: CompareConfig, grid: bool = True) -> str:
    res = load_results(cfg)
    if BASE not in res:
        raise FileNotFoundError(f"no finished runs under {cfg.out}/runs (the base evaluation is missing); "
                                "run `unigrpo compare` first")
    path = cfg.report_path
    stem = os.path.splitext(path)[0]
    fig_dir = stem
    os.makedirs(fig_dir, exist_ok=True)
    rel = os.path.basename(fig_dir)
    figs = {"curves": plot_curves(cfg, list(res), os.path.join(fig_dir, "curves.png"),
                                   reward_name(res)),
            "categories": plot_categories(res, os.path.join(fig_dir, "categories.png")),
            "hacking": plot_hacking(res, os.path.join(fig_dir, "hacking.png"))}
    sweep = ""
    if sweep_methods(res):
        figs["beta_sweep"] = plot_beta_sweep(res, os.path.join(fig_dir, "beta_sweep.png"))
        sweep = f"""## The β sweep: velocity MSE at each weight

UniGRPO with velocity MSE at each β, same budget and seeds; paired differences over the shared held-out
prompts. The regulariser claim holds at a β where strict − no regulariser is above 0 and the lit fraction stays
near 1× the base's.

{beta_sweep_table(res)}

![β sweep]({rel}/beta_sweep.png)

"""
    if grid:
        figs["samples"] = sample_grid(cfg, res, os.path.join(fig_dir, "samples.png"))
    any_run = next(r for m, rs in res.items() if m != BASE for r in rs) if len(res) > 1 else None
    tc = any_run["train_config"] if any_run else None
    budget = (f"{cfg.iterations} iterations × {tc['prompts_per_iter']} prompts × {tc['rollout']['group_size']} "
              f"samples = {cfg.iterations * tc['prompts_per_iter'] * tc['rollout']['group_size']} rollouts per run, "
              f"{tc['optim']['epochs']} PPO epochs of mini-batches of {tc['optim']['minibatch']}"
              if tc else "no training runs yet")
    hours = sum(r.get("total_s", 0.0) for rs in res.values() for r in rs) / 3600
    rounds = res[BASE][0].get("rounds", 1)
    episodes = (f", on {rounds}-round editing episodes (`{res[BASE][0].get('eval_data')}`: each held-out score is "
                f"the final image against the edited target, per edit kind; ALGORITHM.md §12)" if rounds > 1 else "")
    old = ""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
        if DISCUSSION[0] in text and DISCUSSION[1] in text:
            old = text[text.index(DISCUSSION[0]):text.index(DISCUSSION[1]) + len(DISCUSSION[1])]
    discussion = old or f"{DISCUSSION[0]}\n_(no discussion yet)_\n{DISCUSSION[1]}"
    md = f"""# The paper's comparisons on the shapes world

Generated by `unigrpo compare {command_line(cfg, path)}`
(`unigrpo compare --report-only ...` rebuilds this page from finished runs; the discussion block is kept).

**Setup.** Every method starts from the same base checkpoint and gets the same budget: {budget};
config `{cfg.train_config}`{(' with ' + ', '.join(cfg.overrides)) if cfg.overrides else ''}, training reward
`{reward_name(res)}`{episodes}; only each method's own
overrides differ (listed below). Seeds: {list(cfg.seeds)}. Held-out evaluation: {cfg.eval_samples} prompts (seed
{cfg.eval_seed}: the same prompts and sampling seed for every run; the latent noise stays shared only until
reasoning lengths differ, since one generator draws both), {cfg.eval_steps} ODE steps, no CFG unless stated;
CFG scale {cfg.cfg_scale}. Run time of all runs together: {hours:.2f} CPU-process hours.

Scores: TA-style = fraction of the prompt's checks passed; GenEval-style = all checks passed (GenEval
semantics: extra objects do not fail it); strict = GenEval-style AND exactly the asked-for number of objects
(unclassified blobs count): an indicator, never a reward. Intervals are 95%, over the held-out prompts with
each prompt's score averaged over the seeds (evaluation noise; the per-seed column shows training noise). Velocity drift = mean
‖v − v_base‖² on a fixed probe of {cfg.probe_samples} correct plans and renders noised to σ ∈ {{0.25, 0.5, 0.75}}.

## Overall (held-out, no CFG)

{main_table(res)}

![training curves]({rel}/curves.png)

## Per category

GenEval-style:

{category_table(res, "geneval")}

TA-style:

{category_table(res, "ta")}

Strict:

{category_table(res, "strict")}

![per-category scores]({rel}/categories.png)

## CFG in training rollouts vs none, evaluated with and without CFG

{cfg_table(res)}

{cost_table(res)}

## The paper's claims, tested

A − B is the paired difference over the shared held-out prompts (each side averaged over its seeds);
"seeds agreeing" counts seed pairs whose difference has the pooled sign. Verdict: "holds" = the 95%
interval excludes 0 on the claimed side and every seed pair agrees.

{claims_table(res)}

![reward-hacking indicators]({rel}/hacking.png)

{sweep}## Samples

Rows: methods (first finished seed); columns: the same held-out prompts and seed, 2 per category; a green
frame = GenEval-style pass.

![samples]({rel}/samples.png)

## Methods

| key | method | overrides | note |
|---|---|---|---|
""" + "\n".join(f"| `{k}` | {v.label} | {' '.join('`' + o.format(cfg_scale=cfg.cfg_scale) + '`' for o in v.overrides) or '—'} "
                f"| {v.note} |" for k, v in ((k, method_spec(k)) for k in cfg.all_methods)) + f"""

## Discussion

{discussion}
"""
    return write_text_atomic(path, md)
