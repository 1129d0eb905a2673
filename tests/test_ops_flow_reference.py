"""Tests of the reference flow ops (unigrpo_kernels.reference.flow) against ALGORITHM.md §2, §3, §7, §8,
plus the backend dispatch. The expected values are written out here from the formulas in ALGORITHM.md,
independently of the library code.

Shape legend: B rows, D latent elements per row, N denoising steps, M noise draws.

Tolerances (float64 unless stated):
| check                                  | atol / rtol             | why                                          |
|----------------------------------------|-------------------------|----------------------------------------------|
| μ, s vs the §3 expanded formula        | 1e-12 / 1e-12           | a dozen float64 ops on O(1..50) values       |
| log-prob vs the direct formula         | 1e-12 / 1e-12           | same formula, other op order; O(10) values   |
| sde_step empirical mean / std          | 5 standard errors       | s/√M and s/√(2M); fixed seed: deterministic  |
| two RatioNorm forms / log r derivation | 1e-12·(1 + |terms|)     | log r is a difference of two log-densities   |
|                                        |                         | of size |terms|: leaves ~1e-15·|terms|       |
| on-policy / gating gradients, analytic | 1e-14 / 1e-12           | one product chain in float64                 |
| loss value vs an independent rewrite   | 1e-12 / 1e-10           | other summation order of O(1) terms          |
| bf16 v vs its fp32 cast                | exact                   | the op casts up first: identical math        |
| gradcheck (finite differences)         | torch defaults (atol    | central differences, step 1e-6, float64      |
|                                        | 1e-5, rtol 1e-3)        |                                              |
"""
import logging
import math

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

import unigrpo_kernels as K
from unigrpo_kernels.reference import flow as F

F64 = torch.float64
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
SETTINGS = settings(max_examples=40, deadline=None)


# ------------------------------------------------------------------------ independent §3 formulas

def expected_sde(sigmas, k, eta, x, v):
    """μ and s of §3 written out literally (float64)."""
    sigma, sigma_next = float(sigmas[k]), float(sigmas[k + 1])
    h = sigma - sigma_next
    sigma_tilde = float(sigmas[1]) if sigma == 1.0 else sigma
    g = eta * math.sqrt(sigma / (1 - sigma_tilde))
    mu = x - h * (v + (g ** 2 / (2 * sigma)) * (x + (1 - sigma) * v))
    return mu, g * math.sqrt(h)


def expected_cps(sigmas, k, eta, x, v):
    sigma, sp = float(sigmas[k]), float(sigmas[k + 1])
    s = sp * math.sin(eta * math.pi / 2)
    mu = (1 - sp) * (x - sigma * v) + math.sqrt(max(sp ** 2 - s ** 2, 0.0)) * (x + (1 - sigma) * v)
    return mu, s


def direct_logprob(x_next, mu, s):
    """(1/D)·Σ_d [−(x'−μ)²/(2s²) − log s − ½ log 2π], one row at a time."""
    out = []
    for i in range(x_next.shape[0]):
        d = x_next[i].reshape(-1) - mu[i].reshape(-1)
        si = float(s[i])
        out.append(sum(-(dd.item() ** 2) / (2 * si * si) - math.log(si) - HALF_LOG_2PI for dd in d) / d.numel())
    return torch.tensor(out, dtype=F64)


# ------------------------------------------------------------------------------------ schedule

@SETTINGS
@given(n=st.integers(1, 200), shift=st.floats(0.05, 20.0))
def test_schedule_endpoints_and_monotone(n, shift):
    s = K.sigma_schedule(n, shift)
    assert s.shape == (n + 1,) and s.dtype == F64
    assert s[0].item() == 1.0 and s[-1].item() == 0.0          # exact: the σ̃ rule compares σ == 1
    assert bool((s[1:] < s[:-1]).all())
    k = n // 2
    u = 1 - k / n
    assert s[k].item() == pytest.approx(shift * u / (1 + (shift - 1) * u), rel=1e-14, abs=1e-15)


def test_schedule_shift_one_is_linear_and_bad_args_raise():
    torch.testing.assert_close(K.sigma_schedule(8, 1.0), 1 - torch.arange(9, dtype=F64) / 8, atol=1e-15, rtol=0)
    with pytest.raises(ValueError, match="num_steps=0"):
        K.sigma_schedule(0)
    with pytest.raises(ValueError, match="shift=-1"):
        K.sigma_schedule(10, -1.0)


# ------------------------------------------------------------------------------- coefficients

@pytest.mark.parametrize("kind", ["sde", "cps"])
@pytest.mark.parametrize("n", [1, 4, 25])
@pytest.mark.parametrize("eta", [0.0, 0.3, 0.8, 1.0])
def test_affine_mean_matches_expanded_formula(kind, n, eta):
    g = torch.Generator().manual_seed(n * 10 + int(eta * 10))
    sigmas = K.sigma_schedule(n, 3.0)
    x = torch.randn(3, 17, dtype=F64, generator=g)
    v = torch.randn(3, 17, dtype=F64, generator=g)
    expected = expected_sde if kind == "sde" else expected_cps
    for k in range(n):
        c = K.step_coeffs(sigmas, k, eta, kind)
        mu_exp, s_exp = expected(sigmas, k, eta, x, v)
        mu = F.step_mean(x, v, torch.full((3,), c.a, dtype=F64), torch.full((3,), c.b, dtype=F64))
        torch.testing.assert_close(mu, mu_exp, atol=1e-12, rtol=1e-12)
        assert c.std == pytest.approx(s_exp, rel=1e-12, abs=1e-12)
        assert c.h == float(sigmas[k]) - float(sigmas[k + 1]) and c.h > 0
        if eta == 0.0:                              # η = 0 is the Euler step for both kinds
            assert c.a == pytest.approx(1.0, abs=1e-15) and c.b == pytest.approx(-c.h, abs=1e-15) and c.std == 0.0


def test_sigma_tilde_rule_at_first_step():
    sigmas = K.sigma_schedule(25, 3.0)
    c = K.step_coeffs(sigmas, 0, 0.8)
    g2 = 0.64 * 1.0 / (1 - float(sigmas[1]))                   # σ̃ = σ_1 at σ = 1
    assert math.isfinite(c.std) and c.std == pytest.approx(math.sqrt(g2 * c.h), rel=1e-13)
    assert c.b == pytest.approx(-c.h, rel=1e-13)                # (1 − σ) = 0 kills the g² term of b


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_batch_coeffs_equal_scalar_coeffs(kind):
    sigmas = K.sigma_schedule(10, 3.0)
    k_B = torch.tensor([0, 3, 9, 3, 5])
    eta_B = torch.tensor([0.8, 0.0, 0.5, 1.0, 0.8], dtype=F64)
    got = K.step_coeffs_batch(sigmas, k_B, eta_B, kind)
    for i in range(5):
        c = K.step_coeffs(sigmas, int(k_B[i]), float(eta_B[i]), kind)
        for name in ("sigma", "sigma_next", "h", "a", "b", "std"):
            assert got[name][i].item() == getattr(c, name), (name, i)
    got2 = K.step_coeffs_batch(sigmas, k_B, 0.8, kind)
    assert got2["std"][0].item() == K.step_coeffs(sigmas, 0, 0.8, kind).std


def test_coeff_validation():
    sigmas = K.sigma_schedule(5)
    with pytest.raises(ValueError, match="'ode'"):
        K.step_coeffs(sigmas, 0, 0.8, "ode")
    with pytest.raises(ValueError, match="k=5"):
        K.step_coeffs(sigmas, 5, 0.8)
    with pytest.raises(ValueError, match="eta=-0.1"):
        K.step_coeffs(sigmas, 0, -0.1)
    with pytest.raises(ValueError, match="eta=1.5"):
        K.step_coeffs(sigmas, 0, 1.5, "cps")
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        K.step_coeffs_batch(sigmas, torch.tensor([0, 7]), 0.8)
    with pytest.raises(ValueError, match="eta"):
        K.step_coeffs_batch(sigmas, torch.tensor([0, 1]), torch.tensor([0.8, 0.8, 0.8]))


# ------------------------------------------------------------------------------------- sde_step

def _rows_at_steps(n, k_list, eta, kind="sde"):
    sigmas = K.sigma_schedule(n, 3.0)
    return sigmas, K.step_coeffs_batch(sigmas, torch.tensor(k_list), eta, kind)


def test_sde_step_empirical_mean_and_std():
    g = torch.Generator().manual_seed(0)
    sigmas, c = _rows_at_steps(25, [0, 2, 10, 23], 0.8)
    B, D, M = 4, 8, 20000
    x = torch.randn(B, D, dtype=F64, generator=g)
    v = torch.randn(B, D, dtype=F64, generator=g)
    rep = lambda t: t.repeat_interleave(M, dim=0)                       # noqa: E731  [B·M, ...]
    noise = torch.randn(B * M, D, dtype=F64, generator=g)
    x_next, _ = K.sde_step(rep(x), rep(v), a_B=rep(c["a"]), b_B=rep(c["b"]), std_B=rep(c["std"]), noise_BD=noise)
    x_next_BMD = x_next.reshape(B, M, D)
    for i, k in enumerate([0, 2, 10, 23]):
        mu_exp, s_exp = expected_sde(sigmas, k, 0.8, x[i], v[i])
        se_mean = s_exp / math.sqrt(M)
        se_std = s_exp / math.sqrt(2 * M)
        assert (x_next_BMD[i].mean(0) - mu_exp).abs().max() < 5 * se_mean
        assert (x_next_BMD[i].std(0) - s_exp).abs().max() < 5 * se_std


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_sde_step_logprob_equals_direct_formula(kind):
    g = torch.Generator().manual_seed(1)
    k_list = [0, 1, 7, 11]
    sigmas, c = _rows_at_steps(13, k_list, 0.7, kind)
    x = torch.randn(4, 2, 3, 5, dtype=F64, generator=g)                # any [B, ...] shape
    v = torch.randn(4, 2, 3, 5, dtype=F64, generator=g)
    xi = torch.randn(4, 2, 3, 5, dtype=F64, generator=g)
    x_next, logp, mean = K.sde_step(x, v, a_B=c["a"], b_B=c["b"], std_B=c["std"], noise_BD=xi, return_mean=True)
    assert x_next.shape == x.shape and mean.shape == x.shape and logp.shape == (4,)
    expected = expected_sde if kind == "sde" else expected_cps
    mus, ss = zip(*[expected(sigmas, k, 0.7, x[i], v[i]) for i, k in enumerate(k_list)])
    mu_exp, s_exp = torch.stack(mus), torch.tensor(ss, dtype=F64)
    torch.testing.assert_close(mean, mu_exp, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(x_next, mu_exp + s_exp[:, None, None, None] * xi, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(logp, direct_logprob(x_next, mu_exp, s_exp), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(K.gaussian_logprob(x_next, mean, c["std"]), logp, atol=0, rtol=0)


def test_sde_step_float32_even_for_bf16_velocity():
    g = torch.Generator().manual_seed(2)
    _, c = _rows_at_steps(25, [0, 1, 2], 0.8)
    x = torch.randn(3, 64, generator=g)
    v = torch.randn(3, 64, generator=g).to(torch.bfloat16)
    xi = torch.randn(3, 64, generator=g)
    a, b, s = (c[n].float() for n in ("a", "b", "std"))
    x_next, logp, mean = K.sde_step(x, v, a_B=a, b_B=b, std_B=s, noise_BD=xi, return_mean=True)
    assert x_next.dtype == logp.dtype == mean.dtype == torch.float32
    ref_next, ref_logp = K.sde_step(x, v.float(), a_B=a, b_B=b, std_B=s, noise_BD=xi)   # cast up, same math
    torch.testing.assert_close(x_next, ref_next, atol=0, rtol=0)
    torch.testing.assert_close(logp, ref_logp, atol=0, rtol=0)


def test_per_row_scalars_accept_numbers_and_0dim_tensors():
    g = torch.Generator().manual_seed(4)
    x, v, xi = (torch.randn(3, 5, dtype=F64, generator=g) for _ in range(3))
    c = K.step_coeffs(K.sigma_schedule(10), 2, 0.8)
    full = lambda val: torch.full((3,), val, dtype=F64)                 # noqa: E731
    want = K.sde_step(x, v, a_B=full(c.a), b_B=full(c.b), std_B=full(c.std), noise_BD=xi)
    for conv in (float, lambda val: torch.tensor(val, dtype=F64)):
        got = K.sde_step(x, v, a_B=conv(c.a), b_B=conv(c.b), std_B=conv(c.std), noise_BD=xi)
        for gt, wt in zip(got, want):
            torch.testing.assert_close(gt, wt, atol=0, rtol=0)


def test_ode_step_and_zero_std():
    g = torch.Generator().manual_seed(3)
    sigmas, c = _rows_at_steps(10, [0, 4, 9], 0.0)
    x = torch.randn(3, 6, dtype=F64, generator=g)
    v = torch.randn(3, 6, dtype=F64, generator=g)
    out = K.ode_step(x, v, c["h"])
    torch.testing.assert_close(out, x - c["h"][:, None] * v, atol=0, rtol=0)
    x_next, logp = K.sde_step(x, v, a_B=c["a"], b_B=c["b"], std_B=c["std"], noise_BD=torch.randn(3, 6, dtype=F64))
    torch.testing.assert_close(x_next, out, atol=1e-15, rtol=0)         # η = 0: the SDE step is the Euler step
    assert bool(torch.isnan(logp).all())                                # log-prob undefined (documented)
    assert K.ode_step(x.float(), v.to(torch.bfloat16), 0.1).dtype == torch.float32


def test_step_validation():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"v_BD .*\[2, 4\]"):
        K.sde_step(x, torch.zeros(2, 4), a_B=1.0, b_B=-0.1, std_B=0.1, noise_BD=x)
    with pytest.raises(ValueError, match=r"a_B .*\[3\]"):
        K.sde_step(x, x, a_B=torch.ones(3), b_B=-0.1, std_B=0.1, noise_BD=x)


# --------------------------------------------------------------------- RatioNorm and the flow loss

def _window_rows(B, D, n, kind, eta, seed):
    """Random window rows (float64): x, ξ, v_old, per-row coefficients at random steps."""
    g = torch.Generator().manual_seed(seed)
    k_max = n - 1 if kind == "sde" else n - 2      # cps has s = 0 at the last step
    k_B = torch.randint(0, k_max + 1, (B,), generator=g)
    c = K.step_coeffs_batch(K.sigma_schedule(n, 3.0), k_B, eta, kind)
    x = torch.randn(B, D, dtype=F64, generator=g)
    xi = torch.randn(B, D, dtype=F64, generator=g)
    v_old = torch.randn(B, D, dtype=F64, generator=g)
    return g, c, x, xi, v_old


@SETTINGS
@given(B=st.integers(1, 5), D=st.integers(1, 40), n=st.integers(2, 30), kind=st.sampled_from(["sde", "cps"]),
       eta=st.floats(0.1, 1.0), scale=st.floats(1e-3, 2.0), seed=st.integers(0, 2 ** 16))
def test_ratio_norm_forms_agree(B, D, n, kind, eta, scale, seed):
    g, c, x, xi, v_old = _window_rows(B, D, n, kind, eta, seed)
    v = v_old + scale * torch.randn(B, D, dtype=F64, generator=g)
    a, b, s = c["a"], c["b"], c["std"]
    mu_old = a[:, None] * x + b[:, None] * v_old
    mu_th = a[:, None] * x + b[:, None] * v
    x_next = mu_old + s[:, None] * xi
    lp_th = K.gaussian_logprob(x_next, mu_th, s)
    lp_old = K.gaussian_logprob(x_next, mu_old, s)
    log_r = lp_th - lp_old
    dmu = mu_th - mu_old
    bias = (dmu ** 2).mean(1) / (2 * s ** 2)
    terms = lp_th.abs() + lp_old.abs() + bias                            # sizes that cancel in log r
    tol = 1e-12 * (1 + terms)
    got_hat = K.flow_log_ratio(v_BD=v, xi_BD=xi, v_old_BD=v_old, b_B=b, std_B=s, ratio_norm=True)
    got_plain = K.flow_log_ratio(v_BD=v, xi_BD=xi, v_old_BD=v_old, b_B=b, std_B=s, ratio_norm=False)
    assert bool(((s * (log_r + bias) - got_hat).abs() <= tol * s).all())      # §7: s·(log r + bias)
    assert bool(((got_hat - (xi * dmu).mean(1)).abs() <= 1e-13 * (1 + (xi * dmu).abs().mean(1))).all())
    assert bool(((got_plain - log_r).abs() <= tol).all())                     # log r̂/s − bias = log r


def _on_policy_grad(v, xi, v_ref, adv, b, s, h, beta, reg, ratio_norm, grad_reweight):
    """Analytic gradient of the loss at v = v_old (r = 1, clip inactive), from §7/§8 by hand."""
    R, D = v.shape
    w = 1 / h if grad_reweight else torch.ones_like(h)
    dlogr = b[:, None] * xi / D * (1.0 if ratio_norm else 1 / s[:, None])
    g = -(adv * w)[:, None] * dlogr / R
    reg_w = {"mse": torch.ones_like(b), "latent_kl": b ** 2 / (2 * s ** 2), "none": torch.zeros_like(b)}[reg]
    return g + beta * reg_w[:, None] * 2 * (v - v_ref) / (D * R)


@SETTINGS
@given(B=st.integers(1, 6), D=st.integers(1, 33), n=st.integers(2, 25), kind=st.sampled_from(["sde", "cps"]),
       ratio_norm=st.booleans(), grad_reweight=st.booleans(), reg=st.sampled_from(["mse", "latent_kl", "none"]),
       clip_eps=st.sampled_from([0.0, 1e-6, 0.2]), seed=st.integers(0, 2 ** 16))
def test_on_policy_ratio_is_one_and_gradient_is_clip_free(B, D, n, kind, ratio_norm, grad_reweight, reg,
                                                          clip_eps, seed):
    g, c, _, xi, v_old = _window_rows(B, D, n, kind, 0.8, seed)
    v_ref = v_old + 0.3 * torch.randn(B, D, dtype=F64, generator=g)
    adv = torch.randn(B, dtype=F64, generator=g)
    v = v_old.clone().requires_grad_(True)
    kw = dict(xi_BD=xi, v_old_BD=v_old, v_ref_BD=v_ref, adv_B=adv, b_B=c["b"], std_B=c["std"], h_B=c["h"],
              clip_eps=clip_eps, beta=0.3, reg=reg, ratio_norm=ratio_norm, grad_reweight=grad_reweight)
    loss, m = K.flow_grpo_loss(v_BD=v, **kw)
    assert m["flow/log_ratio_abs_max"].item() == 0.0                    # exactly: Δμ = b·0 = 0
    assert m["flow/ratio_mean"].item() == 1.0 and m["flow/clip_frac"].item() == 0.0
    (grad,) = torch.autograd.grad(loss, v)
    expected = _on_policy_grad(v_old, xi, v_ref, adv, c["b"], c["std"], c["h"], 0.3, reg, ratio_norm, grad_reweight)
    torch.testing.assert_close(grad, expected, atol=1e-14, rtol=1e-12)


def _rows_with_log_ratio(target_B, ratio_norm, D=6, seed=0):
    """Rows whose log-ratio equals target_B exactly (up to rounding): v = v_old + c·u, u = ξ + z, z ⟂ ξ,
    mean_D ξ² = 1. log r̂ = y·s with y = c·b/s; log r = y − y²·mean(u²)/2 (take the root nearer 0)."""
    g = torch.Generator().manual_seed(seed)
    B = target_B.numel()
    c = K.step_coeffs_batch(K.sigma_schedule(25, 3.0), torch.randint(0, 24, (B,), generator=g), 0.8)
    b, s = c["b"], c["std"]
    xi = torch.randn(B, D, dtype=F64, generator=g)
    xi = xi / xi.pow(2).mean(1, keepdim=True).sqrt()
    z = torch.randn(B, D, dtype=F64, generator=g)
    z = 0.2 * (z - (z * xi).mean(1, keepdim=True) * xi)
    u = xi + z
    mu2 = u.pow(2).mean(1)
    if ratio_norm:
        coef = target_B / b
    else:
        y = (1 - torch.sqrt(1 - 2 * mu2 * target_B)) / mu2
        coef = y * s / b
    v_old = torch.randn(B, D, dtype=F64, generator=g)
    v = v_old + coef[:, None] * u
    got = K.flow_log_ratio(v_BD=v, xi_BD=xi, v_old_BD=v_old, b_B=b, std_B=s, ratio_norm=ratio_norm)
    torch.testing.assert_close(got, target_B, atol=1e-12, rtol=0)       # the construction is right
    return dict(v=v, xi=xi, v_old=v_old, b=b, s=s, h=c["h"], g=g)


@pytest.mark.parametrize("ratio_norm", [True, False])
@pytest.mark.parametrize("grad_reweight", [False, True])
@pytest.mark.parametrize("eps", [0.2, 1e-6])
def test_clip_gating(ratio_norm, grad_reweight, eps):
    # Targets in log space: outside (±2ε) and well inside (±ε/20) of the clip range, for A > 0 and A < 0.
    lr = [2 * eps, eps / 20, -2 * eps, -eps / 20]
    target = torch.tensor(lr + lr, dtype=F64)
    adv = torch.tensor([1.0] * 4 + [-1.0] * 4, dtype=F64)
    ratio = target.exp()
    zero_expected = ((adv > 0) & (ratio > 1 + eps)) | ((adv < 0) & (ratio < 1 - eps))
    assert zero_expected.tolist() == [True, False, False, False, False, False, True, False]
    r = _rows_with_log_ratio(target, ratio_norm)
    v = r["v"].clone().requires_grad_(True)
    loss, m = K.flow_grpo_loss(v_BD=v, xi_BD=r["xi"], v_old_BD=r["v_old"], v_ref_BD=r["v_old"], adv_B=adv,
                               b_B=r["b"], std_B=r["s"], h_B=r["h"], clip_eps=eps, beta=0.0, reg="none",
                               ratio_norm=ratio_norm, grad_reweight=grad_reweight)
    (grad,) = torch.autograd.grad(loss, v)
    assert bool((grad[zero_expected] == 0).all())
    assert bool((grad[~zero_expected].abs().amax(1) > 0).all())
    assert m["flow/clip_frac"].item() == pytest.approx(2 / 8)


def _reference_flow_loss(v, xi, v_old, v_ref, adv, b, s, h, eps, beta, reg, ratio_norm, grad_reweight):
    """§7/§8 written out per row, with log r from two explicit Gaussian log-densities."""
    R, D = v.shape
    total_pg, total_reg = 0.0, 0.0
    for i in range(R):
        dmu = b[i] * (v[i] - v_old[i])
        if ratio_norm:
            log_r = (xi[i] * dmu).sum() / D
        else:
            x_next_minus_mu_old = s[i] * xi[i]
            lp = lambda diff: (-(diff ** 2) / (2 * s[i] ** 2) - torch.log(s[i]) - HALF_LOG_2PI).sum() / D  # noqa
            log_r = lp(x_next_minus_mu_old - dmu) - lp(x_next_minus_mu_old)
        r = torch.exp(log_r)
        w = 1 / h[i] if grad_reweight else 1.0
        total_pg = total_pg + min(r * adv[i], r.clamp(1 - eps, 1 + eps) * adv[i]) * w
        mse = ((v[i] - v_ref[i]) ** 2).sum() / D
        total_reg = total_reg + {"mse": mse, "latent_kl": b[i] ** 2 / (2 * s[i] ** 2) * mse, "none": 0.0}[reg]
    return -total_pg / R + beta * total_reg / R


OPTIONS = [(rn, gr, reg) for rn in (True, False) for gr in (False, True) for reg in ("mse", "latent_kl", "none")]


@pytest.mark.parametrize("ratio_norm,grad_reweight,reg", OPTIONS)
def test_flow_loss_value_and_finite_difference_gradient(ratio_norm, grad_reweight, reg):
    eps = 0.2
    # log-ratio targets: inside (|.| <= 0.05) or outside (|.| >= 0.4) of [log 0.8, log 1.2] = [−0.22, 0.18];
    # gradcheck's 1e-6 steps move a row's log-ratio by ~1e-7, far from the kinks, where the loss is smooth.
    target = torch.tensor([0.05, -0.03, 0.4, -0.5, 0.0, 0.35, -0.4, 0.02], dtype=F64)
    adv = torch.tensor([1.3, -0.7, 0.9, -1.1, 0.5, -0.8, 1.2, -1.5], dtype=F64)
    r = _rows_with_log_ratio(target, ratio_norm, D=5, seed=7)
    v_ref = r["v_old"] + 0.5 * torch.randn(r["v"].shape, dtype=F64, generator=r["g"])
    beta = 0.7          # large so that a wrong regulariser gradient exceeds gradcheck's tolerance
    kw = dict(xi_BD=r["xi"], v_old_BD=r["v_old"], v_ref_BD=v_ref, adv_B=adv, b_B=r["b"], std_B=r["s"],
              h_B=r["h"], clip_eps=eps, beta=beta, reg=reg, ratio_norm=ratio_norm, grad_reweight=grad_reweight)
    loss, m = K.flow_grpo_loss(v_BD=r["v"], **kw)
    expected = _reference_flow_loss(r["v"], r["xi"], r["v_old"], v_ref, adv, r["b"], r["s"], r["h"], eps, beta,
                                    reg, ratio_norm, grad_reweight)
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=1e-10)
    assert loss.dtype == F64 and loss.dim() == 0
    torch.testing.assert_close(m["flow/velocity_mse"], ((r["v"] - v_ref) ** 2).mean(), atol=1e-14, rtol=1e-12)
    v = r["v"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda vv: K.flow_grpo_loss(v_BD=vv, **kw)[0], (v,))


@pytest.mark.parametrize("ratio_norm,grad_reweight,reg", OPTIONS)
@pytest.mark.parametrize("flow_weight", [0.0, 0.37, 1.0, 2.5])
def test_flow_weight_scales_only_the_policy_term(ratio_norm, grad_reweight, reg, flow_weight):
    """flow_grpo_loss(flow_weight=λ, beta=β) = λ·L_flow + β·L_reg (§9) in value and gradient, float64: λ times
    the loss without regulariser (λ = 1, β = 0) plus the regulariser alone (λ = 0, β); the policy metric is
    L_flow itself, unweighted. Tolerance 1e-12: float64 sums of a few terms of order 1."""
    target = torch.tensor([0.05, -0.03, 0.4, -0.5, 0.0, 0.35], dtype=F64)
    adv = torch.tensor([1.3, -0.7, 0.9, -1.1, 0.5, -0.8], dtype=F64)
    r = _rows_with_log_ratio(target, ratio_norm, D=5, seed=11)
    v_ref = r["v_old"] + 0.5 * torch.randn(r["v"].shape, dtype=F64, generator=r["g"])
    kw = dict(xi_BD=r["xi"], v_old_BD=r["v_old"], v_ref_BD=v_ref, adv_B=adv, b_B=r["b"], std_B=r["s"],
              h_B=r["h"], clip_eps=0.2, reg=reg, ratio_norm=ratio_norm, grad_reweight=grad_reweight)

    def value_and_grad(**opts):
        v = r["v"].clone().requires_grad_(True)
        loss, m = K.flow_grpo_loss(v_BD=v, **kw, **opts)
        loss.backward()
        return loss.detach(), v.grad, m

    loss, grad, m = value_and_grad(flow_weight=flow_weight, beta=0.7)
    policy, g_policy, m1 = value_and_grad(flow_weight=1.0, beta=0.0)
    reg_only, g_reg, _ = value_and_grad(flow_weight=0.0, beta=0.7)
    torch.testing.assert_close(loss, flow_weight * policy + reg_only, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad, flow_weight * g_policy + g_reg, atol=1e-12, rtol=0)
    assert m["flow/policy_loss"] == m1["flow/policy_loss"]
    with pytest.raises(ValueError, match="flow_weight=-1"):
        K.flow_grpo_loss(v_BD=r["v"], **kw, flow_weight=-1.0)


def test_flow_loss_differentiable_in_v_only_and_float32_metrics():
    g = torch.Generator().manual_seed(5)
    B, D = 4, 16
    c = K.step_coeffs_batch(K.sigma_schedule(25), torch.tensor([0, 1, 2, 1]), 0.8)
    tensors = [torch.randn(B, D, generator=g).requires_grad_(True) for _ in range(4)]
    v, xi, v_old, v_ref = tensors
    loss, m = K.flow_grpo_loss(v_BD=v.to(torch.bfloat16), xi_BD=xi, v_old_BD=v_old, v_ref_BD=v_ref,
                               adv_B=torch.randn(B), b_B=c["b"].float(), std_B=c["std"].float(), h_B=c["h"].float())
    assert loss.dtype == torch.float32
    loss.backward()
    assert v.grad is not None and all(t.grad is None for t in (xi, v_old, v_ref))
    for name in ("flow/ratio_mean", "flow/ratio_max", "flow/clip_frac", "flow/log_ratio_abs_max",
                 "flow/velocity_mse", "flow/policy_loss", "flow/reg"):
        assert name in m and not m[name].requires_grad and m[name].dim() == 0


def test_flow_loss_validation():
    z = torch.zeros(3, 4)
    kw = dict(xi_BD=z, v_old_BD=z, v_ref_BD=z, adv_B=torch.zeros(3), b_B=-0.1, std_B=0.5, h_B=0.1)
    with pytest.raises(ValueError, match="'kl'"):
        K.flow_grpo_loss(v_BD=z, reg="kl", **kw)
    with pytest.raises(ValueError, match=r"xi_BD .*\[3, 5\]"):
        K.flow_grpo_loss(v_BD=z, **{**kw, "xi_BD": torch.zeros(3, 5)})
    with pytest.raises(ValueError, match=r"adv_B .*\[2\]"):
        K.flow_grpo_loss(v_BD=z, **{**kw, "adv_B": torch.zeros(2)})


# ----------------------------------------------------------------------------------------- dispatch

def test_resolve_backend(caplog, monkeypatch):
    from unigrpo_kernels import dispatch
    monkeypatch.setattr(dispatch, "_logged", set())
    with caplog.at_level(logging.INFO, logger="unigrpo_kernels.dispatch"):
        assert K.resolve_backend("auto", "cpu") == "torch"
        assert K.resolve_backend("torch") == "torch"
        assert K.resolve_backend("auto", "cpu") == "torch"
    assert sum("'auto'" in r.getMessage() and "-> torch" in r.getMessage() for r in caplog.records) == 1
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"'cuda' is not available on device cpu"):
            K.resolve_backend("cuda", "cpu", op="sde_step")
        # the interpreter is usable when asked for by name, never picked by "auto"
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match=r"'triton'.*available: torch.*TRITON_INTERPRET=1"):
            K.resolve_backend("triton", "cpu")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert K.resolve_backend("auto", "cpu", op="flow_grpo_loss") == "torch"
    with pytest.raises(ValueError, match="op token_logprobs has no 'cuda' backend; it has torch, triton"):
        K.resolve_backend("cuda", op="token_logprobs")
    with pytest.raises(ValueError, match="unknown op 'flow'"):
        K.resolve_backend("auto", op="flow")
    with pytest.raises(ValueError, match="'jax'"):
        K.resolve_backend("jax")


# ------------------------------------------------ issue 20: asymmetric flow clip, Flow-GRPO latent KL norm

def _peer_asymmetric_surrogate(r, adv, w, eps_lt, eps_gt):
    """Flow-GRPO Bagel trainer's clipped objective from its published form, one row at a time (Python floats):
    −max(−A·r, −A·clamp(r, 1 − clip_range_lt, 1 + clip_range_gt)), times the row weight; mean over rows."""
    out = [max(-a * x, -a * min(max(x, 1 - eps_lt), 1 + eps_gt)) * wi for x, a, wi in zip(r, adv, w)]
    return sum(out) / len(out)


@SETTINGS
@given(eps_lo=st.sampled_from([0.0, 1e-6, 1e-3, 0.2]), eps_hi=st.sampled_from([0.0, 1e-6, 1e-4, 0.28]),
       targets=st.lists(st.floats(-0.45, 0.45), min_size=1, max_size=7), signs=st.lists(st.booleans(), min_size=7,
       max_size=7), ratio_norm=st.booleans(), grad_reweight=st.booleans())
def test_asymmetric_flow_clip_against_peer_formula(eps_lo, eps_hi, targets, signs, ratio_norm, grad_reweight):
    """clip_eps_lo / clip_eps_hi clamp the ratio to [1 − ε_lo, 1 + ε_hi]: value vs the peer formula, the
    zero-gradient set (A > 0 above 1 + ε_hi, A < 0 below 1 − ε_lo) and clip_frac. Ratios are kept 1e-9 from
    each bound (assume): the clip decision is discontinuous there. Tolerance 1e-12: float64 mean of ≤ 7 O(1)
    terms; the ratio construction itself is exact to ~1e-15."""
    target = torch.tensor(targets, dtype=F64)
    r = torch.exp(target)
    assume(bool(((r - (1 + eps_hi)).abs() > 1e-9).all() and ((r - (1 - eps_lo)).abs() > 1e-9).all()))
    adv = torch.tensor([1.3 if sg else -0.7 for sg in signs[:len(targets)]], dtype=F64)
    rows = _rows_with_log_ratio(target, ratio_norm, D=5, seed=3)
    v = rows["v"].clone().requires_grad_(True)
    loss, m = K.flow_grpo_loss(v_BD=v, xi_BD=rows["xi"], v_old_BD=rows["v_old"], v_ref_BD=rows["v_old"], adv_B=adv,
                               b_B=rows["b"], std_B=rows["s"], h_B=rows["h"], clip_eps=0.5, clip_eps_lo=eps_lo,
                               clip_eps_hi=eps_hi, beta=0.0, reg="none", ratio_norm=ratio_norm,
                               grad_reweight=grad_reweight)
    w = (1 / rows["h"]).tolist() if grad_reweight else [1.0] * len(targets)
    expected = _peer_asymmetric_surrogate(r.tolist(), adv.tolist(), w, eps_lo, eps_hi)
    assert loss.item() == pytest.approx(expected, abs=1e-12, rel=1e-12)
    zero = ((adv > 0) & (r > 1 + eps_hi)) | ((adv < 0) & (r < 1 - eps_lo))
    (grad,) = torch.autograd.grad(loss, v)
    assert bool((grad[zero] == 0).all()) and bool((grad[~zero].abs().amax(1) > 0).all())
    assert m["flow/clip_frac"].item() == pytest.approx(zero.double().mean().item())


def test_latent_kl_flow_grpo_norm_against_peer_formula():
    """latent_kl_norm="flow_grpo" = Flow-GRPO's latent KL mean_D(μ_θ − μ_ref)²/(2·std_dev_t²), std_dev_t =
    η·sqrt(σ/(1 − σ̃)) (no sqrt(h)); μ written out from §3 (expected_sde), independently of the b/s coefficients
    the library uses. It is h × the project's latent_kl. Tolerance 1e-12 relative: a dozen float64 ops."""
    g = torch.Generator().manual_seed(13)
    sigmas, eta, B, D = K.sigma_schedule(25, 3.0), 0.8, 5, 7
    k_B = torch.tensor([0, 1, 2, 7, 23])
    x, v, v_ref, xi = (torch.randn(B, D, dtype=F64, generator=g) for _ in range(4))
    c = K.step_coeffs_batch(sigmas, k_B, eta)
    kl = []
    for i, k in enumerate(k_B.tolist()):
        mu, _ = expected_sde(sigmas, k, eta, x[i], v[i])
        mu_ref, _ = expected_sde(sigmas, k, eta, x[i], v_ref[i])
        sigma = float(sigmas[k])
        sigma_tilde = float(sigmas[1]) if sigma == 1.0 else sigma
        std_dev_t = eta * math.sqrt(sigma / (1 - sigma_tilde))
        kl.append(((mu - mu_ref) ** 2).mean().item() / (2 * std_dev_t ** 2))
    kw = dict(xi_BD=xi, v_old_BD=v, v_ref_BD=v_ref, adv_B=torch.ones(B, dtype=F64), b_B=c["b"], std_B=c["std"],
              h_B=c["h"], beta=1.0, reg="latent_kl", flow_weight=0.0)
    loss, m = K.flow_grpo_loss(v_BD=v, latent_kl_norm="flow_grpo", **kw)
    assert loss.item() == pytest.approx(sum(kl) / B, rel=1e-12)
    assert m["flow/reg"].item() == pytest.approx(sum(kl) / B, rel=1e-12)
    project, _ = K.flow_grpo_loss(v_BD=v, **kw)
    per_row_project = [F.flow_grpo_loss(v_BD=v[i:i + 1], **{**kw, **{n: kw[n][i:i + 1] for n in
                       ("xi_BD", "v_old_BD", "v_ref_BD", "adv_B", "b_B", "std_B", "h_B")}})[0].item()
                       for i in range(B)]
    assert sum(kl) / B == pytest.approx(sum(h * p for h, p in zip(c["h"].tolist(), per_row_project)) / B, rel=1e-12)
    assert project.item() != pytest.approx(loss.item(), rel=1e-3)      # the switch changes the number
    with pytest.raises(ValueError, match="'sum'"):
        K.flow_grpo_loss(v_BD=v, latent_kl_norm="sum", **kw)


@pytest.mark.parametrize("ratio_norm", [True, False])
def test_asymmetric_clip_and_kl_norm_gradcheck(ratio_norm):
    """Finite differences (torch defaults, float64) through the new terms: asymmetric clip with rows inside and
    outside each side (targets ≥ 0.05 from the kinks at log 0.9 / log 1.3), and the flow_grpo latent KL."""
    target = torch.tensor([0.05, -0.03, 0.4, -0.5, 0.0, 0.35, -0.4, 0.02], dtype=F64)
    adv = torch.tensor([1.3, -0.7, 0.9, -1.1, 0.5, -0.8, 1.2, -1.5], dtype=F64)
    r = _rows_with_log_ratio(target, ratio_norm, D=5, seed=7)
    v_ref = r["v_old"] + 0.5 * torch.randn(r["v"].shape, dtype=F64, generator=r["g"])
    kw = dict(xi_BD=r["xi"], v_old_BD=r["v_old"], v_ref_BD=v_ref, adv_B=adv, b_B=r["b"], std_B=r["s"], h_B=r["h"],
              clip_eps_lo=0.1, clip_eps_hi=0.3, beta=0.7, reg="latent_kl", latent_kl_norm="flow_grpo",
              ratio_norm=ratio_norm)
    v = r["v"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda vv: K.flow_grpo_loss(v_BD=vv, **kw)[0], (v,))


@pytest.mark.parametrize("reg", ["mse", "latent_kl", "none"])
def test_new_flow_options_at_defaults_are_bitwise_unchanged(reg):
    """clip_eps_lo = clip_eps_hi = None (or = clip_eps) and latent_kl_norm="project" give torch.equal loss,
    metrics and gradient to the call without them (float32, the training dtype)."""
    g = torch.Generator().manual_seed(2)
    B, D = 6, 9
    c = K.step_coeffs_batch(K.sigma_schedule(25), torch.tensor([0, 1, 2, 0, 1, 2]), 0.8)
    v0, xi, v_old, v_ref = (torch.randn(B, D, generator=g) for _ in range(4))
    v_old = v0 + 0.1 * v_old                      # log r ~ 3e-3: most rows clip at ε = 1e-4
    kw = dict(xi_BD=xi, v_old_BD=v_old, v_ref_BD=v_ref, adv_B=torch.randn(B, generator=g), b_B=c["b"].float(),
              std_B=c["std"].float(), h_B=c["h"].float(), clip_eps=1e-4, reg=reg)

    def run(**opts):
        v = v0.clone().requires_grad_(True)
        loss, m = K.flow_grpo_loss(v_BD=v, **kw, **opts)
        loss.backward()
        return loss, m, v.grad

    base = run()
    for opts in (dict(clip_eps_lo=None, clip_eps_hi=None, latent_kl_norm="project"),
                 dict(clip_eps_lo=1e-4, clip_eps_hi=1e-4)):
        got = run(**opts)
        assert torch.equal(got[0], base[0]) and torch.equal(got[2], base[2])
        assert all(torch.equal(got[1][k], base[1][k]) for k in base[1])
