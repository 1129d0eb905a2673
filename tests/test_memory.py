"""The memory estimator's arithmetic against hand-computed numbers (BAGEL-7B dims written out here), the plan's
choices, and the two settings it relies on (dist.rollout_batch, dist.offload_optimizer) doing what they say."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from unigrpo.distributed import DistConfig, optimizer_offloaded
from unigrpo.distributed.memory import GB, estimate, main, plan
from unigrpo.model import preset
from unigrpo.model.build import build_bundle
from unigrpo.rollout.rollout import (RolloutConfig, check_rollout_batch, concat_trajectories, rollout,
                                     rollout_in_batches)

# BAGEL-7B-MoT: H 3584, I 18944, 28 layers, 4 KV heads of 128, 1024 px → 128×128×16 latents, 4096 image tokens
H, I, L, KV, HD, NI, D = 3584, 18944, 28, 4, 128, 4096, 16 * 128 * 128


@pytest.fixture(scope="module")
def bagel():
    return preset("bagel-7b")


def test_components_match_hand_computed_numbers(bagel):
    e = estimate(bagel, 4, group=24, prompts=32, window=3, text_tokens=512, micro_batch=1, rollout_batch=24)
    P = e.params
    S = 512 + 3 * NI   # 12800 packed tokens per trajectory
    assert e.activations == L * S * H * 2 + (4 * S * H + 3 * S * I) * 2 == 4_390_912_000
    assert e.kv_cache == 24 * 512 * L * 2 * KV * HD * 2 == 704_643_072
    assert e.rollout_activations == 24 * NI * (6 * H + 3 * I) * 2 == 15_401_484_288
    assert e.trajectories == 8 * 24 * 10 * D * 4 == 2_013_265_920   # 8 groups × 24 rows here, 3W + 1 tensors
    assert e.rollout_weights == 2 * P and e.reference == 2 * P / 4 and e.adam == 8 * P / 4
    # one decoder layer, both experts: q (+bias), k, v (+bias, 4 KV heads of 128), o, 4 norms, SwiGLU
    layer = 2 * ((H * H + H) + 2 * (H * 512 + 512) + H * H + (128 + 128 + H + H) + 3 * H * I)
    root = 2 * 152064 * H + 2 * H + (64 * H + H) + (H * 64 + 64) + (256 * H + H) + (H * H + H)
    assert layer == 466_116_096 and P == 28 * layer + root == 14_155_484_736
    assert e.gathered == 2 * (root + 2 * layer)
    assert e.grad_buffers == 2 * (root + layer) + 4 * layer
    assert e.buffers == 2 * 64 * 64 * H * 4   # policy's and reference's fp32 64×64 position tables
    assert e.rollout_total == pytest.approx(4 * P / 4 + 8 * P / 4 + 2 * P / 4 + 2 * P + 704_643_072
                                            + 15_401_484_288 + 2_013_265_920 + e.buffers)
    assert e.training_total == pytest.approx(16 * P / 4 + 2 * P / 4 + e.gathered + e.grad_buffers
                                             + 4_390_912_000 + 2_013_265_920 + e.buffers)


def test_options_change_exactly_their_terms(bagel):
    base = estimate(bagel, 4, rollout_batch=24)
    off = estimate(bagel, 4, rollout_batch=24, offload_optimizer=True)
    assert base.rollout_total - off.rollout_total == pytest.approx(8 * base.params / 4)
    assert off.training_total == base.training_total and off.host_offload == 8 * base.params / 4
    full_ref = estimate(bagel, 4, rollout_batch=24, reference_sharded=False)
    assert full_ref.rollout_total - base.rollout_total == pytest.approx(2 * base.params * (1 - 1 / 4))
    small = estimate(bagel, 4, rollout_batch=8)
    assert base.kv_cache == 3 * small.kv_cache and base.rollout_activations == 3 * small.rollout_activations
    assert estimate(bagel, 4).kv_cache == 8 * base.kv_cache   # 0 = all 192 rows of this GPU at once
    ref_off = estimate(bagel, 4, rollout_batch=24, offload_optimizer=True, offload_reference=True)
    assert off.rollout_total - ref_off.rollout_total == pytest.approx(2 * base.params / 4)
    assert base.training_total - ref_off.training_total == pytest.approx(2 * base.params / 4)
    assert ref_off.host_offload == pytest.approx(10 * base.params / 4)
    layer = estimate(bagel, 4, rollout_batch=24, rollout_gather="layer")
    assert layer.rollout_weights == base.gathered < base.rollout_weights / 5
    with pytest.raises(ValueError, match="gpus=3"):
        estimate(bagel, 3)


def test_plan_fits_4_and_8_gpus_of_80_gb(bagel):
    p4 = plan(bagel, 4, gpu_memory=80 * GB, micro_batch=4)
    assert p4.fits and p4.estimate.peak <= 80 * GB
    assert p4.settings["dist.offload_optimizer"] is True and p4.settings["dist.rollout_batch"] == 24
    assert p4.settings["dist.offload_reference"] is True
    assert "optim.microbatch" in p4.settings and p4.notes   # the training side accumulates micro-batches
    p8 = plan(bagel, 8, gpu_memory=80 * GB, micro_batch=4)
    assert p8.fits and "dist.offload_optimizer" not in p8.settings and "optim.microbatch" not in p8.settings
    assert "dist.offload_reference" not in p8.settings
    # without any option the rollout of all 192 rows at once is far over
    assert estimate(bagel, 4, micro_batch=4, overhead=4 * GB).rollout_total > 2 * 80 * GB
    assert not plan(bagel, 1, gpu_memory=80 * GB).fits


def test_cli_prints_the_plan_and_its_settings(capsys):
    assert main(["--config", "paper", "--gpus", "4,8"]) == 0
    out = capsys.readouterr().out
    assert "4 GPUs × 80 GB" in out and "dist.offload_optimizer=true" in out and "DOES NOT FIT" not in out
    assert main(["--config", "paper", "--gpus", "4", "--table"]) == 0
    assert "| 4 |" in capsys.readouterr().out


def test_settings_validate():
    with pytest.raises(ValueError, match="dist.rollout_batch=-1"):
        DistConfig(rollout_batch=-1)
    with pytest.raises(ValueError, match="dist.checkpoint_format='zip'"):
        DistConfig(checkpoint_format="zip")
    for ok in (0, 2, 8, 24, 48):
        check_rollout_batch(ok, 24)
    for bad in (1, 5, 36):
        with pytest.raises(ValueError, match=f"dist.rollout_batch={bad}"):
            check_rollout_batch(bad, 24)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    b = build_bundle(preset("tiny", hidden=32, heads=2, kv_heads=1, intermediate=64, layers=1, max_text_len=48))
    torch.nn.init.normal_(b.model.image_out.weight, std=0.05)
    return b.model.eval(), b.tokenizer


@pytest.mark.parametrize("batch", [2, 8])
def test_rollout_in_batches_is_the_concatenation_of_the_pieces(tiny, batch):
    model, tok = tiny
    rc = RolloutConfig(group_size=4, steps=4, window_size=2, window_hi=3, max_new_tokens=10)
    prompts, windows = ["a red circle", "two blue squares"], [0, 1]
    got = rollout_in_batches(model, tok, prompts, rc, batch=batch, generator=torch.Generator().manual_seed(5),
                             windows=windows)
    g = torch.Generator().manual_seed(5)   # the pieces by hand, in the documented order
    if batch == 2:
        import dataclasses
        piece = dataclasses.replace(rc, group_size=2)
        parts = [rollout(model, tok, [p], piece, generator=g, windows=[k]) for p, k in zip(prompts, windows)
                 for _ in range(2)]
    else:
        parts = [rollout(model, tok, prompts, rc, generator=g, windows=windows)]
    assert got.group_size == 4 and len(got.prompt_texts) == 8 and got.prompt_texts[3] == "a red circle"
    assert got.window_k0.tolist() == [0] * 4 + [1] * 4
    row = 0
    for part in parts:
        n = len(part.prompt_texts)
        for name in ("x_RW", "x_next_RW", "noise_RW", "logp_RW", "latents"):
            assert torch.equal(getattr(got, name)[row:row + n], getattr(part, name)), name
        T = part.reasoning.tokens_BT.shape[1]
        assert torch.equal(got.reasoning.tokens_BT[row:row + n, :T], part.reasoning.tokens_BT)
        assert torch.equal(got.reasoning.mask_BT[row:row + n, :T], part.reasoning.mask_BT)
        assert not got.reasoning.mask_BT[row:row + n, T:].any()
        row += n


def test_concat_pads_reasoning_to_the_longest(tiny):
    model, tok = tiny
    rc = RolloutConfig(group_size=2, steps=4, window_size=2, window_hi=3, max_new_tokens=10)
    g = torch.Generator().manual_seed(1)
    a = rollout(model, tok, ["x"], rc, generator=g, windows=[0])
    b = rollout(model, tok, ["y"], rc, generator=g, windows=[1])
    a.reasoning.tokens_BT, a.reasoning.logp_BT, a.reasoning.mask_BT = (t[:, :3] for t in
                                                                     (a.reasoning.tokens_BT, a.reasoning.logp_BT,
                                                                      a.reasoning.mask_BT))
    c = concat_trajectories([a, b], 2)
    T = b.reasoning.tokens_BT.shape[1]
    assert c.reasoning.tokens_BT.shape == (4, T) and c.reasoning.mask_BT[:2, 3:].sum() == 0
    assert c.reasoning.logp_BT[:2, 3:].abs().sum() == 0 and c.timing["rollout_text"] == pytest.approx(
        a.timing["rollout_text"] + b.timing["rollout_text"])


def test_optimizer_offloaded_frees_grads_and_restores_state():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1)
    lin(torch.randn(2, 4)).sum().backward()
    opt.step()
    before = {k: v.clone() for k, v in opt.state[lin.weight].items()}
    with optimizer_offloaded(opt):
        assert lin.weight.grad is None
        assert all(v.device.type == "cpu" for v in opt.state[lin.weight].values())
    for k, v in opt.state[lin.weight].items():
        assert torch.equal(v, before[k]), k
    lin(torch.randn(2, 4)).sum().backward()
    with optimizer_offloaded(opt, enabled=False):   # gradients are freed either way, the state stays
        assert lin.weight.grad is None and torch.equal(opt.state[lin.weight]["exp_avg"], before["exp_avg"])
    rng = np.random.default_rng(0)
    lin(torch.as_tensor(rng.normal(size=(2, 4)), dtype=torch.float32)).sum().backward()
    opt.step()   # the optimizer still works on the restored state
    assert int(opt.state[lin.weight]["step"]) == 2
