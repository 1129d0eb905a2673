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
