"""Sharded (DCP) checkpoints (unigrpo/distributed/sharded_checkpoint.py) on CPU with gloo: saved at world 4
(asynchronously), resumed at world 2 and at world 1 with weights, AdamW moments and step exact; kill -9 in
the middle of a sharded save leaves the previous checkpoint loadable and the next run resumes from it;
`unigrpo export` consolidates one into our safetensors format exactly."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from test_sharded import WORKER, small_base, torchrun

from unigrpo.distributed.sharded_checkpoint import (is_dcp_checkpoint, load_sharded, read_full_state,
                                                    resolve_checkpoint, save_sharded)

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")


def _same_optim(a: dict, b: dict):
    assert set(a["state"]) == set(b["state"]) and a["state"]
    for name, st in a["state"].items():
        assert set(st) == set(b["state"][name]), name
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["state"][name][k])), (name, k)
    for ga, gb in zip(a["param_groups"], b["param_groups"]):
        assert ga["lr"] == gb["lr"] and ga["name"] == gb["name"] and sorted(ga["params"]) == sorted(gb["params"])


def test_save_at_world_4_resumes_at_world_2_and_1_exactly(tmp_path):
    from _shard_worker import make_optimizer

    from unigrpo.distributed import full_optimizer_state
    from unigrpo.model.build import load_bundle
    small_base(tmp_path / "base")
    ck = tmp_path / "ck"
    torchrun(tmp_path, "dcp_save", tmp_path / "base", ck, tmp_path / "w4.pt", "async", nproc=4)
    assert sorted(f for f in os.listdir(ck / "dcp") if f.endswith(".distcp")) == [
        f"__{r}_0.distcp" for r in range(4)]   # every rank wrote its own shards
    assert sorted(os.listdir(tmp_path)) == ["base", "ck", "w4.pt"]   # no temp directory left
    w4 = torch.load(tmp_path / "w4.pt", weights_only=False)
    torchrun(tmp_path, "dcp_load", tmp_path / "base", ck, tmp_path / "w2.pt", nproc=2)
    w2 = torch.load(tmp_path / "w2.pt", weights_only=False)
    assert set(w2["model"]) == set(w4["model"])
    for k, v in w4["model"].items():
        assert torch.equal(w2["model"][k], v), k
    _same_optim(w4["optim"], w2["optim"])
    moments = [st["exp_avg"] for st in w4["optim"]["state"].values()]
    assert all(int(st["step"]) == 2 for st in w4["optim"]["state"].values()) and any(m.abs().max() > 0 for m in moments)
    # world 1: a plain (unsharded) model and optimizer, no process group
    model = load_bundle(str(tmp_path / "base")).model
    opt = make_optimizer(model)
    _, meta, trainer = load_sharded(str(ck), model, opt)
    assert meta["world"] == 4 and meta["step"] == trainer["step"] == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, w4["model"][k]), k
    _same_optim(w4["optim"], full_optimizer_state(model, opt))
    state, config = read_full_state(str(ck))
    assert all(torch.equal(state[k], w4["model"][k]) for k in w4["model"]) and "model" in config
    from unigrpo.checkpoint import load_checkpoint
    from unigrpo.cli import main
    assert main(["export", f"checkpoint={ck}", f"out={tmp_path / 'exported'}"]) == 0   # consolidated, exact
    exported = load_checkpoint(tmp_path / "exported")
    assert set(exported.model_state) == set(w4["model"]) and exported.meta["world"] == 4
    assert all(torch.equal(exported.model_state[k], v) for k, v in w4["model"].items())


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_kill_9_during_sharded_save_keeps_previous_checkpoint(tmp_path):
    small_base(tmp_path / "base")
    ck, step_file = tmp_path / "ck", tmp_path / "step.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(__file__)}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29000 + (os.getpid() * 7 + 5) % 1000), WORKER, "dcp_loop", tmp_path / "base", ck, step_file]
    proc = subprocess.Popen([str(c) for c in cmd], env=env, cwd=str(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    pid_files = [tmp_path / f"pid-{r}" for r in range(2)]
    try:
        deadline = time.time() + 300
        while not (step_file.exists() and step_file.read_text().strip() not in ("", "1")):
            assert proc.poll() is None, "the saving loop died on its own"
            assert time.time() < deadline, "no checkpoint written within 300 s"
            time.sleep(0.05)
        time.sleep(random.uniform(0.0, 0.5))   # somewhere inside a later save
    finally:
        # torchrun starts every worker in a session of its own: kill the ranks by pid (no cleanup runs), then
        # the launcher, and wait until the ranks are really gone before looking at the directory
        pids = [int(f.read_text()) for f in pid_files if f.exists()]
        for pid in pids:
            _kill(pid)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for pid in pids:
            while _alive(pid):
                time.sleep(0.01)
    assert len(pids) == 2
    left = sorted(os.listdir(tmp_path))
    path = resolve_checkpoint(str(ck))
    assert is_dcp_checkpoint(str(ck)), left
    state, _ = read_full_state(str(ck))
    from unigrpo.distributed.sharded_checkpoint import read_meta
    _, _, meta, trainer = read_meta(str(ck))
    step = meta["step"]
    assert trainer["step"] == step >= 1
    for k, v in state.items():   # the weights are those of the step the checkpoint says it is
        assert torch.equal(v, torch.full_like(v, float(step))), (k, step, path, left)
    # the next run resumes from it and its save recovers: one directory left
    from unigrpo.model.build import load_bundle
    model = load_bundle(str(tmp_path / "base")).model
    load_sharded(str(ck), model)
    assert all(torch.equal(v, torch.full_like(v, float(step))) for v in model.state_dict().values())
    save_sharded(str(ck), model, None, config={"model": {}}, meta={"step": step + 1})
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("ck")) == ["ck"]
    print(f"killed at step {step}; left behind: {left}")


def test_export_round_trip_exact(tmp_path):
    """A DCP checkpoint (written here in one process) → `unigrpo export` → our safetensors format and BAGEL's
    layout; both load back bit for bit."""
    from test_bagel_checkpoint import IMAGE, write_checkpoint

    from unigrpo.checkpoint import load_checkpoint
    from unigrpo.cli import main
    from unigrpo.model.bagel import load_bagel
    from unigrpo.model.build import load_bundle
    # ours: a small model with moved weights
    b = small_base(tmp_path / "base", tie=True)
    save_sharded(str(tmp_path / "ck"), b.model, None, config=b.checkpoint_config(), meta={"step": 7})
    assert main(["export", f"checkpoint={tmp_path / 'ck'}", f"out={tmp_path / 'out'}"]) == 0
    got = load_checkpoint(tmp_path / "out")
    want = b.model.state_dict()
    assert set(got.model_state) == set(want) and got.meta["step"] == 7 and got.meta["kind"] == "export"
    for k, v in want.items():
        assert torch.equal(got.model_state[k], v), k
    assert got.model_state["lm_head.weight"] is got.model_state["embed.weight"]   # the tie survives
    assert torch.equal(load_bundle(str(tmp_path / "out")).model.embed.weight, b.model.embed.weight)
    # BAGEL: load a tiny BAGEL directory, perturb, DCP, export in BAGEL's layout, load with load_bagel
    src = write_checkpoint(tmp_path / "bagel")
    bundle = load_bagel(src, dtype=torch.float32, image_size=IMAGE)
    with torch.no_grad():
        for p in bundle.model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    save_sharded(str(tmp_path / "bck"), bundle.model, None, config=bundle.checkpoint_config())
    assert main(["export", f"checkpoint={tmp_path / 'bck'}", f"out={tmp_path / 'bout'}", "layout=bagel"]) == 0
    again = load_bagel(tmp_path / "bout", dtype=torch.float32, image_size=IMAGE).model.state_dict()
    for k, v in bundle.model.state_dict().items():
        assert torch.equal(again[k], v), k
    # errors name the problem
    assert main(["export", f"checkpoint={tmp_path / 'ck'}", f"out={tmp_path / 'o2'}", "layout=bagel"]) == 2
    assert main(["export", f"checkpoint={tmp_path / 'ck'}", f"out={tmp_path / 'o3'}", "layout=zip"]) == 2
    assert main(["export", f"checkpoint={tmp_path / 'nowhere'}", f"out={tmp_path / 'o4'}"]) == 2
