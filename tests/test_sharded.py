"""Meta-device construction and sharded loading under FSDP2 (unigrpo/distributed/loading.py), on CPU with
gloo: the sharded load equals the full load bit for bit (our checkpoints, tied or not, and BAGEL's layout),
every rank holds only its rows, and peak host memory per rank stays near model / world."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from unigrpo.checkpoint import load_checkpoint, save_checkpoint
from unigrpo.model import preset
from unigrpo.model.build import build_bundle

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
WORKER = os.path.join(os.path.dirname(__file__), "_shard_worker.py")


def torchrun(tmp_path, *args, nproc=2, script=WORKER, extra_env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(__file__), **(extra_env or {})}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29000 + (os.getpid() * 7 + nproc) % 1000), script, *map(str, args)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert res.returncode == 0, f"torchrun failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    return res


def small_base(path, tie=False, seed=0, **dims):
    torch.manual_seed(seed)
    kw = dict(hidden=32, heads=2, kv_heads=1, intermediate=64, layers=2, max_text_len=48, tie_embeddings=tie)
    b = build_bundle(preset("tiny", **{**kw, **dims}))
    for p in b.model.parameters():   # no zero or one initialised tensors: every value must be read
        torch.nn.init.normal_(p)
    save_checkpoint(str(path), model_state=b.model.state_dict(), config=b.checkpoint_config())
    return b


def test_sharded_load_equals_full_load_bit_for_bit(tmp_path):
    from test_bagel_checkpoint import IMAGE, write_checkpoint

    from unigrpo.model.bagel import load_bagel
    small_base(tmp_path / "untied")
    small_base(tmp_path / "tied", tie=True, seed=1)
    bagel = write_checkpoint(tmp_path / "bagel")
    torchrun(tmp_path, "load", tmp_path / "out.pt", tmp_path / "untied", tmp_path / "tied", f"{bagel}@{IMAGE}")
    got = torch.load(tmp_path / "out.pt", weights_only=False)
    full = {str(tmp_path / n): load_checkpoint(tmp_path / n).model_state for n in ("untied", "tied")}
    full[str(bagel)] = load_bagel(bagel, dtype=torch.float32, image_size=IMAGE).model.state_dict()
    for base, want in full.items():
        pol, ref = got[base]["policy"], got[base]["ref"]
        assert set(pol) == set(want) == set(ref), base
        for k, v in want.items():
            assert pol[k].dtype == torch.float32 and torch.equal(pol[k], v.float()), (base, k)
            assert ref[k].dtype == torch.bfloat16 and torch.equal(ref[k], v.to(torch.bfloat16)), (base, k)
        for k, rows in got[base]["local"].items():   # each rank holds ceil(rows / 2) rows, not all
            assert rows == (want[k].shape[0] + 1) // 2, (base, k)


def test_sharded_load_names_bad_keys(tmp_path):
    from unigrpo.distributed.loading import WeightSource, load_sharded_weights
    from unigrpo.model.unified import UnifiedModel
    b = small_base(tmp_path / "b")
    state = {k: v for k, v in b.model.state_dict().items() if k != "image_in.bias"}
    state["ghost"] = torch.zeros(2)
    state["embed.weight"] = torch.zeros(3, 32)
    save_file(state, str(tmp_path / "bad.safetensors"))
    model = UnifiedModel(b.model.cfg)
    with pytest.raises(ValueError) as err:
        load_sharded_weights(model, WeightSource(str(tmp_path / "bad.safetensors")))
    msg = str(err.value)
    assert "missing key(s): image_in.bias" in msg and "unexpected key(s): ghost" in msg
    assert "embed.weight: expected [264, 32], found [3, 32]" in msg


# a test model big enough that the load dominates the interpreter's noise, small enough for a 2-core CI
BIG = dict(hidden=768, heads=12, kv_heads=4, intermediate=3072, layers=16, vocab_size=16384,
           max_text_len=64)   # 303M parameters, the "~300M"


def write_random_base(path, cfg):
    """Our checkpoint layout with standard-normal weights (fast; no init code run)."""
    from dataclasses import asdict

    from unigrpo.model.unified import UnifiedModel
    with torch.device("meta"):
        names = {n: p.shape for n, p in UnifiedModel(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    path.mkdir()
    save_file({n: torch.randn(s, generator=gen) for n, s in names.items()}, str(path / "model.safetensors"))
    with open(path / "config.json", "w") as f:
        json.dump({"model": asdict(cfg), "tokenizer": {"kind": "byte"}}, f)


def test_peak_host_memory_per_rank_is_about_model_over_world(tmp_path):
    """Peak RSS above the pre-load RSS, per rank at world 2, is below (full fp32 size) / 2 + 25%, and within
    20% of memory.load_host_peak's figure for this model."""
    from unigrpo.distributed.memory import load_host_peak
    from unigrpo.model.unified import UnifiedModel
    cfg = preset("tiny", **BIG)
    with torch.device("meta"):
        P = UnifiedModel(cfg).num_params()
    write_random_base(tmp_path / "big", cfg)
    torchrun(tmp_path, "rss", tmp_path / "big", tmp_path)
    full = 4 * P
    est = load_host_peak(cfg, 2, reference=False)
    for r in range(2):
        m = json.loads((tmp_path / f"rss-{r}.json").read_text())
        extra = m["peak"] - m["before"]
        assert m["local_bytes"] <= full / 2 + 4 * 8192
        assert extra < 1.25 * full / 2, f"rank {r}: {extra / 1e6:.0f} MB above the baseline, full {full / 1e6:.0f} MB"
        assert abs(extra - est) <= 0.2 * est, f"rank {r}: measured {extra / 1e6:.0f} MB, estimate {est / 1e6:.0f} MB"


def test_training_peak_rss_matches_the_estimate(tmp_path):
    """Two FSDP iterations of a 40M-parameter model at world 2 in fp32 (param_dtype fp32: every "bf16" term of
    the estimate is 4 bytes here). In the second (AdamW state allocated), the peak RSS of the rollout (under
    `unsharded`) and of the update, above the post-import RSS, are each within 20% of memory.estimate's
    rollout and training totals. glibc is told to return freed blocks at once (MALLOC_MMAP_THRESHOLD_ 64 KB),
    else RSS keeps every freed all-gather buffer and measures the allocator, not the tensors."""
    from unigrpo.distributed.memory import estimate
    cfg = preset("tiny", hidden=512, heads=8, kv_heads=4, intermediate=2048, layers=4, vocab_size=8192,
                 max_text_len=64)
    write_random_base(tmp_path / "base", cfg)
    run = {"base": str(tmp_path / "base"), "out": str(tmp_path / "run"), "iterations": 2, "prompts_per_iter": 2,
           "rollout.group_size": 2, "rollout.steps": 4, "rollout.window_size": 2, "rollout.window_hi": 3,
           "rollout.max_new_tokens": 8, "optim.minibatch": 2, "optim.epochs": 1, "skip_zero_std": False,
           "threads": 1, "dist.param_dtype": "fp32", "dist.device": "cpu"}
    (tmp_path / "cfg.json").write_text(json.dumps(run))
    torchrun(tmp_path, "train_rss", tmp_path / "cfg.json", tmp_path,
             extra_env={"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"})
    e = estimate(cfg, 2, group=2, prompts=2, window=2, text_tokens=40, micro_batch=2, checkpointing=False,
                 gather_bytes=4)
    for r in range(2):
        m = json.loads((tmp_path / f"train-rss-{r}.json").read_text())
        for phase, est in (("rollout", e.rollout_total), ("update", e.training_total)):
            got = m[phase][1]
            assert abs(got - est) <= 0.2 * est, (f"rank {r} {phase}: measured {got / 1e6:.0f} MB, estimate "
                                                 f"{est / 1e6:.0f} MB ({m})")
