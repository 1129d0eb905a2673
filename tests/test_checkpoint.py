"""Tests of unigrpo.checkpoint: exact round trips (fp32, bf16, tied weights), overwrite, crashes at each step
of the atomic swap, strict loading messages, and RNG state capture/restore."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from unigrpo import checkpoint as ck
from unigrpo.checkpoint import (get_rng_state, load_checkpoint, load_state_strict, save_checkpoint,
                                set_rng_state)


class Tiny(torch.nn.Module):
    def __init__(self, vocab=11, hidden=6, tie=True):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.proj = torch.nn.Linear(hidden, hidden).to(torch.bfloat16)
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)
        self.register_buffer("scale", torch.tensor([0.5, 2.0]))
        if tie:
            self.lm_head.weight = self.embed.weight


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


def _entries(tmp_path) -> list[str]:
    return sorted(os.listdir(tmp_path))


def test_round_trip_exact_with_ties(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    state = model.state_dict()
    state["extra_nc"] = torch.randn(5, 7).t()  # non-contiguous
    state["extra_bf16"] = torch.randn(3, 5, dtype=torch.bfloat16)
    path = tmp_path / "ckpt"
    trainer = {"step": 7, "opt": {"exp_avg": torch.randn(4)}, "rng": get_rng_state()}
    save_checkpoint(path, model_state=state, config={"model": {"hidden": 6}}, trainer_state=trainer,
                    meta={"step": 7})
    assert _entries(tmp_path) == ["ckpt"]
    assert sorted(os.listdir(path)) == ["config.json", "meta.json", "model.safetensors", "trainer.pt"]
    got = load_checkpoint(path)
    assert _same(got.model_state, {k: v.contiguous() for k, v in state.items()})
    assert got.model_state["lm_head.weight"] is got.model_state["embed.weight"]  # tie restored
    assert got.config == {"model": {"hidden": 6}}
    assert got.meta["step"] == 7 and "version" in got.meta and "time" in got.meta
    assert got.trainer_state["step"] == 7 and torch.equal(got.trainer_state["opt"]["exp_avg"],
                                                          trainer["opt"]["exp_avg"])
    fresh = Tiny()
    load_state_strict(fresh, {k: v for k, v in got.model_state.items() if not k.startswith("extra")})
    assert _same(fresh.state_dict(), model.state_dict())
    assert fresh.lm_head.weight is fresh.embed.weight


def test_trainer_state_optional_and_overwrite(tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(path, model_state={"w": torch.zeros(3)}, config={"v": 1})
    assert load_checkpoint(path).trainer_state is None
    save_checkpoint(path, model_state={"w": torch.ones(3)}, config={"v": 2}, trainer_state={"step": 2})
    got = load_checkpoint(path)
    assert got.config == {"v": 2} and torch.equal(got.model_state["w"], torch.ones(3))
    assert got.trainer_state == {"step": 2}
    assert _entries(tmp_path) == ["ckpt"]  # no temp or old directories left


@pytest.mark.parametrize("fail_at", ["write", "aside", "swap"])
def test_failure_mid_save_keeps_previous(tmp_path, monkeypatch, fail_at):
    path = tmp_path / "ckpt"
    save_checkpoint(path, model_state={"w": torch.zeros(3)}, config={"v": 1})
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append((src, dst))
        if (fail_at == "aside" and len(calls) == 1) or (fail_at == "swap" and len(calls) == 2):
            raise OSError("simulated crash")
        return real_replace(src, dst)

    def bad_save(*a, **k):
        raise OSError("disk full")

    if fail_at == "write":
        monkeypatch.setattr(ck, "save_file", bad_save)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        save_checkpoint(path, model_state={"w": torch.ones(3)}, config={"v": 2})
    monkeypatch.undo()
    got = load_checkpoint(path)
    assert got.config == {"v": 1} and torch.equal(got.model_state["w"], torch.zeros(3))
    assert _entries(tmp_path) == ["ckpt"]


def test_hard_crash_between_aside_and_swap_recovers(tmp_path):
    """A process killed after step 2 (old moved aside) and before step 3 leaves no `P`; loading reads the old
    one, and the next save restores and cleans up."""
    path = tmp_path / "ckpt"
    save_checkpoint(path, model_state={"w": torch.zeros(3)}, config={"v": 1})
    os.rename(path, str(path) + ".old-deadbeef")
    os.mkdir(str(path) + ".tmp-deadbeef")  # a half-written new checkpoint
    assert load_checkpoint(path).config == {"v": 1}
    save_checkpoint(path, model_state={"w": torch.ones(3)}, config={"v": 2})
    assert load_checkpoint(path).config == {"v": 2}
    assert _entries(tmp_path) == ["ckpt"]


def test_load_errors_name_path_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere")
    path = tmp_path / "ckpt"
    save_checkpoint(path, model_state={"w": torch.zeros(3)}, config={"v": 1}, trainer_state={"step": 1})
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        load_checkpoint(path)
    save_checkpoint(path, model_state={"w": torch.zeros(3)}, config={"v": 1}, trainer_state={"step": 1})
    for name, junk in [("model.safetensors", b"\x00garbage"), ("config.json", b"{not json"),
                       ("trainer.pt", b"garbage")]:
        save_checkpoint(path, model_state={"w": torch.zeros(3)}, config={"v": 1}, trainer_state={"step": 1})
        (path / name).write_bytes(junk)
        with pytest.raises(ValueError, match=f"corrupt checkpoint file .*{name}"):
            load_checkpoint(path)
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        save_checkpoint(path, model_state={"w": torch.zeros(3)}, config={"v": object()})


def test_load_state_strict_messages():
    model = Tiny(tie=False)
    state = model.state_dict()
    state.pop("proj.bias")
    state["ghost.weight"] = torch.zeros(2)
    state["embed.weight"] = torch.zeros(12, 6)
    with pytest.raises(ValueError) as err:
        load_state_strict(model, state)
    msg = str(err.value)
    assert "1 missing keys: proj.bias" in msg
    assert "1 unexpected keys: ghost.weight" in msg
    assert "embed.weight: checkpoint [12, 6] vs model [11, 6]" in msg
    many = {f"x{i}": torch.zeros(1) for i in range(25)}
    with pytest.raises(ValueError, match=r"25 unexpected keys: .* and 15 more"):
        load_state_strict(torch.nn.Linear(1, 1), {**torch.nn.Linear(1, 1).state_dict(), **many})


def _draws():
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), torch.randn(2).tolist()


def test_rng_round_trip_through_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.randn(1)  # leave torch's normal sampler mid-stream
    state = get_rng_state()
    expected = _draws()
    save_checkpoint(tmp_path / "ck", model_state={"w": torch.zeros(1)}, config={}, trainer_state={"rng": state})
    _draws()
    set_rng_state(load_checkpoint(tmp_path / "ck").trainer_state["rng"])  # weights_only=True load
    assert _draws() == expected
