"""`unigrpo train` / `python -m unigrpo.train`: build the trainer from a config, evaluate the base, train,
evaluate again, write the report. Multi-GPU (or multi-process on CPU): `torchrun --nproc_per_node=N -m
unigrpo.train --config ...` — FSDP2 (unigrpo/distributed); rank 0 writes logs, evaluations and the report. Closes cleanly on success and on
error (a checkpoint is on disk every `checkpoint_every` iterations; rerunning the same command resumes)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from unigrpo.config import config_to_dict, load_config, resolve_config_path
from unigrpo.distributed import unsharded
from unigrpo.evaluate import (EvalConfig, evaluate, format_summary, headline, is_reward_summary, score_changes,
                              write_eval)
from unigrpo.pretrain import copy_shipped_base
from unigrpo.report import plot_reward_curve, read_metrics, write_report
from unigrpo.rewards.base import RewardError
from unigrpo.trainer import TrainConfig, Trainer


def _evaluate(trainer: Trainer, tag: str) -> dict:
    cfg = trainer.cfg
    # the shapes world has its own table (the verifier's); a prompt file is scored with the training rewards
    ecfg = EvalConfig(checkpoint=cfg.base, samples=cfg.eval_samples, steps=cfg.eval_steps,
                      cfg_scale=cfg.eval_cfg_scale, temperature=cfg.rollout.temperature, data=cfg.data,
                      rewards=[] if cfg.data.eval in ("shapes", "shapes_edit") else list(cfg.rewards))

    # under FSDP every rank gathers the weights and runs the same evaluation (it is seeded); rank 0 writes
    with unsharded(trainer.policy), torch.no_grad():
        result = evaluate(trainer.bundle, ecfg, progress=trainer.progress and trainer.env.is_main)
    if trainer.env.is_main:
        write_eval(result, os.path.join(cfg.out, f"eval_{tag}"))
    return result.summary


def run(cfg: TrainConfig, progress: bool = True) -> dict:
    """Base eval → training → final eval → report. Returns {"before", "after", "history", "report"}."""
    t0 = time.time()
    copy_shipped_base(cfg.base)
    trainer = Trainer(cfg, progress=progress)
    before = None
    main = trainer.env.is_main
    if trainer.step == 0:
        before = _evaluate(trainer, "base")
        if main:
            print(format_summary(before, f"before: base model, held-out ({cfg.eval_samples} samples)"), flush=True)
    evals = [(0, headline(before)[1])] if before else []

    def on_eval(tr):
        s = _evaluate(tr, f"step{tr.step:05d}")
        evals.append((tr.step, headline(s)[1]))

    trainer.train(on_eval=on_eval)
    after = _evaluate(trainer, "final")
    evals.append((trainer.step, headline(after)[1]))
    if not main:
        return {"before": before, "after": after, "history": [], "report": None}
    history = read_metrics(os.path.join(cfg.out, "metrics.jsonl"))
    plot_reward_curve(history, os.path.join(cfg.out, "reward_curve.png"), evals, eval_label=headline(after)[0])
    if before is None and os.path.exists(os.path.join(cfg.out, "eval_base", "eval.json")):
        with open(os.path.join(cfg.out, "eval_base", "eval.json")) as f:
            before = json.load(f)["summary"]
    report = write_report(cfg.out, before=before, after=after, history=history, config=config_to_dict(cfg),
                          extra=f"Wall time of this invocation: {time.time() - t0:.0f} s.")
    print(format_summary(after, f"after: UniGRPO, held-out ({cfg.eval_samples} samples)"))
    if before:
        print(change_line(before, after))
    print(f"report: {report}")
    return {"before": before, "after": after, "history": history, "report": report}


def change_line(before: dict, after: dict) -> str:
    """Before → after of the overall scores, one line."""
    b, a = before["overall"], after["overall"]
    if is_reward_summary(after) and is_reward_summary(before):
        return ", ".join(f"{k} {b['rewards'][k]['mean']:.3f} -> {v['mean']:.3f} ({v['mean'] - b['rewards'][k]['mean']:+.3f})"
                         for k, v in a["rewards"].items() if k in b["rewards"])
    return score_changes(before, after)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="unigrpo train", description=__doc__)
    ap.add_argument("--config", default="tiny", help="YAML file or bundled config name (tiny, paper)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr_image=1e-4")
    args = ap.parse_args(argv)

    try:
        cfg = load_config(TrainConfig, resolve_config_path(args.config), args.overrides)
        run(cfg)
    except (ValueError, FileNotFoundError, RewardError) as err:
        print(f"unigrpo train: error: {err}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
