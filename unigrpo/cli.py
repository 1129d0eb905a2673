"""The `unigrpo` command.

    unigrpo demo     [key=value ...]                 the README's main job: pre-train (if needed) + UniGRPO on tiny
    unigrpo train    [--config FILE] [key=value ...] UniGRPO training (bundled configs: tiny, paper)
    unigrpo pretrain [--config FILE] [key=value ...] supervised pre-training of a base checkpoint
    unigrpo eval     [--config FILE] [key=value ...] held-out scores per category with 95% intervals + grid
    unigrpo sample   --checkpoint DIR --prompt TEXT [--out PNG]
    unigrpo bench    [suite ...] [--quick] [--out DIR]   benchmarks (= `python -m bench`; package unigrpo_bench)
    unigrpo compare  [--config FILE] [key=value ...]  the paper's comparisons: every baseline × seeds → results.md
    unigrpo serve-reward --reward NAME [--port P] [key=value ...]   a reward served over HTTP (rewards/server.py)
    unigrpo export-prompts [--split heldout] [--n N] [--seed S] out=FILE.jsonl   shapes prompts in GenEval's format
    unigrpo export   checkpoint=DIR out=DIR [layout=unigrpo|bagel]  a sharded (DCP) checkpoint → one safetensors file

--config takes a YAML path or the name of a bundled config (unigrpo/configs/NAME.yaml). Overrides are
dotted key=value pairs; a bad key or value stops with an error naming it before any work starts.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from unigrpo.config import load_config, resolve_config_path
from unigrpo.rewards.base import RewardError

def cmd_pretrain(args) -> int:
    """Supervised pre-training of a base checkpoint (bundled config: tiny_pretrain)."""
    from unigrpo.pretrain import PretrainConfig, run_pretrain

    cfg = load_config(PretrainConfig, resolve_config_path(args.config), args.overrides)
    info = run_pretrain(cfg)
    print(f"base checkpoint written to {info['checkpoint']} ({info['train_time_s']:.0f} s)")
    if cfg.eval_samples:
        from unigrpo.evaluate import EvalConfig
        return _eval(EvalConfig(checkpoint=cfg.out, samples=cfg.eval_samples), "base model, held-out")
    return 0


def _eval(cfg, title: str) -> int:
    from unigrpo.evaluate import evaluate, format_summary, write_eval
    from unigrpo.model.build import load_bundle

    bundle = load_bundle(cfg.checkpoint)
    t0 = time.time()
    result = evaluate(bundle, cfg)
    paths = write_eval(result, cfg.out or os.path.join(cfg.checkpoint, "eval"), cfg.grid)
    src = "" if cfg.data.eval == "shapes" else f", prompts from {cfg.data.eval}"
    print(format_summary(result.summary, f"{title} ({cfg.samples} samples{src}, {cfg.steps} ODE steps, "
                                         f"cfg {cfg.cfg_scale}, {time.time() - t0:.0f} s)"))
    print(f"per-sample scores: {paths['json']}\nimage grid: {paths['grid']}")
    return 0


def cmd_eval(args) -> int:
    """Held-out (or, with split=train, training-split) scores per category with 95% intervals and an image
    grid."""
    from unigrpo.evaluate import EvalConfig

    cfg = load_config(EvalConfig, resolve_config_path(args.config), args.overrides)
    return _eval(cfg, f"{cfg.checkpoint}, {'held-out' if cfg.split == 'heldout' else 'training split'}")


def cmd_sample(args) -> int:
    import torch

    from unigrpo.model.build import load_bundle
    from unigrpo.rollout.generate import sample
    from unigrpo.viz import save_image_grid
    from unigrpo.world.render import to_uint8

    bundle = load_bundle(args.checkpoint)
    bundle.model.eval()
    gen = torch.Generator().manual_seed(args.seed)
    prompts = [args.prompt] * args.n
    texts, images = sample(bundle.model, bundle.tokenizer, bundle.codec, prompts, temperature=args.temperature,
                           num_steps=args.steps, cfg_scale=args.cfg_scale, generator=gen)
    for t in texts:
        print(f"reasoning: {t}")
    path = save_image_grid(to_uint8(images.float()), texts, args.out, ncol=min(args.n, 8))
    print(f"image{'s' if args.n > 1 else ''}: {path}")
    return 0


def cmd_demo(args) -> int:
    """The main job: UniGRPO on the tiny preset from a base checkpoint, held-out scores before and after with
    95% intervals. The base: <base> if it exists, else the one shipped in unigrpo/assets/tiny_base (made by
    `unigrpo pretrain --config tiny_pretrain`, recorded in its config.json), else pre-trained now.
    Overrides apply to the training config (configs/tiny.yaml)."""
    from unigrpo.pretrain import ensure_base
    from unigrpo.train import run
    from unigrpo.trainer import TrainConfig

    cfg = load_config(TrainConfig, resolve_config_path("tiny"), args.overrides)
    ensure_base(cfg.base, pretrain=args.pretrain)
    run(cfg)
    return 0


def cmd_train(args) -> int:
    """UniGRPO training from a config (bundled: tiny, paper)."""
    from unigrpo.train import run
    from unigrpo.trainer import TrainConfig

    run(load_config(TrainConfig, resolve_config_path(args.config or "tiny"), args.overrides))
    return 0


def cmd_export_prompts(args) -> int:
    """The shapes world's prompts as a GenEval-format JSONL file (one {prompt, tag, include[, exclude]} a line)."""
    from unigrpo.data.prompts import shapes_record, shapes_records, write_prompt_file
    from unigrpo.world import CATEGORIES
    from unigrpo.world.prompts import split_prompts

    out = dict(o.split("=", 1) for o in args.overrides if "=" in o).get("out") or args.out
    bad = [o for o in args.overrides if not o.startswith("out=")]
    if bad or not out:
        raise ValueError(f"expected out=FILE.jsonl (got {' '.join(args.overrides) or 'nothing'})")
    if not out.endswith(".jsonl"):
        raise ValueError(f"out={out!r}: the GenEval format is JSONL; name the file *.jsonl")
    if args.n:
        records = shapes_records(args.split, args.n, args.seed)
    else:   # every distinct prompt of the split, once (GenEval's own files list each prompt once)
        records = [shapes_record(p) for c in CATEGORIES for p in split_prompts(c, args.split)]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_prompt_file(out, records)
    print(f"{len(records)} {args.split} prompts written to {out}")
    return 0


def cmd_bench(argv: list[str]) -> int:
    """Benchmarks: the same command as `python -m bench` (bench/README.md); bench/ is installed as
    `unigrpo_bench`."""
    from unigrpo_bench.harness import main as bench_main

    return bench_main(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":  # its own argument parser (python -m bench --help)
        return cmd_bench(argv[1:])
    if argv and argv[0] == "serve-reward":  # its own argument parser (unigrpo serve-reward --help)
        from unigrpo.rewards.server import serve_reward

        return serve_reward(argv[1:])
    if argv and argv[0] == "compare":  # its own argument parser (unigrpo compare --help)
        from unigrpo_experiments.compare import main as compare_main

        return compare_main(argv[1:])
    if argv and argv[0] == "export":  # key=value only (unigrpo export --help)
        from unigrpo.export import main as export_main

        return export_main(argv[1:])
    ap = argparse.ArgumentParser(prog="unigrpo", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, fn in (("pretrain", cmd_pretrain), ("eval", cmd_eval), ("train", cmd_train), ("demo", cmd_demo)):
        p = sub.add_parser(name, help=(fn.__doc__ or "").split("\n")[0].replace("%", "%%"))
        if name != "demo":
            p.add_argument("--config", default=None, help="YAML file or bundled config name")
        else:
            p.add_argument("--pretrain", action="store_true",
                           help="pre-train the base now even when one exists or is shipped")
        p.add_argument("overrides", nargs="*", help="key=value overrides")
        p.set_defaults(fn=fn)
    p = sub.add_parser("sample", help="prompt → reasoning + PNG")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", default="sample.png")
    p.add_argument("--n", type=int, default=1, help="images to sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.set_defaults(fn=cmd_sample)
    p = sub.add_parser("export-prompts", help="the shapes world's prompts as a GenEval-format JSONL file")
    p.add_argument("--split", default="heldout", choices=("train", "heldout"))
    p.add_argument("--n", type=int, default=0, help="draw N prompts as training/evaluation does (0: each distinct "
                                                     "prompt of the split once)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="the JSONL file (or out=FILE)")
    p.add_argument("overrides", nargs="*", help="out=FILE.jsonl")
    p.set_defaults(fn=cmd_export_prompts)
    sub.add_parser("serve-reward", help="a registered reward served over HTTP (see --help)", add_help=False)
    sub.add_parser("bench", help="benchmarks: unigrpo bench [suite ...] [--quick] [--out DIR] (see --help)",
                   add_help=False)
    sub.add_parser("compare", help="the paper's comparisons on the shapes world → results.md (see --help)",
                   add_help=False)
    sub.add_parser("export", help="checkpoint=DIR out=DIR: a sharded (DCP) checkpoint → safetensors (see --help)",
                   add_help=False)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, RewardError) as err:
        print(f"unigrpo {args.cmd}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
