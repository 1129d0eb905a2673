"""Tests of the group-normalised advantages (unigrpo.rewards.advantages) against ALGORITHM.md §5.

Shape legend: B rows, G group size, P = B / G prompts.

Tolerances (float64 rewards):
| check                                  | atol / rtol          | why                                             |
|----------------------------------------|----------------------|-------------------------------------------------|
| per-group mean of A is 0               | 1e-12                | |A| <= 5 and G <= 26 terms: rounding ~1e-14     |
| per-group population std of A          | rtol 1e-9 vs σ/(σ+ε) | exact identity up to float64 rounding of σ      |
| "unit std" where σ >= 0.01             | 1e-2                 | std(A) = σ/(σ+1e-4), so |std − 1| <= 1e-4/σ      |
| constant group                         | exact 0              | enforced by the op, not left to rounding        |
"""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from unigrpo.rewards.advantages import group_advantages, group_has_signal

F64 = torch.float64
SETTINGS = settings(max_examples=60, deadline=None)


@SETTINGS
@given(G=st.integers(2, 26), P=st.integers(1, 4), data=st.data())
def test_zero_mean_unit_std_per_group(G, P, data):
    # G <= 26 so the clamp at 5 cannot bind: a population z-score satisfies |z| <= sqrt(G − 1) <= 5.
    values = data.draw(st.lists(st.floats(-10, 10, allow_nan=False), min_size=G * P, max_size=G * P))
    r = torch.tensor(values, dtype=F64)
    adv = group_advantages(r, G)
    assert adv.shape == r.shape and adv.dtype == F64
    assert bool((adv.abs() <= 5).all())
    for p in range(P):
        rg, ag = r[p * G:(p + 1) * G], adv[p * G:(p + 1) * G]
        sigma = rg.std(correction=0).item()
        if rg.max() == rg.min():
            assert bool((ag == 0).all())
            continue
        assert abs(ag.mean().item()) <= 1e-12
        assert ag.std(correction=0).item() == pytest.approx(sigma / (sigma + 1e-4), rel=1e-9)
        if sigma >= 0.01:
            assert abs(ag.std(correction=0).item() - 1) <= 1e-2
        # explicit formula for one row
        expected0 = (rg[0].item() - sum(rg.tolist()) / G) / (sigma + 1e-4)
        assert ag[0].item() == pytest.approx(expected0, rel=1e-9, abs=1e-12)


def test_constant_group_is_exactly_zero():
    # 0.1 repeated: its float mean is not exactly 0.1 for every G; the op must still give exactly 0.
    r = torch.tensor([0.1] * 7 + [1.0, 2.0, 3.0, 4.5, 5.0, 6.0, 7.0], dtype=torch.float32)
    for eps in (1e-4, 0.0):
        for scope in ("group", "batch"):
            adv = group_advantages(r, 7, scope=scope, eps=eps)
            assert bool((adv[:7] == 0).all()) and bool((adv[7:] != 0).all()), (eps, scope)
    assert adv.dtype == torch.float32
    assert group_has_signal(r, 7).tolist() == [False] * 7 + [True] * 7


def test_clamped_to_five():
    r = torch.zeros(64, dtype=F64)
    r[0] = 1.0                                           # z of the outlier = sqrt(63) ≈ 7.94 > 5
    adv = group_advantages(r, 64)
    assert adv[0].item() == 5.0
    sigma = math.sqrt(63) / 64
    assert adv[1].item() == pytest.approx(-(1 / 64) / (sigma + 1e-4), rel=1e-12)
    assert group_advantages(r, 64, clip=None)[0].item() == pytest.approx((63 / 64) / (sigma + 1e-4), rel=1e-12)
    assert group_advantages(r, 64, clip=2.0)[0].item() == 2.0


def test_batch_scope_uses_the_std_of_the_whole_batch():
    r = torch.tensor([0.0, 1.0, 0.0, 1.0, 10.0, 30.0, 20.0, 40.0], dtype=F64)
    adv = group_advantages(r, 4, scope="batch")
    batch_std = r.std(correction=0).item()
    means = [0.5, 25.0]
    expected = [(x - means[i // 4]) / (batch_std + 1e-4) for i, x in enumerate(r.tolist())]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=F64).clamp(-5, 5), atol=1e-14, rtol=1e-12)
    assert not torch.allclose(adv, group_advantages(r, 4))


def test_bad_sizes_and_options_raise():
    with pytest.raises(ValueError, match=r"B=10.*G=4"):
        group_advantages(torch.zeros(10), 4)
    with pytest.raises(ValueError, match=r"B=10.*G=4"):
        group_has_signal(torch.zeros(10), 4)
    with pytest.raises(ValueError, match="group_size=0"):
        group_advantages(torch.zeros(4), 0)
    with pytest.raises(ValueError, match="'prompt'"):
        group_advantages(torch.zeros(4), 2, scope="prompt")
    with pytest.raises(ValueError, match="rewards_B"):
        group_advantages(torch.zeros(2, 2), 2)


def test_integer_rewards_and_group_of_one():
    adv = group_advantages(torch.tensor([0, 1, 1, 1]), 2)
    assert adv.dtype == torch.float32 and adv[2:].tolist() == [0.0, 0.0]
    assert adv[0].item() == pytest.approx(-0.5 / (0.5 + 1e-4), rel=1e-6)
    assert group_advantages(torch.tensor([3.0, 4.0]), 1).tolist() == [0.0, 0.0]


# ------------------------------------------- issue 20: scale "none", sample std, grouping by prompt string
# Peers written here from their published formulas with numpy (independent of the library's torch code).
# Tolerance 1e-9 absolute: float64, |A| ≤ ~1e5 only when a group's std is tiny (then both sides divide the
# same centred values by the same std + 1e-4, agreeing to ~1e-12 relative); rewards are O(10).

import numpy as np  # noqa: E402

from unigrpo.rewards.advantages import prompt_group_ids  # noqa: E402


def _trl(rewards, G, scale_rewards):
    """TRL GRPOTrainer: mean over each group of G consecutive completions; std = torch.std (n − 1); "group":
    ÷ (group std + 1e-4), "batch": ÷ (std of all rewards + 1e-4), "none": centred only."""
    r = np.asarray(rewards, dtype=np.float64).reshape(-1, G)
    adv = r - r.mean(axis=1, keepdims=True)
    if scale_rewards == "group":
        adv = adv / (r.std(axis=1, ddof=1, keepdims=True) + 1e-4)
    elif scale_rewards == "batch":
        adv = adv / (r.std(ddof=1) + 1e-4)
    return adv.reshape(-1)


def _per_prompt_stat_tracker(prompts, rewards, global_std):
    """Flow-GRPO PerPromptStatTracker.update: for each unique prompt string, (r − mean_prompt) / (std + 1e-4),
    np.std (population) over that prompt's rewards, or over all rewards with global_std."""
    prompts, r = np.asarray(prompts), np.asarray(rewards, dtype=np.float64)
    adv = np.empty_like(r)
    for p in np.unique(prompts):
        sel = prompts == p
        std = np.std(r) if global_std else np.std(r[sel])
        adv[sel] = (r[sel] - np.mean(r[sel])) / (std + 1e-4)
    return adv


REWARD = st.floats(-10, 10, allow_nan=False).map(lambda x: round(x, 3))


@settings(max_examples=40, deadline=None)
@given(G=st.integers(2, 8), P=st.integers(1, 4), scale=st.sampled_from(["group", "batch", "none"]), data=st.data())
def test_scales_and_sample_std_against_trl_formula(G, P, scale, data):
    r = torch.tensor(data.draw(st.lists(REWARD, min_size=G * P, max_size=G * P)), dtype=F64)
    got = group_advantages(r, G, scope=scale, std="sample", clip=None)
    expected = torch.from_numpy(_trl(r.tolist(), G, scale))
    # the op pins constant groups to exactly 0; TRL gets 0 up to the rounding of the mean
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=0)


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 12), global_std=st.booleans(), data=st.data())
def test_grouping_by_prompt_against_per_prompt_stat_tracker(B, global_std, data):
    """Rows with equal prompt strings form one group wherever they sit (ragged group sizes, singletons)."""
    prompts = data.draw(st.lists(st.sampled_from(["a cat", "a dog", "two cats", "a cat "]), min_size=B, max_size=B))
    r = torch.tensor(data.draw(st.lists(REWARD, min_size=B, max_size=B)), dtype=F64)
    ids = prompt_group_ids(prompts)
    got = group_advantages(r, 1, scope="batch" if global_std else "group", clip=None, group_ids=ids)
    expected = torch.from_numpy(_per_prompt_stat_tracker(prompts, r.tolist(), global_std))
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=0)
    const = torch.tensor([len({float(x) for x, p in zip(r, prompts) if p == q}) == 1 for q in prompts])
    assert torch.equal(group_has_signal(r, 1, ids), ~const)
    assert bool((got[const] == 0).all())


@settings(max_examples=30, deadline=None)
@given(G=st.integers(1, 6), P=st.integers(1, 4), scale=st.sampled_from(["group", "batch"]), data=st.data())
def test_consecutive_ids_match_the_consecutive_rule(G, P, scale, data):
    """group_ids = row // G is the default grouping: same advantages (other summation order: 1e-12)."""
    r = torch.tensor(data.draw(st.lists(REWARD, min_size=G * P, max_size=G * P)), dtype=F64)
    ids = torch.arange(G * P) // G
    torch.testing.assert_close(group_advantages(r, G, scope=scale, group_ids=ids),
                               group_advantages(r, G, scope=scale), atol=1e-12, rtol=0)


def test_new_advantage_options_at_defaults_are_bitwise_unchanged():
    """The defaults reproduce the pre-issue-20 arithmetic op for op (written out here), torch.equal."""
    g = torch.Generator().manual_seed(0)
    r = torch.randn(24, generator=g) * 3
    r[6:12] = 1.5                                                          # one constant group
    r_PG = r.double().reshape(4, 6)
    centred = r_PG - r_PG.mean(dim=1, keepdim=True)
    const = r_PG.amax(dim=1, keepdim=True) == r_PG.amin(dim=1, keepdim=True)
    for scope, sd in (("group", r_PG.std(dim=1, correction=0, keepdim=True)), ("batch", r_PG.std(correction=0))):
        old = torch.where(const, 0.0, (centred / (sd + 1e-4)).clamp(-5.0, 5.0)).reshape(-1).float()
        assert torch.equal(group_advantages(r, 6, scope=scope), old)
        assert torch.equal(group_advantages(r, 6, scope=scope, std="population", group_ids=None), old)


def test_new_advantage_options_validation():
    r = torch.zeros(4)
    with pytest.raises(ValueError, match="std='unbiased'.*'population', 'sample'"):
        group_advantages(r, 2, std="unbiased")
    with pytest.raises(ValueError, match="scope='global'.*'none'"):
        group_advantages(r, 2, scope="global")
    with pytest.raises(ValueError, match=r"group_ids must be an integer tensor .*\[4\]"):
        group_advantages(r, 2, group_ids=torch.zeros(3, dtype=torch.long))
