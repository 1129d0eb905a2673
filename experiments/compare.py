"""`unigrpo compare`: the paper's comparisons (ALGORITHM.md §11) on the shapes world, from scratch to a report.

    unigrpo compare [--config FILE] [key=value ...]        e.g. `unigrpo compare jobs=2 iterations=30`

Stages (every one resumable: rerunning the command skips finished runs and resumes unfinished ones):
1. The base: a copy of the training config's `base` (for `tiny`, the shipped tiny base in
   unigrpo/assets/tiny_base; for `tiny_edit`, the shipped editing base), or with `pretrain=true` one
   pre-trained now (`unigrpo pretrain --config tiny_pretrain`, ≈ 8 min; `tiny_edit_pretrain` for editing).
   Every run is evaluated on the training config's `data.eval`: `train_config=tiny_edit` makes the edit table
   (two-round episodes scored per edit kind, ALGORITHM.md §12).
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

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import torch

from unigrpo.config import load_config, resolve_config_path
from unigrpo.data import DataConfig
from unigrpo.evaluate import EvalConfig, evaluate, velocity_drift, write_eval
from unigrpo.io import write_text_atomic
from unigrpo.model.build import load_bundle
from unigrpo.pretrain import ensure_base
from unigrpo.trainer import TrainConfig, Trainer

from .config import BASE, CompareConfig, episode_rounds_of, method_spec, run_dir, shared_train_config
from .report import write_results


def train_overrides(cfg: CompareConfig, method: str, seed: int) -> list[str]:
    """The training overrides of one run: shared budget, then the method's own."""
    own = [o.format(cfg_scale=cfg.cfg_scale) for o in method_spec(method).overrides]
    return [f"base={cfg.base}", f"out={run_dir(cfg, method, seed)}", f"iterations={cfg.iterations}",
            f"seed={seed}", f"checkpoint_every={max(1, cfg.iterations // 3)}", *cfg.overrides, *own]


# ------------------------------------------------------------------------------------------------ one run
def _evaluations(cfg: CompareConfig, bundle, ref_model, out: str, with_cfg: bool, data: DataConfig) -> dict:
    """Held-out evaluations on data.eval (without CFG, and with it when with_cfg) and the velocity drift."""
    res = {}
    for tag, scale in [("nocfg", 1.0)] + ([("cfg", cfg.cfg_scale)] if with_cfg else []):
        ecfg = EvalConfig(samples=cfg.eval_samples, steps=cfg.eval_steps, seed=cfg.eval_seed, cfg_scale=scale,
                          data=data)
        r = evaluate(bundle, ecfg, progress=False)
        write_eval(r, os.path.join(out, f"eval_{tag}"))
        res[tag] = {"summary": r.summary, "categories": r.categories, "ta": r.ta.tolist(),
                    "geneval": r.geneval.tolist(), "strict": r.strict.tolist()}
    res["velocity_drift"] = velocity_drift(bundle.model, ref_model, bundle.tokenizer, bundle.codec,
                                           cfg.probe_samples)
    return res


def run_one(cfg: CompareConfig, method: str, seed: int | None, threads: int = 0) -> dict:
    """Train (unless method is "base") and evaluate one run; writes and returns its result.json."""
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
    shared = shared_train_config(cfg)
    result = {"method": method, "seed": seed, "train_s": t_train,
              "train_config": None if train_cfg is None else dataclasses.asdict(train_cfg),
              "eval_data": shared.data.eval, "rounds": episode_rounds_of(shared)}
    result.update(_evaluations(cfg, bundle, ref, out, with_cfg=method == BASE or method_spec(method).eval_cfg,
                               data=shared.data))
    result["total_s"] = time.time() - t0
    write_text_atomic(os.path.join(out, "result.json"), json.dumps(result, indent=1))
    return result


# ------------------------------------------------------------------------------------------------ all runs
def prepare_base(cfg: CompareConfig) -> None:
    """The comparison's base: kept when it exists, else a copy of the training config's `base` (for the bundled
    configs' defaults the shipped plain or editing base), or pre-trained now (compare.pretrain)."""
    if not os.path.exists(os.path.join(cfg.base, "model.safetensors")):
        ensure_base(cfg.base, pretrain=cfg.pretrain, source=shared_train_config(cfg).base)


def pending_runs(cfg: CompareConfig) -> list[tuple[str, int | None]]:
    runs = [(BASE, None)] + [(m, s) for s in cfg.seeds for m in cfg.all_methods]   # seed-major: whole seeds first
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
            cmd = [sys.executable, "-m", "unigrpo_experiments.compare", "--run", f"{m}:{s}", "--threads", str(threads),
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

        path = write_results(cfg)
        print(f"results: {path}")
        return 0
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"unigrpo compare: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
