"""`unigrpo compare`: the paper's comparisons (ALGORITHM.md §11) on the shapes world, from scratch to a report.

    unigrpo compare [--config FILE] [key=value ...]        e.g. `unigrpo compare jobs=2 iterations=30`

Stages (every one resumable: rerunning the command skips finished runs and resumes unfinished ones):
1. The base: the shipped tiny base (unigrpo/assets/tiny_base), or with `pretrain=true` one pre-trained now
   (`unigrpo pretrain --config tiny_pretrain`, ≈ 8 min).
2. Runs: each method of METHODS × each seed, trained from the base with the same budget (the `tiny` config,
   `iterations` iterations of prompts_per_iter × group_size samples; only the method's own overrides differ),
   in `jobs` parallel processes of cores/jobs threads. Each run then evaluates its final policy on the
   same held-out prompts and sampling seed (eval_seed) without CFG, and for the CFG comparison also with CFG
   (cfg_scale), and measures the velocity drift from the base on a fixed probe set. The base is evaluated
   the same way. A run's results land in <out>/runs/<method>/seed<k>/result.json.
3. The report: <report> (default <out>/results.md) with the tables, and plots beside it in <stem>/: training
   curves, per-category bars, a sample grid (rows = methods, same prompts and seed).

Intervals: every seed is evaluated on the same prompts, so a method's score averages each prompt over its
seeds and the interval is over prompts (mean ± 1.96·s/√n; Wilson for a single run's 0/1 scores); it covers
evaluation noise, not training noise, so the per-seed scores are listed too. A claim "A beats B" is judged by the paired difference over the shared
held-out prompts (seed-averaged per prompt, mean ± 1.96·s/√n) and by how many seeds agree in sign.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

from unigrpo.config import load_config, require_in, require_min
from unigrpo.report import write_text_atomic

SHIPPED_BASE = os.path.join(os.path.dirname(__file__), "assets", "tiny_base")


@dataclass(frozen=True)
class Method:
    label: str
    """the name in tables and plots"""
    overrides: tuple[str, ...]
    """training-config overrides on top of the shared config"""
    eval_cfg: bool = False
    """also evaluate with CFG (the CFG comparison)"""
    note: str = ""


METHODS: dict[str, Method] = {
    "unigrpo": Method("UniGRPO", (), True,
                      "text GRPO + FlowGRPO, velocity MSE (β = 1.5e-5), RatioNorm, CFG-free rollouts"),
    "flowgrpo_only": Method("FlowGRPO only", ("loss.train_text=false",), False,
                            "reasoning sampled, text expert frozen"),
    "textgrpo_only": Method("TextGRPO only", ("loss.train_image=false",), False, "λ = 0, image expert frozen"),
    "refl": Method("ReFL", ("method=refl",), False,
                   "image expert trained through a differentiable surrogate of the verifier at a late step"),
    "refl_low_lr": Method("ReFL, lr/10", ("method=refl", "optim.lr_image=1e-5"), False,
                          "ReFL with a 10× smaller image learning rate (ReFL's own papers tune it down)"),
    "cfg_rollouts": Method("UniGRPO, CFG rollouts", ("rollout.cfg_scale={cfg_scale}",), True,
                           "training rollouts with CFG (2 evaluations per step)"),
    "reg_none": Method("UniGRPO, no regulariser", ("loss.reg=none",), False, "β irrelevant"),
    "reg_latent_kl": Method("UniGRPO, latent KL", ("loss.reg=latent_kl",), False,
                            "per-step Gaussian KL instead of velocity MSE, same β"),
    "ratio_norm_off": Method("UniGRPO, RatioNorm off", ("loss.ratio_norm=false",), False,
                             "plain ratio, same clip range"),
}
BASE = "base"
RESERVED = ("base", "out", "iterations", "seed", "method", "checkpoint_every", "resume")


@dataclass
class CompareConfig:
    out: str = "runs/compare"
    """run directory: base/, runs/<method>/seed<k>/"""
    report: str = ""
    """results markdown path (plots go to a folder named after it); default <out>/results.md"""
    pretrain: bool = False
    """pre-train the base now instead of copying the shipped one"""
    train_config: str = "tiny"
    """training config every method starts from (bundled name or YAML path)"""
    overrides: list[str] = field(default_factory=list)
    """extra key=value training overrides for every method (e.g. ["prompts_per_iter=4"])"""
    iterations: int = 30
    """training iterations per run (the budget)"""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """training seeds of every method"""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """methods to run (keys of unigrpo.compare.METHODS)"""
    jobs: int = 2
    """runs in parallel; each gets max(1, cores // jobs) torch threads"""
    eval_samples: int = 256
    """held-out prompts per evaluation (one image each)"""
    eval_steps: int = 50
    """ODE steps of evaluation sampling"""
    eval_seed: int = 1234
    """held-out prompts and noise, shared by every evaluation"""
    cfg_scale: float = 3.0
    """CFG scale of the "with CFG" evaluations and of the CFG-rollout ablation"""
    probe_samples: int = 64
    """probe contexts of the velocity-drift indicator"""

    def __post_init__(self):
        require_min("iterations", self.iterations, 1)
        require_min("jobs", self.jobs, 1)
        require_min("eval_samples", self.eval_samples, 1)
        require_min("probe_samples", self.probe_samples, 1)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct ints, got {self.seeds}")
        for m in self.methods:
            require_in("methods[]", m, list(METHODS))
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must be distinct, got {self.methods}")
        for o in self.overrides:
            key = o.partition("=")[0].strip()
            if key in RESERVED or key.split(".")[0] == "method":
                raise ValueError(f"overrides may not set {key!r}: the comparison sets {sorted(RESERVED)} per run "
                                 "(use iterations=, seeds= or a method of METHODS instead)")
        if not self.cfg_scale > 1:
            raise ValueError(f"cfg_scale must be > 1 (1 is no CFG), got {self.cfg_scale}")

    @property
    def base(self) -> str:
        return os.path.join(self.out, "base")

    @property
    def report_path(self) -> str:
        return self.report or os.path.join(self.out, "results.md")


def run_dir(cfg: CompareConfig, method: str, seed: int | None) -> str:
    return os.path.join(cfg.out, "runs", BASE) if method == BASE else \
        os.path.join(cfg.out, "runs", method, f"seed{seed}")


def train_overrides(cfg: CompareConfig, method: str, seed: int) -> list[str]:
    """The training overrides of one run: shared budget, then the method's own."""
    own = [o.format(cfg_scale=cfg.cfg_scale) for o in METHODS[method].overrides]
    return [f"base={cfg.base}", f"out={run_dir(cfg, method, seed)}", f"iterations={cfg.iterations}",
            f"seed={seed}", f"checkpoint_every={max(1, cfg.iterations // 3)}", *cfg.overrides, *own]


# ------------------------------------------------------------------------------------------------ one run
def _evaluations(cfg: CompareConfig, bundle, ref_model, out: str, with_cfg: bool) -> dict:
    from unigrpo.evaluate import EvalConfig, evaluate, velocity_drift, write_eval

    res = {}
    for tag, scale in [("nocfg", 1.0)] + ([("cfg", cfg.cfg_scale)] if with_cfg else []):
        ecfg = EvalConfig(samples=cfg.eval_samples, steps=cfg.eval_steps, seed=cfg.eval_seed, cfg_scale=scale)
        r = evaluate(bundle, ecfg, progress=False)
        write_eval(r, os.path.join(out, f"eval_{tag}"))
        res[tag] = {"summary": r.summary, "categories": r.categories, "ta": r.ta.tolist(),
                    "geneval": r.geneval.tolist(), "strict": r.strict.tolist()}
    res["velocity_drift"] = velocity_drift(bundle.model, ref_model, bundle.tokenizer, bundle.codec,
                                           cfg.probe_samples)
    return res


def run_one(cfg: CompareConfig, method: str, seed: int | None, threads: int = 0) -> dict:
    """Train (unless method is "base") and evaluate one run; writes and returns its result.json."""
    import torch

    from unigrpo.cli import resolve_config_path
    from unigrpo.model.build import load_bundle
    from unigrpo.trainer import TrainConfig, Trainer

    if threads:
        torch.set_num_threads(threads)
    out = run_dir(cfg, method, seed)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    if method == BASE:
        bundle, train_cfg = load_bundle(cfg.base), None
        bundle.model.to("cuda" if torch.cuda.is_available() else "cpu")   # where a Trainer would put it
    else:
        train_cfg = load_config(TrainConfig, resolve_config_path(cfg.train_config),
                                train_overrides(cfg, method, seed) + [f"threads={threads}"])
        trainer = Trainer(train_cfg, progress=False)
        trainer.train()
        bundle = trainer.bundle          # its model is the trained policy
    t_train = time.time() - t0
    ref = load_bundle(cfg.base).model.to(next(bundle.model.parameters()).device)
    result = {"method": method, "seed": seed, "train_s": t_train,
              "train_config": None if train_cfg is None else dataclasses.asdict(train_cfg)}
    result.update(_evaluations(cfg, bundle, ref, out, with_cfg=method == BASE or METHODS[method].eval_cfg))
    result["total_s"] = time.time() - t0
    write_text_atomic(os.path.join(out, "result.json"), json.dumps(result, indent=1))
    return result


# ------------------------------------------------------------------------------------------------ all runs
def prepare_base(cfg: CompareConfig) -> None:
    if os.path.exists(os.path.join(cfg.base, "model.safetensors")):
        return
    if cfg.pretrain:
        from unigrpo.cli import resolve_config_path
        from unigrpo.pretrain import PretrainConfig, run_pretrain

        print(f"pre-training the base at {cfg.base}", flush=True)
        run_pretrain(load_config(PretrainConfig, resolve_config_path("tiny_pretrain"),
                                 [f"out={cfg.base}", "eval_samples=0"]))
    else:
        print(f"copying the shipped base ({SHIPPED_BASE}) to {cfg.base}", flush=True)
        shutil.copytree(SHIPPED_BASE, cfg.base, dirs_exist_ok=True)


def pending_runs(cfg: CompareConfig) -> list[tuple[str, int | None]]:
    runs = [(BASE, None)] + [(m, s) for s in cfg.seeds for m in cfg.methods]   # seed-major: whole seeds first
    return [(m, s) for m, s in runs if not os.path.exists(os.path.join(run_dir(cfg, m, s), "result.json"))]


def run_all(cfg: CompareConfig, config_args: list[str]) -> None:
    """Every pending run in `cfg.jobs` worker processes (`unigrpo compare --run METHOD:SEED ...`), with a
    progress line per finished run; a failed run stops the command with its log's tail."""
    from tqdm import tqdm

    todo = pending_runs(cfg)
    if not todo:
        print(f"every run is finished (under {cfg.out}/runs); rebuilding the report", flush=True)
        return
    threads = max(1, (os.cpu_count() or 1) // cfg.jobs)
    running: list[tuple[subprocess.Popen, str, str]] = []
    bar = tqdm(total=len(todo), desc="compare runs", unit="run")
    failed = None
    while (todo or running) and failed is None:
        while todo and len(running) < cfg.jobs:
            m, s = todo.pop(0)
            d = run_dir(cfg, m, s)
            os.makedirs(d, exist_ok=True)
            log = os.path.join(d, "log.txt")
            cmd = [sys.executable, "-m", "unigrpo.compare", "--run", f"{m}:{s}", "--threads", str(threads),
                   *config_args]
            with open(log, "a") as f:
                running.append((subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT), f"{m}:{s}", log))
        time.sleep(2)
        for item in list(running):
            proc, name, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0:
                failed = (name, log)
            else:
                bar.update(1)
                bar.set_postfix_str(name)
    bar.close()
    if failed:   # stop the others now (they resume from their checkpoints on the next run)
        for proc, _, _ in running:
            proc.terminate()
            proc.wait()
        with open(failed[1]) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"run {failed[0]} failed (log: {failed[1]}):\n{tail}")


def main(argv=None) -> int:
    import argparse

    from unigrpo.cli import resolve_config_path

    ap = argparse.ArgumentParser(prog="unigrpo compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML file with CompareConfig keys")
    ap.add_argument("--run", default=None, help=argparse.SUPPRESS)        # worker: METHOD:SEED
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--report-only", action="store_true", help="rebuild the report from finished runs")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. jobs=2 seeds=[0,1,2]")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(CompareConfig, resolve_config_path(args.config) if args.config else None, args.overrides)
        config_args = (["--config", args.config] if args.config else []) + list(args.overrides)
        if args.run:
            method, _, seed = args.run.partition(":")
            run_one(cfg, method, None if seed == "None" else int(seed), args.threads)
            return 0
        if not args.report_only:
            os.makedirs(cfg.out, exist_ok=True)
            prepare_base(cfg)
            run_all(cfg, config_args)
        from unigrpo.compare_report import write_results

        path = write_results(cfg)
        print(f"results: {path}")
        return 0
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"unigrpo compare: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
