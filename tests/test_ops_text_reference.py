"""Tests of the reference text ops (unigrpo_kernels.reference.text) against ALGORITHM.md §6. Expected values
are written out here (loops over tokens, explicit softmax) independently of the library code.

Shape legend: T tokens, H hidden, V vocabulary, B sequences, L padded length.

Tolerances (float64 unless stated):
| check                                   | atol / rtol       | why                                              |
|-----------------------------------------|-------------------|--------------------------------------------------|
| log-probs / entropy vs explicit softmax | 1e-12 / 1e-12     | O(10) logits, different op order: ~1e-15         |
| loss value vs per-token loops           | 1e-12 / 1e-10     | different summation order of O(1) terms          |
| on-policy gradient, analytic            | 1e-15 / 1e-12     | one division per token                           |
| bf16 inputs vs their fp32 cast          | exact             | the op casts up first, so the math is identical  |
| gradcheck (finite differences)          | torch defaults    | atol 1e-5, rtol 1e-3, central differences, 1e-6  |
"""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import unigrpo_kernels as K

F64 = torch.float64
SETTINGS = settings(max_examples=30, deadline=None)


# ---------------------------------------------------------------------------------- token_logprobs

def _lm(T=7, H=5, V=11, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, dtype=dtype, generator=g)
    weight = torch.randn(V, H, dtype=dtype, generator=g)
    targets = torch.randint(0, V, (T,), generator=g)
    return hidden, weight, targets


@pytest.mark.parametrize("tau", [1.0, 0.7, 2.0])
def test_token_logprobs_and_entropy_match_explicit_softmax(tau):
    hidden, weight, targets = _lm()
    logp, ent = K.token_logprobs(hidden, weight, targets, temperature=tau, return_entropy=True)
    assert logp.shape == ent.shape == (7,) and logp.dtype == F64
    for t in range(7):
        z = [sum(hidden[t, j].item() * weight[v, j].item() for j in range(5)) / tau for v in range(11)]
        zmax = max(z)
        p = [math.exp(zi - zmax) for zi in z]
        norm = sum(p)
        p = [pi / norm for pi in p]
        assert logp[t].item() == pytest.approx(math.log(p[targets[t]]), abs=1e-12, rel=1e-12)
        assert ent[t].item() == pytest.approx(-sum(pi * math.log(pi) for pi in p), abs=1e-12, rel=1e-12)
    torch.testing.assert_close(K.token_logprobs(hidden, weight, targets, temperature=tau), logp, atol=0, rtol=0)


def test_token_logprobs_dtypes():
    hidden, weight, targets = _lm(dtype=torch.float32)
    out_bf16 = K.token_logprobs(hidden.bfloat16(), weight.bfloat16(), targets)
    assert out_bf16.dtype == torch.float32
    torch.testing.assert_close(out_bf16, K.token_logprobs(hidden.bfloat16().float(), weight.bfloat16().float(),
                                                          targets), atol=0, rtol=0)


@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("tau", [1.0, 0.6])
def test_token_logprobs_gradcheck(entropy, tau):
    hidden, weight, targets = _lm(T=5, H=3, V=7, seed=1)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    fn = lambda h, w: K.token_logprobs(h, w, targets, temperature=tau, return_entropy=entropy)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight))


def test_token_logprobs_validation():
    hidden, weight, targets = _lm()
    with pytest.raises(ValueError, match=r"weight_VH .*H=5"):
        K.token_logprobs(hidden, weight[:, :4], targets)
    with pytest.raises(ValueError, match="targets_T"):
        K.token_logprobs(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="temperature=0"):
        K.token_logprobs(hidden, weight, targets, temperature=0.0)


# ---------------------------------------------------------------------------------- text_grpo_loss

def _reference_text_loss(logp, old, adv, mask, eps_lo, eps_hi, aggregation, ref=None, kl_coef=0.0,
                         max_len=None):
    """§6 written out with Python loops over real tokens (`_spec_loss` below, token ratios)."""
    loss, _ = _spec_loss(logp, old, adv, mask, eps_lo, eps_hi, aggregation, "token", ref, kl_coef, False, max_len)
    return torch.tensor(loss, dtype=F64)


def _text_batch(B=5, L=6, seed=0, kink_free=True):
    """Log-probs with log-ratios either well inside (|.| <= 0.1) or well outside (|.| >= 0.4) the default
    clip range [log 0.8, log 1.2] = [−0.22, 0.18]; row 3 fully masked; ragged lengths."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, L, dtype=F64, generator=g) * 3
    inside = (torch.rand(B, L, dtype=F64, generator=g) - 0.5) * 0.2
    outside = torch.sign(torch.randn(B, L, dtype=F64, generator=g)) * (0.4 + 0.2 * torch.rand(B, L, dtype=F64,
                                                                                                generator=g))
    pick = torch.rand(B, L, generator=g) < 0.5
    logp = old + torch.where(pick, outside, inside)
    ref = logp + 0.3 * torch.randn(B, L, dtype=F64, generator=g)
    lengths = torch.tensor([L, 2, L - 1, 0, 1][:B])
    mask = torch.arange(L)[None, :] < lengths[:, None]
    adv = torch.tensor([1.2, -0.7, 0.4, 0.9, -1.5][:B], dtype=F64)
    return logp, old, ref, adv, mask


AGGS = ["sequence", "token", "constant"]


@pytest.mark.parametrize("aggregation", AGGS)
@pytest.mark.parametrize("with_kl", [False, True])
def test_text_loss_value_and_finite_difference_gradient(aggregation, with_kl):
    logp, old, ref, adv, mask = _text_batch()
    max_len = 9 if aggregation == "constant" else None
    kw = dict(old_logp_BL=old, adv_B=adv, mask_BL=mask, aggregation=aggregation, max_len=max_len,
              ref_logp_BL=ref if with_kl else None, kl_coef=0.5 if with_kl else 0.0)
    loss, m = K.text_grpo_loss(logp_BL=logp, **kw)
    expected = _reference_text_loss(logp, old, adv, mask, 0.2, 0.2, aggregation, ref if with_kl else None,
                                    0.5 if with_kl else 0.0, max_len)
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=1e-10)
    assert loss.dim() == 0 and loss.dtype == F64
    if with_kl:
        torch.testing.assert_close(m["text/policy_loss"] + 0.5 * m["text/kl"], loss, atol=1e-14, rtol=0)
        assert m["text/kl"].item() > 0
    # 1e-6 finite-difference steps move a log-ratio by 1e-6; every token is >= 0.08 from a kink.
    x = logp.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda lp: K.text_grpo_loss(logp_BL=lp, **kw)[0], (x,))


def test_asymmetric_clip_and_gating():
    # one sequence per (log-ratio, A) case; eps_lo = 0.1, eps_hi = 0.3: log 1.22 is inside for hi = 0.3
    cases = [(0.2, 1.0, False), (0.4, 1.0, True), (0.4, -1.0, False), (-0.05, -1.0, False),
             (-0.2, -1.0, True), (-0.2, 1.0, False), (0.0, 1.0, False)]
    lr = torch.tensor([[c[0]] for c in cases], dtype=F64)
    adv = torch.tensor([c[1] for c in cases], dtype=F64)
    zero_expected = torch.tensor([c[2] for c in cases])
    old = torch.full_like(lr, -1.0)
    logp = (old + lr).requires_grad_(True)
    loss, m = K.text_grpo_loss(logp_BL=logp, old_logp_BL=old, adv_B=adv, mask_BL=torch.ones_like(lr, dtype=torch.bool),
                               eps_lo=0.1, eps_hi=0.3)
    (grad,) = torch.autograd.grad(loss, logp)
    assert bool((grad[zero_expected] == 0).all())
    assert bool((grad[~zero_expected] != 0).all())
    # unclipped tokens: d/dlogp of −ρA/(#seq) = −ρA/7
    torch.testing.assert_close(grad[~zero_expected, 0], -(lr.exp()[:, 0] * adv)[~zero_expected] / 7,
                               atol=1e-15, rtol=1e-12)
    assert m["text/clip_frac"].item() == pytest.approx(2 / 7)


@SETTINGS
@given(B=st.integers(1, 6), L=st.integers(1, 12), aggregation=st.sampled_from(AGGS), seed=st.integers(0, 2 ** 16))
def test_on_policy_ratio_is_exactly_one(B, L, aggregation, seed):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, L, dtype=F64, generator=g) * 5
    mask = torch.rand(B, L, generator=g) < 0.7
    adv = torch.randn(B, dtype=F64, generator=g)
    logp = old.clone().requires_grad_(True)
    loss, m = K.text_grpo_loss(logp_BL=logp, old_logp_BL=old, adv_B=adv, mask_BL=mask, aggregation=aggregation,
                               ref_logp_BL=old, kl_coef=0.1)
    if mask.any():
        assert m["text/ratio_mean"].item() == 1.0 and m["text/ratio_max"].item() == 1.0
        assert m["text/ratio_min"].item() == 1.0
    assert m["text/clip_frac"].item() == 0.0 and m["text/kl"].item() == 0.0
    (grad,) = torch.autograd.grad(loss, logp)
    n_B = mask.sum(1).to(F64)
    denom = {"sequence": n_B.clamp(min=1)[:, None] * max(int((n_B > 0).sum()), 1),
             "token": max(int(mask.sum()), 1), "constant": B * L}[aggregation]
    expected = torch.where(mask, -adv[:, None] / denom, torch.zeros((), dtype=F64))
    torch.testing.assert_close(grad, expected, atol=1e-15, rtol=1e-12)


@pytest.mark.parametrize("aggregation", AGGS)
def test_padding_never_counts(aggregation):
    logp, old, ref, adv, mask = _text_batch(seed=3)
    kw = dict(adv_B=adv, mask_BL=mask, aggregation=aggregation, kl_coef=0.2)
    base, m_base = K.text_grpo_loss(logp_BL=logp, old_logp_BL=old, ref_logp_BL=ref, **kw)
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e4, -1e4], dtype=F64)
    idx = torch.arange(mask.numel()).reshape(mask.shape)
    bad = lambda t, shift: torch.where(mask, t, garbage[(idx + shift) % 5])             # noqa: E731
    x = bad(logp, 0).requires_grad_(True)
    loss, m = K.text_grpo_loss(logp_BL=x, old_logp_BL=bad(old, 1), ref_logp_BL=bad(ref, 2), **kw)
    assert loss.item() == base.item()
    for name in m_base:
        assert m[name].item() == m_base[name].item(), name
    (grad,) = torch.autograd.grad(loss, x)
    assert bool(torch.isfinite(grad).all()) and bool((grad[~mask] == 0).all())


def test_empty_mask_gives_zero_loss():
    z = torch.zeros(2, 3, dtype=F64, requires_grad=True)
    for aggregation in AGGS:
        loss, _ = K.text_grpo_loss(logp_BL=z, old_logp_BL=z.detach(), adv_B=torch.ones(2, dtype=F64),
                                   mask_BL=torch.zeros(2, 3, dtype=torch.bool), aggregation=aggregation)
        assert loss.item() == 0.0


def test_text_loss_validation():
    z = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="'mean'"):
        K.text_grpo_loss(logp_BL=z, old_logp_BL=z, adv_B=torch.zeros(2), mask_BL=m, aggregation="mean")
    with pytest.raises(ValueError, match=r"old_logp_BL .*\[2, 4\]"):
        K.text_grpo_loss(logp_BL=z, old_logp_BL=torch.zeros(2, 4), adv_B=torch.zeros(2), mask_BL=m)
    with pytest.raises(ValueError, match=r"adv_B .*\[3\]"):
        K.text_grpo_loss(logp_BL=z, old_logp_BL=z, adv_B=torch.zeros(3), mask_BL=m)
    with pytest.raises(ValueError, match="ref_logp_BL"):
        K.text_grpo_loss(logp_BL=z, old_logp_BL=z, adv_B=torch.zeros(2), mask_BL=m, kl_coef=0.1)
    with pytest.raises(ValueError, match="max_len=2"):
        K.text_grpo_loss(logp_BL=z, old_logp_BL=z, adv_B=torch.zeros(2), mask_BL=m, aggregation="constant",
                         max_len=2)


# ---------------------------------------------- issue 20: GSPO sequence ratio, DAPO "global" aggregation
from hypothesis import assume  # noqa: E402

from unigrpo_kernels.reference import text as RT  # noqa: E402


def _case(B, L, lengths, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    old = torch.randn(B, L, dtype=torch.float64, generator=g) - 2.0
    logp = old + scale * torch.randn(B, L, dtype=torch.float64, generator=g)
    logp = torch.where(mask, logp, torch.full_like(logp, float("inf")))     # garbage in padding must not count
    adv = torch.randn(B, dtype=torch.float64, generator=g)
    return logp, old, mask, adv


def _gspo_peer(logp, old, mask, adv, eps_lo, eps_hi):
    """GSPO paper (Zheng et al. 2025, eq. 5–7): s_i = (π_θ(y_i)/π_old(y_i))^(1/|y_i|) = exp(mean_t log ratio),
    J = 1/G Σ_i min(s_i·A_i, clip(s_i, 1 − ε_lo, 1 + ε_hi)·A_i); rows without tokens (|y_i| = 0) left out."""
    terms = []
    for i in range(logp.shape[0]):
        n = int(mask[i].sum())
        if n == 0:
            continue
        lr = sum(float(logp[i, t]) - float(old[i, t]) for t in range(n)) / n
        s, a = math.exp(lr), float(adv[i])
        terms.append(min(s * a, min(max(s, 1 - eps_lo), 1 + eps_hi) * a))
    return -sum(terms) / len(terms) if terms else 0.0


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 5), L=st.integers(1, 7), seed=st.integers(0, 2**31 - 1), data=st.data(),
       eps=st.sampled_from([(3e-4, 4e-4), (0.0, 0.0), (0.2, 0.28), (0.05, 1e-3)]),
       scale=st.sampled_from([1e-4, 1e-3, 0.1]))
def test_gspo_sequence_ratio_against_paper_formula(B, L, seed, data, eps, scale):
    """ragged masks incl. empty rows, both clip sides; sequence ratios kept 1e-9 from each bound (assume: the
    clip decision is discontinuous there). Tolerance 1e-12: float64 means of ≤ 7 log-ratios of O(0.1)."""
    lengths = data.draw(st.lists(st.integers(0, L), min_size=B, max_size=B))
    logp, old, mask, adv = _case(B, L, lengths, seed, scale)
    n = mask.sum(1)
    s = torch.exp(torch.where(mask, logp - old, 0.0).sum(1) / n.clamp(min=1))[n > 0]
    assume(bool(((s - (1 + eps[1])).abs() > 1e-9).all() and ((s - (1 - eps[0])).abs() > 1e-9).all()))
    loss, m = RT.text_grpo_loss(logp_BL=logp, old_logp_BL=old, adv_B=adv, mask_BL=mask, eps_lo=eps[0],
                                eps_hi=eps[1], ratio_level="sequence")
    assert loss.item() == pytest.approx(_gspo_peer(logp, old, mask, adv, *eps), abs=1e-12)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("aggregation", ["sequence", "token", "global"])
def test_gspo_gradcheck(aggregation):
    """Finite differences (float64, torch defaults) through the sequence ratio; ratios inside the clip range."""
    logp, old, mask, adv = _case(4, 6, [6, 3, 0, 5], seed=3, scale=0.01)
    logp = torch.where(mask, logp, 0.0).requires_grad_(True)
    gt = 14.0 if aggregation == "global" else None
    assert torch.autograd.gradcheck(
        lambda lp: RT.text_grpo_loss(logp_BL=lp, old_logp_BL=old, adv_B=adv, mask_BL=mask, eps_lo=0.2, eps_hi=0.2,
                                     aggregation=aggregation, global_tokens=gt, ratio_level="sequence")[0], (logp,))


def _dapo_peer(logp, old, mask, adv, eps_lo, eps_hi, n_total):
    """DAPO (Yu et al. 2025, eq. 8): −1/Σ_i|o_i| · Σ_i Σ_t min(r_t·A_i, clip(r_t, 1 − ε_low, 1 + ε_high)·A_i),
    with Σ_i|o_i| the completion tokens of the whole sampled batch (n_total)."""
    tot = 0.0
    for i in range(logp.shape[0]):
        for t in range(int(mask[i].sum())):
            r, a = math.exp(float(logp[i, t]) - float(old[i, t])), float(adv[i])
            tot += min(r * a, min(max(r, 1 - eps_lo), 1 + eps_hi) * a)
    return -tot / n_total


@settings(max_examples=30, deadline=None)
@given(B=st.integers(2, 6), L=st.integers(1, 6), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_global_aggregation_against_dapo_formula_and_splits_add(B, L, seed, data):
    """"global" ÷ the batch's token count: the DAPO value on the whole batch, and the losses of any split into
    two mini-batches (same global_tokens) add up to it. Tolerance 1e-12: float64 sums of ≤ 36 O(1) terms."""
    lengths = data.draw(st.lists(st.integers(0, L), min_size=B, max_size=B))
    logp, old, mask, adv = _case(B, L, lengths, seed, scale=0.3)
    n = float(mask.sum()) + 5.0                    # the generation batch has rows beyond this one too
    kw = dict(eps_lo=0.2, eps_hi=0.28, aggregation="global", global_tokens=n)
    loss, _ = RT.text_grpo_loss(logp_BL=logp, old_logp_BL=old, adv_B=adv, mask_BL=mask, **kw)
    assert loss.item() == pytest.approx(_dapo_peer(logp, old, mask, adv, 0.2, 0.28, n), abs=1e-12)
    k = data.draw(st.integers(1, B - 1))
    parts = [RT.text_grpo_loss(logp_BL=logp[sl], old_logp_BL=old[sl], adv_B=adv[sl], mask_BL=mask[sl], **kw)[0]
             for sl in (slice(0, k), slice(k, B))]
    assert (parts[0] + parts[1]).item() == pytest.approx(loss.item(), abs=1e-12)


def test_loss_types_map_to_aggregations_and_defaults_unchanged():
    assert RT.LOSS_TYPES == {"grpo": ("sequence", "token"), "bnpo": ("token", "token"),
                             "dr_grpo": ("constant", "token"), "dapo": ("global", "token"),
                             "gspo": ("sequence", "sequence")}
    logp, old, mask, adv = _case(4, 6, [6, 3, 0, 5], seed=1, scale=0.3)
    for agg in ("sequence", "token", "constant"):
        a = RT.text_grpo_loss(logp_BL=logp.float(), old_logp_BL=old.float(), adv_B=adv.float(), mask_BL=mask,
                              aggregation=agg)
        b = RT.text_grpo_loss(logp_BL=logp.float(), old_logp_BL=old.float(), adv_B=adv.float(), mask_BL=mask,
                              aggregation=agg, ratio_level="token", global_tokens=None)
        assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    with pytest.raises(ValueError, match="global_tokens=None is needed by, and only by, aggregation='global'"):
        RT.text_grpo_loss(logp_BL=logp, old_logp_BL=old, adv_B=adv, mask_BL=mask, aggregation="global")
    with pytest.raises(ValueError, match="global_tokens=3.0 is needed by, and only by"):
        RT.text_grpo_loss(logp_BL=logp, old_logp_BL=old, adv_B=adv, mask_BL=mask, global_tokens=3.0)
    with pytest.raises(ValueError, match="'tok'"):
        RT.text_grpo_loss(logp_BL=logp, old_logp_BL=old, adv_B=adv, mask_BL=mask, ratio_level="tok")


# --------------------- issue 20: TRL's formula for every loss_type, the bias-corrected KL, the KL metric, bias

def _spec_loss(logp, old, adv, mask, eps_lo, eps_hi, aggregation, level, ref=None, kl_coef=0.0,
               bias_correction=False, max_len=None, global_tokens=None):
    """§6 with the issue-20 options, Python loops over real tokens (floats): returns (loss, kl_token_mean)."""
    B, L = logp.shape
    pol, kl, n_tok, n_seq = [], [], 0, 0
    for i in range(B):
        real = [t for t in range(L) if mask[i, t]]
        lr = [logp[i, t].item() - old[i, t].item() for t in real]
        seq = math.exp(sum(lr) / len(lr)) if real else 1.0
        terms, kls = [], []
        for t, x in zip(real, lr):
            rho = seq if level == "sequence" else math.exp(x)
            a = adv[i].item()
            terms.append(-min(rho * a, min(max(rho, 1 - eps_lo), 1 + eps_hi) * a))
            if ref is not None:
                d = ref[i, t].item() - logp[i, t].item()
                kls.append((math.exp(d) - d - 1) * (rho if bias_correction else 1.0))
        pol.append(terms)
        kl.append(kls)
        n_tok += len(terms)
        n_seq += len(terms) > 0

    def agg(rows):
        if aggregation == "sequence":
            return sum(sum(r) / len(r) for r in rows if r) / max(n_seq, 1)
        if aggregation == "token":
            return sum(sum(r) for r in rows) / max(n_tok, 1)
        if aggregation == "global":
            return sum(sum(r) for r in rows) / max(global_tokens, 1)
        return sum(sum(r) for r in rows) / (B * (max_len or L))

    loss = agg(pol) + (kl_coef * agg(kl) if ref is not None else 0.0)
    return loss, (sum(sum(r) for r in kl) / max(n_tok, 1) if ref is not None else None)


def _trl_peer_loss(logp, old, adv, mask, loss_type, eps_lo, eps_hi, ref=None, beta=0.0, bias_correction=False,
                   level="token", max_completion_length=None, num_items_in_batch=None):
    """TRL's GRPOTrainer._compute_loss written from its published formulas (one process, one accumulation step),
    with its mask-multiply style: per_token_loss = −min(coef_1·A, clamp(coef_1, 1−ε_lo, 1+ε_hi)·A) + β·kl,
    coef_1 = exp(log_importance_weights) (token: logp − old; sequence: Σ(lr·m)/clamp(Σm, 1), one per row),
    kl = k3 (× coef_1 with use_bias_correction_kl, not detached); loss_type picks the normaliser; the logged kl
    is the masked batch mean of kl. Returns (loss, mean_kl)."""
    m = mask.to(logp.dtype)
    log_ratio = logp - old
    if level == "sequence":
        log_w = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        log_w = log_ratio
    coef_1 = torch.exp(log_w)
    coef_2 = torch.clamp(coef_1, 1 - eps_lo, 1 + eps_hi)
    per_token_loss = -torch.min(coef_1 * adv[:, None], coef_2 * adv[:, None])
    mean_kl = None
    if ref is not None:
        per_token_kl = torch.exp(ref - logp) - (ref - logp) - 1
        if bias_correction:
            per_token_kl = per_token_kl * coef_1
        per_token_loss = per_token_loss + beta * per_token_kl
        mean_kl = (per_token_kl * m).sum() / m.sum().clamp(min=1.0)
    if loss_type == "grpo":
        loss = ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * m).sum() / m.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * m).sum() / (per_token_loss.size(0) * max_completion_length)
    else:   # dapo
        loss = (per_token_loss * m).sum() / num_items_in_batch
    return loss, mean_kl


def _ragged(B, L, seed, empty_row=True, spread=0.4):
    """float64 logp / old / ref / adv with ragged lengths (one row empty when asked), padding filled with +inf."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, L, dtype=F64, generator=g) * 3
    logp = old + spread * torch.randn(B, L, dtype=F64, generator=g)
    ref = logp + 0.3 * torch.randn(B, L, dtype=F64, generator=g)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    if empty_row and B > 1:
        lengths[B // 2] = 0
    mask = torch.arange(L)[None, :] < lengths[:, None]
    adv = torch.randn(B, dtype=F64, generator=g)
    pad = torch.tensor(float("inf"), dtype=F64)
    return torch.where(mask, logp, -pad), torch.where(mask, old, pad), torch.where(mask, ref, pad), adv, mask


def _away_from_kinks(logp, old, mask, level, eps_lo, eps_hi, gap):
    """True when every ratio the loss clips is at least `gap` from 1 − ε_lo and 1 + ε_hi (clip decisions are
    discontinuous there)."""
    lr = torch.where(mask, logp - old, torch.zeros((), dtype=F64))
    if level == "sequence":
        lr = torch.where(mask, (lr.sum(1) / mask.sum(1).clamp(min=1))[:, None], torch.zeros((), dtype=F64))
    r = lr.exp()[mask]
    return bool(((r - (1 + eps_hi)).abs() > gap).all() and ((r - (1 - eps_lo)).abs() > gap).all())


@settings(max_examples=80, deadline=None)
@given(B=st.integers(1, 6), L=st.integers(1, 10), seed=st.integers(0, 2 ** 16),
       aggregation=st.sampled_from(["sequence", "token", "constant", "global"]),
       level=st.sampled_from(["token", "sequence"]), bias_correction=st.booleans(), with_ref=st.booleans(),
       eps=st.sampled_from([(0.2, 0.2), (0.1, 0.3), (3e-4, 4e-4), (0.0, 0.0)]), empty_row=st.booleans())
def test_bias_corrected_kl_and_kl_metric_match_the_loop_spec(B, L, seed, aggregation, level, bias_correction,
                                                             with_ref, eps, empty_row):
    """The bias-corrected KL and "text/kl_token_mean" under every aggregation (incl. "global"), ratio level and
    clip range, on ragged masks with an empty row and ±inf padding, against `_spec_loss` (loops over real
    tokens): loss, "text/kl" / "text/kl_token_mean", and that padding gets exactly zero gradient.
    Tolerance 1e-12 abs / 1e-10 rel: float64, ≤ 60 O(1) terms summed in another order. Ratios within 1e-9 of a
    clip bound are skipped (assume): the clip decision is discontinuous there."""
    logp, old, ref, adv, mask = _ragged(B, L, seed, empty_row)
    assume(_away_from_kinks(logp, old, mask, level, *eps, 1e-9))
    n_glob = int(mask.sum()) + 7 if aggregation == "global" else None   # the other mini-batches' tokens
    kw = dict(old_logp_BL=old, adv_B=adv, mask_BL=mask, eps_lo=eps[0], eps_hi=eps[1], aggregation=aggregation,
              ratio_level=level, kl_bias_correction=bias_correction,
              ref_logp_BL=ref if with_ref else None, kl_coef=0.3 if with_ref else 0.0,
              max_len=L + 3 if aggregation == "constant" else None, global_tokens=n_glob)
    x = logp.clone().requires_grad_(True)
    loss, m = K.text_grpo_loss(logp_BL=x, **kw)
    exp_loss, exp_kl = _spec_loss(logp, old, adv, mask, eps[0], eps[1], aggregation, level,
                                  ref if with_ref else None, 0.3 if with_ref else 0.0, bias_correction, L + 3, n_glob)
    assert loss.item() == pytest.approx(exp_loss, abs=1e-12, rel=1e-10)
    if with_ref:
        assert m["text/kl_token_mean"].item() == pytest.approx(exp_kl, abs=1e-12, rel=1e-10)
        torch.testing.assert_close(m["text/policy_loss"] + 0.3 * m["text/kl"], loss, atol=1e-14, rtol=0)
    else:
        assert "text/kl_token_mean" not in m
    (grad,) = torch.autograd.grad(loss, x)
    assert bool(torch.isfinite(grad).all()) and bool((grad[~mask] == 0).all())


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "gspo"])
@pytest.mark.parametrize("bias_correction", [False, True])
def test_loss_types_against_trl_formula(loss_type, bias_correction):
    """LOSS_TYPES[loss_type] (+ GSPO's sequence level) gives TRL's loss, gradient and logged kl, computed by
    `_trl_peer_loss` from TRL's published formulas. No empty row here: TRL's "grpo" averages over all B rows
    (an empty row adds a 0), the project over the rows with tokens (tested in the loop-spec test above).
    "dapo": the batch is split into two mini-batches, each normalised by the whole batch's token count; their
    sum is TRL's dapo loss on the whole batch. Tolerance 1e-12 / 1e-10: float64, different op order."""
    B, L = 6, 9
    logp, old, ref, adv, mask = _ragged(B, L, seed=11, empty_row=False, spread=0.15)
    eps = (3e-4, 4e-4) if loss_type == "gspo" else (0.2, 0.28)
    agg, level = RT.LOSS_TYPES[loss_type]
    n_items = int(mask.sum())
    peer_type = "grpo" if loss_type == "gspo" else loss_type
    lp_peer = torch.where(mask, logp, 0.0).requires_grad_(True)          # TRL's padding holds finite values
    peer, peer_kl = _trl_peer_loss(lp_peer, torch.where(mask, old, 0.0), adv, mask, peer_type, *eps,
                                   ref=torch.where(mask, ref, 0.0), beta=0.04, bias_correction=bias_correction,
                                   level=level, max_completion_length=12, num_items_in_batch=n_items)
    (g_peer,) = torch.autograd.grad(peer, lp_peer)
    kw = dict(adv_B=adv, eps_lo=eps[0], eps_hi=eps[1], aggregation=agg, ratio_level=level,
              kl_bias_correction=bias_correction, kl_coef=0.04, max_len=12 if agg == "constant" else None)
    x = logp.clone().requires_grad_(True)
    parts = [slice(0, 2), slice(2, B)] if loss_type == "dapo" else [slice(0, B)]
    total, kls = 0.0, []
    for sl in parts:
        loss, m = K.text_grpo_loss(logp_BL=x[sl], old_logp_BL=old[sl], mask_BL=mask[sl], ref_logp_BL=ref[sl],
                                   **{**kw, "adv_B": adv[sl]}, global_tokens=n_items if agg == "global" else None)
        total = total + loss
        kls.append(m["text/kl_token_mean"])
    (grad,) = torch.autograd.grad(total, x)
    assert total.item() == pytest.approx(peer.item(), abs=1e-12, rel=1e-10)
    torch.testing.assert_close(torch.where(mask, grad, 0.0), torch.where(mask, g_peer, 0.0), atol=1e-13, rtol=1e-10)
    if len(parts) == 1:
        assert kls[0].item() == pytest.approx(peer_kl.item(), abs=1e-12, rel=1e-10)
    if loss_type == "gspo":                  # the case does clip some sequences (GSPO's ranges are tiny)
        assert 0 < m["text/clip_frac"].item() < 1
    if loss_type == "dapo":                  # dapo on the whole batch at once is bnpo's token mean
        bnpo, _ = K.text_grpo_loss(logp_BL=logp, old_logp_BL=old, mask_BL=mask, ref_logp_BL=ref,
                                   **{**kw, "aggregation": "token"})
        assert total.item() == pytest.approx(bnpo.item(), abs=1e-12, rel=1e-10)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("aggregation", ["sequence", "global"])
def test_bias_corrected_kl_gradcheck(level, aggregation):
    """Finite differences (torch defaults, float64) through the bias-corrected KL (its gradient through ρ or
    s_i included) with the sequence / global normalisers; every ratio ≥ 0.05 from a kink."""
    logp, old, ref, adv, mask = _ragged(5, 6, seed=5, spread=0.05)
    assert _away_from_kinks(logp, old, mask, level, 0.2, 0.2, 0.05)
    kw = dict(old_logp_BL=old, adv_B=adv, mask_BL=mask, ref_logp_BL=ref, kl_coef=0.5, kl_bias_correction=True,
              ratio_level=level, aggregation=aggregation,
              global_tokens=40 if aggregation == "global" else None)
    x = torch.where(mask, logp, 0.0).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda lp: K.text_grpo_loss(logp_BL=lp, **kw)[0], (x,))


def test_token_logprobs_with_bias_match_explicit_softmax_and_gradcheck():
    """bias_V (an lm_head bias) adds to the logits before τ: vs an explicit softmax of hW + b, and finite
    differences in hidden, weight and bias. Tolerance 1e-12 as for the unbiased case."""
    hidden, weight, targets = _lm()
    bias = torch.randn(11, dtype=F64, generator=torch.Generator().manual_seed(4))
    logp, ent = K.token_logprobs(hidden, weight, targets, temperature=0.7, return_entropy=True, bias_V=bias)
    z = (hidden @ weight.t() + bias) / 0.7
    torch.testing.assert_close(logp, torch.log_softmax(z, -1).gather(1, targets[:, None])[:, 0], atol=1e-12, rtol=1e-12)
    p = torch.softmax(z, -1)
    torch.testing.assert_close(ent, -(p * p.log()).sum(-1), atol=1e-12, rtol=1e-12)
    h, w, b = hidden[:4, :3].clone(), weight[:6, :3].clone(), bias[:6].clone()
    for t in (h, w, b):
        t.requires_grad_(True)
    tgt = targets[:4] % 6
    fn = lambda h, w, b: K.token_logprobs(h, w, tgt, temperature=0.7, return_entropy=True, bias_V=b)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h, w, b))
    with pytest.raises(ValueError, match=r"bias_V .*\[V=11\]"):
        K.token_logprobs(hidden, weight, targets, bias_V=bias[:5])
