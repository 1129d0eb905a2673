"""Worker of tests/test_sharded.py and tests/test_dcp.py, launched with torchrun on CPU (gloo). Not collected.

    _shard_worker.py load <out.pt> <base[@image_size]> ...   per base: sharded policy (fp32) + reference (bf16),
        gathered; rank 0 saves both full states
    _shard_worker.py rss <base> <out_dir>     sharded policy only: each rank writes rss-<rank>.json (bytes)
    _shard_worker.py dcp_save <base> <ckpt> <full.pt> sync|async   2 AdamW steps, DCP save, a 3rd step while it
        is written; the full states at the save to full.pt
    _shard_worker.py dcp_load <base> <ckpt> <full.pt>   DCP load into this world size; full states to full.pt
    _shard_worker.py train_rss <cfg.json> <out_dir>    Trainer + iterations: train-rss-<rank>.json, peak RSS above
        the post-import RSS of each iteration's rollout and of the rest of it (reward, update), bytes
    _shard_worker.py dcp_loop <base> <ckpt> <step.txt>  saves forever (weights = step); killed by the test
"""
import copy
import json
import os
import sys

import torch
import torch.distributed as dist


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def make_optimizer(model):
    groups = model.parameter_groups()
    return torch.optim.AdamW([{"params": groups["text"], "lr": 1e-2, "name": "text"},
                              {"params": groups["image"], "lr": 3e-2, "name": "image"}], betas=(0.9, 0.95))


def fake_step(model, opt):
    """An AdamW step on gradients that depend on each weight's value (so misplaced shards show)."""
    for p in model.parameters():
        p.grad = torch.sin(p.detach() * 3.0) + 0.1
    opt.step()


def reset_peak():
    """VmHWM := VmRSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main():
    mode = sys.argv[1]
    from unigrpo.distributed import DistConfig, full_model_state, init_distributed
    from unigrpo.distributed.loading import build_sharded, open_base
    env = init_distributed("cpu")
    dc = DistConfig(param_dtype="fp32", device="cpu")
    if mode == "load":
        out = {}
        for arg in sys.argv[3:]:   # BASE or BASE@IMAGE_SIZE
            base, _, size = arg.partition("@")
            cfg, _, _, _, src = open_base(base, image_size=int(size or 1024))
            policy = build_sharded(cfg, dc, src, device=env.device)
            ref = build_sharded(cfg, DistConfig(param_dtype="bf16", device="cpu"), src, device=env.device,
                                dtype=torch.bfloat16, checkpointing=False)
            out[base] = {"policy": full_model_state(policy), "ref": full_model_state(ref),
                         "local": {n: p.to_local().shape[0] for n, p in policy.named_parameters() if p.dim()}}
        if env.is_main:
            torch.save(out, sys.argv[2])
    elif mode == "rss":
        cfg, _, _, _, src = open_base(sys.argv[2])
        from unigrpo.model.unified import UnifiedModel
        with torch.device("meta"):   # the first build imports and initialises code: not part of the load
            UnifiedModel(cfg)
        try:   # reset the high-water mark to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            reset = True
        except OSError:
            reset = False
        before = status_kb("VmRSS")
        policy = build_sharded(cfg, dc, src, device=env.device)
        peak = status_kb("VmHWM")
        local = sum(p.to_local().numel() * p.element_size() for p in policy.parameters())
        with open(os.path.join(sys.argv[3], f"rss-{env.rank}.json"), "w") as f:
            json.dump({"before": before * 1024, "peak": peak * 1024, "local_bytes": local, "reset": reset}, f)
    elif mode in ("dcp_save", "dcp_load", "dcp_loop"):
        from unigrpo.distributed import full_optimizer_state
        from unigrpo.distributed.sharded_checkpoint import load_sharded, save_sharded
        base, ckpt = sys.argv[2], sys.argv[3]
        cfg, _, _, _, src = open_base(base)
        policy = build_sharded(cfg, dc, src, device=env.device)
        opt = make_optimizer(policy)
        config = {"model": __import__("dataclasses").asdict(cfg), "tokenizer": {"kind": "byte"}}
        if mode == "dcp_save":   # two AdamW steps, then a (possibly asynchronous) save at step 2
            for _ in range(2):
                fake_step(policy, opt)
            saved = copy.deepcopy({"model": full_model_state(policy), "optim": full_optimizer_state(policy, opt)})
            pending = save_sharded(ckpt, policy, opt, config=config, trainer_state={"step": 2},
                                   meta={"step": 2}, async_save=sys.argv[5] == "async")
            fake_step(policy, opt)   # training goes on while the shards are written: they were staged first
            pending.finish()
            if env.is_main:
                torch.save(saved, sys.argv[4])
            dist.barrier()
            dist.destroy_process_group()
            return
        elif mode == "dcp_load":
            _, meta, trainer = load_sharded(ckpt, policy, opt)
            assert trainer["step"] == meta["step"]
        else:   # save forever with the weights set to the step number: killed from outside
            with open(os.path.join(os.path.dirname(sys.argv[4]), f"pid-{env.rank}"), "w") as f:
                f.write(str(os.getpid()))   # torchrun starts each worker in its own session: the test kills these
            step = 0
            while True:
                step += 1
                with torch.no_grad():
                    for p in policy.parameters():
                        p.fill_(float(step))
                save_sharded(ckpt, policy, opt, config=config, trainer_state={"step": step}, meta={"step": step})
                if env.is_main:
                    with open(sys.argv[4], "w") as f:
                        f.write(str(step))
        out = {"model": full_model_state(policy), "optim": full_optimizer_state(policy, opt)}
        if env.is_main:
            torch.save(out, sys.argv[4])
    elif mode == "train_rss":   # per iteration: peak RSS of the rollout and of the rest, above the post-import RSS
        import unigrpo.trainer as trainer_mod
        from unigrpo.config import load_config
        from unigrpo.model.unified import UnifiedModel
        from unigrpo.trainer import TrainConfig, Trainer
        with open(sys.argv[2]) as f:
            cfg = load_config(TrainConfig, None, [f"{k}={v}" for k, v in json.load(f).items()])
        mcfg = open_base(cfg.base)[0]
        with torch.device("meta"):   # imports and first-use initialisation, not part of the run's memory
            UnifiedModel(mcfg)
        reset_peak()
        before = status_kb("VmRSS") * 1024
        trainer = Trainer(cfg, progress=False)
        phases = {"init": status_kb("VmHWM") * 1024 - before, "rollout": [], "update": []}
        inner = trainer_mod.rollout_in_batches

        def measured_rollout(*a, **k):
            reset_peak()
            out = inner(*a, **k)
            phases["rollout"].append(status_kb("VmHWM") * 1024 - before)
            reset_peak()
            return out
        trainer_mod.rollout_in_batches = measured_rollout
        for _ in range(cfg.iterations):
            trainer.iteration()
            phases["update"].append(status_kb("VmHWM") * 1024 - before)
        with open(os.path.join(sys.argv[3], f"train-rss-{env.rank}.json"), "w") as f:
            json.dump(phases, f)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
