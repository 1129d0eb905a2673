"""FSDP2 on CPU with gloo, two processes launched by torchrun (ISSUE: scale-out).

- one sharded update (each rank trains on its half of the same trajectories) equals the single-process
  update on all of them;
- a checkpoint written at world size 2 resumes at world size 1 (weights, optimizer state, step).

Tolerance: parameters after one AdamW step agree to 2e-6 absolute. Why: the two runs differ only in fp32
reduction order (per-rank mean losses averaged by FSDP's reduce-scatter vs one mean over the whole batch),
≈1e-7 relative on the gradients; an AdamW step of lr 1e-3 turns a relative gradient error e into at most
lr·e per element, except where |g| ~ eps = 1e-8 — such elements move by < lr·1e-3 in both runs. The step
itself moves parameters by up to 1e-3, so the check can tell a correct update from a missing or wrong one.
"""
import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist

from unigrpo.checkpoint import load_checkpoint
from unigrpo.rewards.advantages import group_advantages
from unigrpo.rollout.rollout import rollout
from unigrpo.trainer import TrainConfig, Trainer

from test_trainer import tiny_base

pytestmark = pytest.mark.skipif(not dist.is_available() or shutil.which("torchrun") is None,
                                reason="torch.distributed / torchrun not available")
WORKER = os.path.join(os.path.dirname(__file__), "_dist_worker.py")


def _overrides(tmp_path, **kw):
    o = {"base": str(tmp_path / "base"), "out": str(tmp_path / "run"), "iterations": 1, "prompts_per_iter": 2,
         "rollout.group_size": 3, "rollout.steps": 5, "rollout.window_size": 2, "rollout.window_hi": 4,
         "rollout.max_new_tokens": 12, "optim.minibatch": 3, "optim.epochs": 1, "optim.lr_text": 1e-3,
         "optim.lr_image": 1e-3, "skip_zero_std": False, "threads": 1, "dist.param_dtype": "fp32",
         "dist.device": "cpu", "eval_samples": 4}
    o.update(kw)
    return o


def _config(overrides: dict) -> TrainConfig:
    from unigrpo.config import load_config
    return load_config(TrainConfig, None, [f"{k}={v}" for k, v in overrides.items()])


def _torchrun(tmp_path, *args, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(__file__)}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29500 + os.getpid() % 1000), WORKER, *map(str, args)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    if res.returncode != 0 and "terminate called without an active exception" in res.stderr:
        # seen once in ~15 runs on a loaded 2-core machine (docs/LOG.md 2026-11-24): a rank aborts in gloo's C++
        # thread teardown; the run is repeated once and must then pass with the same checks
        warnings.warn(f"torchrun rank aborted in C++ teardown; retrying once:\n{res.stderr[-1500:]}")
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert res.returncode == 0, f"torchrun failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"


@pytest.mark.parametrize("fsdp_optim", [{}, {"optim.minibatch": 4, "optim.microbatch": 1},
                                        {"loss.loss_type": "dapo", "optim.minibatch": 4, "optim.microbatch": 1}],
                         ids=["one-pass", "micro-batches", "dapo-global-tokens"])
def test_fsdp_update_equals_single_process_update(tmp_path, fsdp_optim):
    """Each rank's 3 rows in one mini-batch (one pass; or micro-batches of 1 plus one dummy, which FSDP needs
    for equal collectives on every rank) give the single process's step over all 6 rows."""
    tiny_base(tmp_path / "base")
    ov = _overrides(tmp_path)
    # trajectories from the single-process trainer's policy, shared by both runs
    single = Trainer(_config({**ov, **{k: v for k, v in fsdp_optim.items() if k.startswith("loss.")},
                              "optim.minibatch": 6}), progress=False)
    rc = single.cfg.rollout
    traj = rollout(single.policy, single.bundle.tokenizer, ["a red circle", "two blue squares"], rc,
                   generator=torch.Generator().manual_seed(3), window_rng=np.random.default_rng(3))
    traj.reasoning.cache = None
    rewards = torch.tensor([0.0, 0.5, 1.0, 1.0, 0.25, 0.0])
    adv = group_advantages(rewards, rc.group_size).float()
    torch.save({"traj": traj, "adv": adv}, tmp_path / "traj.pt")
    before = {k: v.clone() for k, v in single.policy.state_dict().items()}
    m1 = single.train_step(traj, list(range(6)), adv, [])
    after = single.policy.state_dict()

    with open(tmp_path / "cfg.json", "w") as f:
        json.dump({**ov, **fsdp_optim}, f)
    _torchrun(tmp_path, "update", tmp_path / "cfg.json", tmp_path / "traj.pt", tmp_path / "fsdp.pt")
    fsdp = torch.load(tmp_path / "fsdp.pt", weights_only=False)
    moved = max((after[k] - before[k]).abs().max().item() for k in after)
    assert moved > 1e-4, "the single-process update did not move the weights"
    assert set(fsdp["state"]) == set(after)
    worst = max(((fsdp["state"][k] - after[k]).abs().max().item(), k) for k in after)
    assert worst[0] <= 2e-6, f"FSDP update differs from the single-process one by {worst[0]:.3g} at {worst[1]}"
    # gradient norms are scale-sensitive where AdamW is not: a wrongly weighted loss fails here
    for key in ("text/policy_loss", "flow/policy_loss", "flow/velocity_mse", "grad_norm/text", "grad_norm/image"):
        assert fsdp["metrics"][key] == pytest.approx(m1[key], rel=1e-4, abs=1e-7), key


def test_checkpoint_from_world_size_2_resumes_at_world_size_1(tmp_path):
    """The issue's done-criterion: a torchrun run at world 2 writes DCP checkpoints (step 1 in the background,
    the last one synchronously); one process resumes from it with weights and AdamW state exact, trains on,
    and writes its own checkpoint in the single-process format (safetensors)."""
    from unigrpo.distributed.sharded_checkpoint import is_dcp_checkpoint, read_full_state, read_meta
    tiny_base(tmp_path / "base")
    ov = _overrides(tmp_path, checkpoint_every=1, iterations=2,   # + the memory plan's settings, in a real run
                    **{"dist.async_save": True, "dist.offload_optimizer": True, "dist.offload_reference": True,
                       "dist.rollout_batch": 3})
    with open(tmp_path / "cfg.json", "w") as f:
        json.dump(ov, f)
    _torchrun(tmp_path, "train", tmp_path / "cfg.json", tmp_path / "final.pt")
    ck = tmp_path / "run" / "checkpoint"
    assert is_dcp_checkpoint(str(ck))
    assert sorted(f for f in os.listdir(ck / "dcp") if f.endswith(".distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not [f for f in os.listdir(tmp_path / "run") if ".tmp-" in f or ".old-" in f]   # every save swapped in
    _, _, meta, trainer_state = read_meta(str(ck))
    assert trainer_state["world"] == 2 and trainer_state["step"] == 2 == meta["step"]
    final = torch.load(tmp_path / "final.pt", weights_only=False)
    state, _ = read_full_state(str(ck))
    assert all(torch.equal(state[k], final["model"][k]) for k in final["model"])
    with pytest.warns(UserWarning, match="world size 2, resuming at 1"):
        tr = Trainer(_config({**ov, "iterations": 3}), progress=False)
    assert tr.step == 2
    for k, v in tr.policy.state_dict().items():
        assert torch.equal(v, final["model"][k]), k
    saved = final["optim"]["state"]
    names = dict(tr.policy.named_parameters())
    restored = {n: tr.opt.state[p] for n, p in names.items() if p in tr.opt.state}
    assert restored and set(restored) == set(saved)
    for n, st in restored.items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(st[key], saved[n][key]), (n, key)
    hist = tr.train()
    assert len(hist) == 1 and np.isfinite(hist[0]["loss"])
    ck1 = load_checkpoint(str(ck))   # the single-process path keeps safetensors
    assert ck1.trainer_state["step"] == 3 and ck1.trainer_state["world"] == 1 and not is_dcp_checkpoint(str(ck))


def test_memory_estimate_counts_the_bagel_7b_parameters():
    """The docs' memory table is computed from the model: P = 14.16B for bagel-7b (both experts), and the
    sharded training state is 16 bytes per parameter (fp32 weights 4 + grads 4 + AdamW 8) over N GPUs."""
    from unigrpo.distributed.memory import estimate
    from unigrpo.model import preset
    e1, e8 = estimate(preset("bagel-7b"), 1), estimate(preset("bagel-7b"), 8)
    assert 14.1e9 < e1.params < 14.2e9
    assert e1.weights_fp32 + e1.grads + e1.adam == 16 * e1.params
    assert e8.weights_fp32 * 8 == pytest.approx(e1.weights_fp32) and e8.activations == e1.activations
    assert estimate(preset("bagel-7b"), 8, checkpointing=False).activations > 10 * e8.activations
