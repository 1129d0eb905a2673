"""Reference (torch backend) math of the flow ops: the sigma schedule, the per-step coefficients, the SDE /
ODE denoising step with its log-probability, and the FlowGRPO-with-RatioNorm loss (ALGORITHM.md §2, §3,
§7, §8). This file is the spec in code: any device, float64-capable; the Triton/CUDA kernels are tested
against it.

Shape legend:
    B   rows: samples of a rollout step, or (trajectory, window step) pairs in training
    D   latent elements of one sample (channels × tokens); inputs [B, ...] are flattened to [B, D]
    N   denoising steps; the schedule has N+1 entries, step k goes σ_k → σ_{k+1}

Decisions:
- Compute dtype: float32 whatever the model's dtype (bf16/fp16 are cast up, §3); float64 when any input
  is float64 (tests). Outputs (x', log-prob, loss) come back in that compute dtype.
- Step coefficients are computed in float64 from the schedule (cheap scalars). `step_coeffs` gives
  Python floats for one step; `step_coeffs_batch` gives [B] tensors for rows at different steps / with
  different η (in a rollout some groups are in their SDE window and others are not). Both call the one
  function `_coeffs` that holds the §3 formulas.
- σ̃ rule (§3): σ̃ = σ_1 when σ == 1 (only step 0 of a shift schedule, where σ_0 is exactly 1).
- "cps": s = σ'·sin(ηπ/2), μ = (1−σ')(x − σv) + c·(x + (1−σ)v) with c = sqrt(σ'² − s²) (clamped at 0
  against rounding). It is affine in x and v too: a = (1−σ') + c, b = −σ(1−σ') + c(1−σ). Its log-prob
  is the same Gaussian MEAN log-density with that s, so RatioNorm applies unchanged. NOTE: Flow-GRPO's
  own CPS code drops the constants and the 1/(2s²), so its clip ranges are not comparable with ours.
  η must lie in [0, 1] for cps (sin(ηπ/2) is not monotone beyond).
- η = 0 (either kind) gives a = 1, b = −h, s = 0: the Euler/ODE step. So does cps at the last step
  (σ' = 0 ⇒ s = 0). With s = 0 the log-prob is undefined: `gaussian_logprob` returns NaN for such rows
  (rather than raising, which would need a host sync in the rollout loop).
- Log-probs are the MEAN over D of the per-element Gaussian log-density (Flow-GRPO's choice, §3).
- Loss rows are (trajectory, window step) pairs, so the 1/(G·W) of §7/§8 is the mean over rows.
- The loss splits into the only per-element work, `flow_row_sums` ([B, D] streams → [B, 3] sums), and per-row
  scalar math, `flow_loss_from_sums`. Fused backends replace the first and reuse the second, so the formulas
  of §7/§8 live here once and the kernels are tested on exactly the part they compute.
  Δμ = b·(v − v_old) (§7: μ_θ and μ_old share x). log r̂ = mean_D(ξ·Δμ) (RatioNorm); the plain ratio is
  log r = log r̂ / s − bias with bias = mean_D(Δμ²)/(2s²), which follows from §3 with x' = μ_old + s·ξ:
  −(sξ − Δμ)²/(2s²) + ξ²/2 = ξ·Δμ/s − Δμ²/(2s²).
- flow_grpo_loss is differentiable in v_BD only; ξ, v_old, v_ref and the per-row scalars are detached.
- With ε_f = 1e-6 and a float32 ratio, the clip decision is quantised at one float32 ulp near 1
  (1.2e-7 ≈ 0.12·ε_f); run in float64 where that matters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .common import check_choice, clip_active, clipped_surrogate, compute_dtype, per_row

__all__ = [
    "sigma_schedule", "StepCoeffs", "step_coeffs", "step_coeffs_batch", "step_mean", "sde_step", "ode_step",
    "gaussian_logprob", "logprob_from_sq_mean", "flow_log_ratio", "velocity_mse", "flow_grpo_loss", "ROW_SUMS",
    "flow_row_sums", "flow_loss_from_sums", "REGS", "REG_CODES", "LATENT_KL_NORMS", "reg_code", "flow_clip_eps",
    "FLOW_METRICS", "check_flow_loss_args", "check_sde_step_args",
]

_KINDS = ("sde", "cps")
_REGS = ("mse", "latent_kl", "none")
REGS = _REGS
"""The regularisers of §8."""
LATENT_KL_NORMS = ("project", "flow_grpo")
"""Normalisations of reg="latent_kl": "project" = mean_D(μ_θ − μ_ref)²/(2s²) (§8, s = g·sqrt(h) the step's std);
"flow_grpo" = Flow-GRPO's mean_D(μ_θ − μ_ref)²/(2g²) with g = std_dev_t its std WITHOUT sqrt(h): since s² = g²·h
(sde kind) it is h times the project's, b²·h/(2s²)·mean_D(v − v_ref)². For kind "cps" it is defined by that same
formula (h · the project's term); Flow-GRPO has no g there."""
REG_CODES = REGS + ("latent_kl_flow_grpo",)
"""Fused kernels take a regulariser as its index in this tuple: REGS, then latent_kl with the flow_grpo norm."""
FLOW_METRICS = ("flow/policy_loss", "flow/reg", "flow/ratio_mean", "flow/ratio_max", "flow/ratio_min",
                "flow/clip_frac", "flow/log_ratio_abs_max", "flow/drift_bias_mean", "flow/velocity_mse")
"""The metrics of flow_grpo_loss, in the order fused kernels write them."""
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


# --------------------------------------------------------------------------------------------- schedule

def sigma_schedule(num_steps: int, shift: float = 3.0, dtype: torch.dtype = torch.float64) -> Tensor:
    """σ_k = s·u_k / (1 + (s−1)·u_k), u_k = 1 − k/N, k = 0..N (§2). Returns [N+1], σ_0 = 1 and σ_N = 0
    exactly, strictly decreasing. Computed in float64, returned in `dtype`."""
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} must be an int >= 1")
    if not (shift > 0 and math.isfinite(shift)):
        raise ValueError(f"shift={shift!r} must be a finite number > 0")
    u = 1.0 - torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    sigmas = shift * u / (1.0 + (shift - 1.0) * u)
    # s/(1 + (s−1)) is not exactly 1 in floating point for every s (s = 0.1 gives 1 − 1.1e-16); the σ̃ rule
    # of §3 tests σ == 1, so pin the endpoint. σ_N = 0 is exact already (u_N = 0).
    sigmas[0] = 1.0
    return sigmas.to(dtype)


# ------------------------------------------------------------------------------------ step coefficients

@dataclass(frozen=True)
class StepCoeffs:
    """Scalars of one denoising step k: μ = a·x + b·v, x' = μ + std·ξ, h = sigma − sigma_next."""
    sigma: float
    sigma_next: float
    h: float
    a: float
    b: float
    std: float


def _check_eta(eta, kind: str) -> None:
    vals = eta.detach().flatten().tolist() if isinstance(eta, Tensor) else [eta]
    for e in vals:
        if not (math.isfinite(e) and e >= 0):
            raise ValueError(f"eta={e!r} must be finite and >= 0")
        if kind == "cps" and e > 1:
            raise ValueError(f"eta={e!r} must lie in [0, 1] for kind='cps'")


def _coeffs(sigma: Tensor, sigma_next: Tensor, sigma_1: Tensor, eta: Tensor, kind: str) -> dict[str, Tensor]:
    """The §3 formulas, elementwise on broadcastable float64 tensors. The only home of a, b, std."""
    h = sigma - sigma_next
    if kind == "sde":
        sigma_tilde = torch.where(sigma == 1.0, sigma_1, sigma)
        g2 = eta * eta * sigma / (1.0 - sigma_tilde)                   # g² = η²·σ/(1 − σ̃)
        a = 1.0 - h * g2 / (2.0 * sigma)
        b = -h * (1.0 + g2 * (1.0 - sigma) / (2.0 * sigma))
        std = torch.sqrt(g2) * torch.sqrt(h)                           # s = g·sqrt(h)
    else:  # cps
        std = sigma_next * torch.sin(eta * (math.pi / 2.0))
        c = torch.sqrt(torch.clamp(sigma_next * sigma_next - std * std, min=0.0))
        a = (1.0 - sigma_next) + c
        b = -sigma * (1.0 - sigma_next) + c * (1.0 - sigma)
    return {"sigma": sigma, "sigma_next": sigma_next, "h": h, "a": a, "b": b, "std": std}


def _check_sigmas(sigmas: Tensor) -> None:
    if not isinstance(sigmas, Tensor) or sigmas.dim() != 1 or sigmas.numel() < 2:
        shape = list(sigmas.shape) if isinstance(sigmas, Tensor) else type(sigmas).__name__
        raise ValueError(f"sigmas must be a 1-D tensor [N+1] with N >= 1, got {shape}")


def step_coeffs(sigmas: Tensor, k: int, eta: float, kind: str = "sde") -> StepCoeffs:
    """Coefficients of step k (σ_k → σ_{k+1}) as Python floats (computed in float64). sigmas: [N+1]."""
    check_choice("kind", kind, _KINDS)
    _check_sigmas(sigmas)
    n = sigmas.numel() - 1
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < n:
        raise ValueError(f"k={k!r} must be an int step index in [0, {n - 1}]")
    _check_eta(eta, kind)
    s64 = sigmas.detach().to(device="cpu", dtype=torch.float64)
    out = _coeffs(s64[k], s64[k + 1], s64[1], torch.tensor(float(eta), dtype=torch.float64), kind)
    return StepCoeffs(**{name: float(val) for name, val in out.items()})


def step_coeffs_batch(sigmas: Tensor, k_B: Tensor, eta, kind: str = "sde") -> dict[str, Tensor]:
    """Coefficients for rows at steps k_B (int [B]) with η a number or a [B] tensor. Returns a dict with
    keys sigma, sigma_next, h, a, b, std, each [B] in float64, on k_B's device."""
    check_choice("kind", kind, _KINDS)
    _check_sigmas(sigmas)
    n = sigmas.numel() - 1
    if not isinstance(k_B, Tensor) or k_B.dim() != 1 or k_B.dtype.is_floating_point or k_B.dtype == torch.bool:
        raise ValueError(f"k_B must be a 1-D integer tensor [B], got {k_B!r}")
    if k_B.numel() and (int(k_B.min()) < 0 or int(k_B.max()) >= n):
        raise ValueError(f"k_B values must lie in [0, {n - 1}], got range [{int(k_B.min())}, {int(k_B.max())}]")
    _check_eta(eta, kind)
    B = k_B.numel()
    s64 = sigmas.detach().to(device=k_B.device, dtype=torch.float64)
    eta_B = per_row(eta, B, "eta", torch.float64, k_B.device)
    k_B = k_B.long()
    return _coeffs(s64[k_B], s64[k_B + 1], s64[1].expand(B), eta_B, kind)


# ---------------------------------------------------------------------------------- step and log-prob

def _flat(t: Tensor, B: int, name: str) -> Tensor:
    if not isinstance(t, Tensor) or t.dim() < 1 or t.shape[0] != B:
        shape = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a tensor [B, ...] with B={B}, got {shape}")
    return t.reshape(B, -1)


def _same_shape(ref_name: str, ref: Tensor, **others: Tensor) -> None:
    for name, t in others.items():
        if not isinstance(t, Tensor) or t.shape != ref.shape:
            shape = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must have the shape of {ref_name} {list(ref.shape)}, got {shape}")


def step_mean(x_BD: Tensor, v_BD: Tensor, a_B: Tensor, b_B: Tensor) -> Tensor:
    """μ = a·x + b·v (§3), all already [B, D] / [B] in the compute dtype. Returns [B, D]."""
    return a_B[:, None] * x_BD + b_B[:, None] * v_BD


def gaussian_logprob(x_next: Tensor, mean: Tensor, std) -> Tensor:
    """(1/D)·Σ_d [−(x'_d − μ_d)²/(2s²) − log s − ½·log 2π] (§3). x_next, mean: [B, ...] (same shape);
    std: number or [B]. Returns [B] in the compute dtype; NaN where std == 0 (log-prob undefined)."""
    if not isinstance(x_next, Tensor) or x_next.dim() < 1:
        raise ValueError("x_next must be a tensor [B, ...]")
    B = x_next.shape[0]
    _same_shape("x_next", x_next, mean=mean)
    dt = compute_dtype(x_next, mean, std)
    xn_BD = x_next.reshape(B, -1).to(dt)
    mu_BD = mean.reshape(B, -1).to(dt)
    std_B = per_row(std, B, "std", dt, x_next.device)
    return logprob_from_sq_mean(((xn_BD - mu_BD) ** 2).mean(dim=1), std_B)


def logprob_from_sq_mean(sq_mean_B: Tensor, std_B: Tensor) -> Tensor:
    """mean_D Gaussian log-density from mean_D (x' − μ)² (§3): −sq/(2s²) − log s − ½·log 2π. [B] → [B];
    NaN where std == 0 (the log-prob of an ODE row is undefined)."""
    logp_B = -sq_mean_B / (2.0 * std_B * std_B) - torch.log(std_B) - _HALF_LOG_2PI
    return torch.where(std_B > 0, logp_B, torch.full_like(logp_B, float("nan")))


def sde_step(x_BD: Tensor, v_BD: Tensor, *, a_B, b_B, std_B, noise_BD: Tensor, return_mean: bool = False):
    """One stochastic step x' = a·x + b·v + std·ξ and its log-prob (§3).

    x_BD, v_BD, noise_BD: [B, ...] of one shape (any float dtype; v is cast up); a_B, b_B, std_B: numbers
    or [B]. Returns (x_next [B, ...], logp_B [B]) or, with return_mean, (x_next, logp_B, mean [B, ...]), in
    float32 (float64 if any input is float64). logp_B is NaN on rows with std == 0.
    """
    check_sde_step_args(x_BD, v_BD, noise_BD)
    B = x_BD.shape[0]
    dt = compute_dtype(x_BD, v_BD, noise_BD, a_B, b_B, std_B)
    dev = x_BD.device
    x = _flat(x_BD, B, "x_BD").to(dt)
    v = _flat(v_BD, B, "v_BD").to(dt)
    xi = _flat(noise_BD, B, "noise_BD").to(dt)
    a = per_row(a_B, B, "a_B", dt, dev)
    b = per_row(b_B, B, "b_B", dt, dev)
    s = per_row(std_B, B, "std_B", dt, dev)
    mean = step_mean(x, v, a, b)
    x_next = mean + s[:, None] * xi
    logp_B = gaussian_logprob(x_next, mean, s)
    x_next = x_next.reshape(x_BD.shape)
    if return_mean:
        return x_next, logp_B, mean.reshape(x_BD.shape)
    return x_next, logp_B


def check_sde_step_args(x_BD: Tensor, v_BD: Tensor, noise_BD: Tensor) -> None:
    """The shape checks of sde_step, shared by every backend."""
    if not isinstance(x_BD, Tensor) or x_BD.dim() < 1:
        raise ValueError("x_BD must be a tensor [B, ...]")
    _same_shape("x_BD", x_BD, v_BD=v_BD, noise_BD=noise_BD)


def ode_step(x: Tensor, v: Tensor, h) -> Tensor:
    """Euler step x − h·v (§2). x, v: [B, ...] of one shape; h: number or [B]. float32 (float64) result."""
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor [B, ...]")
    _same_shape("x", x, v=v)
    B = x.shape[0]
    dt = compute_dtype(x, v, h)
    h_B = per_row(h, B, "h", dt, x.device)
    out = x.reshape(B, -1).to(dt) - h_B[:, None] * v.reshape(B, -1).to(dt)
    return out.reshape(x.shape)


# ------------------------------------------------------------------------------------------ flow loss

ROW_SUMS = ("xi_dv_old", "dv_old_sq", "dv_ref_sq")
"""Columns of the per-row sums of the flow loss, [B, 3]: Σ_d ξ·(v − v_old), Σ_d (v − v_old)², Σ_d (v − v_ref)²."""


def flow_row_sums(v: Tensor, xi: Tensor, v_old: Tensor, v_ref: Tensor) -> Tensor:
    """The only per-element work of the flow loss (§7, §8): [B, D] tensors in one dtype → sums [B, 3] with the
    columns of ROW_SUMS. Fused backends replace exactly this function (one read of each stream); everything
    after it is per-row scalar math (`flow_loss_from_sums`)."""
    d_old = v - v_old
    d_ref = v - v_ref
    return torch.stack([(xi * d_old).sum(dim=1), (d_old * d_old).sum(dim=1), (d_ref * d_ref).sum(dim=1)], dim=1)


def _log_ratio_from_sums(sums_B3: Tensor, D: int, b: Tensor, std: Tensor, ratio_norm: bool):
    """(log ratio [B], bias [B]). Δμ = b·(v_θ − v_old) (§7: μ_θ and μ_old share x), so
    log r̂ = mean_D(ξ·Δμ) = b·Σξ(v − v_old)/D (RatioNorm) and bias = mean_D(Δμ²)/(2s²) = b²·Σ(v − v_old)²/(2s²D);
    the plain ratio is log r = log r̂/s − bias."""
    log_r_hat = b * sums_B3[:, 0] / D
    bias = b * b * sums_B3[:, 1] / (2.0 * std * std * D)
    if ratio_norm:
        return log_r_hat, bias
    return log_r_hat / std - bias, bias


def _prepare(B: int, dt, **tensors) -> dict[str, Tensor]:
    """Flatten each named [B, ...] tensor to [B, D] in dtype dt."""
    return {name: _flat(t, B, name).to(dt) for name, t in tensors.items()}


def flow_log_ratio(*, v_BD: Tensor, xi_BD: Tensor, v_old_BD: Tensor, b_B, std_B, ratio_norm: bool = True):
    """Per-row log-ratio of the flow loss: log r̂ = mean_D(ξ·b·(v − v_old)) with ratio_norm, else the
    plain log r = log r̂/s − mean_D(Δμ²)/(2s²). Tensors [B, ...] of one shape; returns [B]."""
    if not isinstance(v_BD, Tensor) or v_BD.dim() < 1:
        raise ValueError("v_BD must be a tensor [B, ...]")
    _same_shape("v_BD", v_BD, xi_BD=xi_BD, v_old_BD=v_old_BD)
    B, dev = v_BD.shape[0], v_BD.device
    dt = compute_dtype(v_BD, xi_BD, v_old_BD, b_B, std_B)
    t = _prepare(B, dt, v_BD=v_BD, xi_BD=xi_BD, v_old_BD=v_old_BD)
    b = per_row(b_B, B, "b_B", dt, dev)
    std = per_row(std_B, B, "std_B", dt, dev)
    sums = flow_row_sums(t["v_BD"], t["xi_BD"], t["v_old_BD"], t["v_old_BD"])
    return _log_ratio_from_sums(sums, t["v_BD"].shape[1], b, std, ratio_norm)[0]


def velocity_mse(v_BD: Tensor, v_ref_BD: Tensor) -> Tensor:
    """Per-row velocity MSE mean_D (v − v_ref)² (§8). [B, ...] of one shape → [B]."""
    if not isinstance(v_BD, Tensor) or v_BD.dim() < 1:
        raise ValueError("v_BD must be a tensor [B, ...]")
    _same_shape("v_BD", v_BD, v_ref_BD=v_ref_BD)
    B = v_BD.shape[0]
    dt = compute_dtype(v_BD, v_ref_BD)
    d = v_BD.reshape(B, -1).to(dt) - v_ref_BD.reshape(B, -1).to(dt)
    return (d * d).mean(dim=1)


def reg_code(reg: str, latent_kl_norm: str = "project") -> int:
    """The kernels' regulariser code: the index in REG_CODES of (reg, latent_kl_norm)."""
    check_choice("reg", reg, _REGS)
    check_choice("latent_kl_norm", latent_kl_norm, LATENT_KL_NORMS)
    if reg == "latent_kl" and latent_kl_norm == "flow_grpo":
        return REG_CODES.index("latent_kl_flow_grpo")
    return REG_CODES.index(reg)


def flow_clip_eps(clip_eps: float, clip_eps_lo: float | None = None, clip_eps_hi: float | None = None):
    """(ε_lo, ε_hi) of the flow ratio clip [1 − ε_lo, 1 + ε_hi]: each side defaults to clip_eps (None). The
    asymmetric form is Flow-GRPO's Bagel trainer's clip_range_lt / clip_range_gt."""
    return (clip_eps if clip_eps_lo is None else clip_eps_lo), (clip_eps if clip_eps_hi is None else clip_eps_hi)


def check_flow_loss_args(*, v_BD: Tensor, xi_BD: Tensor, v_old_BD: Tensor, v_ref_BD: Tensor, clip_eps: float,
                         beta: float, reg: str, flow_weight: float = 1.0, clip_eps_lo: float | None = None,
                         clip_eps_hi: float | None = None, latent_kl_norm: str = "project") -> None:
    """The argument checks of flow_grpo_loss, shared by every backend (ValueError naming the bad value)."""
    check_choice("reg", reg, _REGS)
    check_choice("latent_kl_norm", latent_kl_norm, LATENT_KL_NORMS)
    for name, val in (("clip_eps_lo", clip_eps_lo), ("clip_eps_hi", clip_eps_hi)):
        if val is not None and not (val >= 0 and math.isfinite(val)):
            raise ValueError(f"{name}={val!r} must be None or finite and >= 0")
    if not (flow_weight >= 0 and math.isfinite(flow_weight)):
        raise ValueError(f"flow_weight={flow_weight!r} must be finite and >= 0")
    if not (clip_eps >= 0 and math.isfinite(clip_eps)):
        raise ValueError(f"clip_eps={clip_eps!r} must be finite and >= 0")
    if not (beta >= 0 and math.isfinite(beta)):
        raise ValueError(f"beta={beta!r} must be finite and >= 0")
    if not isinstance(v_BD, Tensor) or v_BD.dim() < 1:
        raise ValueError("v_BD must be a tensor [B, ...]")
    _same_shape("v_BD", v_BD, xi_BD=xi_BD, v_old_BD=v_old_BD, v_ref_BD=v_ref_BD)
    if v_BD.shape[0] == 0:
        raise ValueError("flow_grpo_loss needs at least one row, got B=0")


def flow_loss_from_sums(sums_B3: Tensor, D: int, *, adv_B: Tensor, b_B: Tensor, std_B: Tensor, h_B: Tensor,
                        clip_eps: float, beta: float, reg: str, ratio_norm: bool,
                        grad_reweight: bool, flow_weight: float = 1.0, clip_eps_lo: float | None = None,
                        clip_eps_hi: float | None = None,
                        latent_kl_norm: str = "project") -> tuple[Tensor, dict[str, Tensor]]:
    """The per-row scalar math of the flow loss (§7, §8) from the row sums (ROW_SUMS) of `flow_row_sums` or a
    fused backend. sums_B3 [B, 3] (grad flows back through it); adv/b/std/h [B] in the sums' dtype; D the
    latent elements per row. Returns (0-dim loss, detached metrics "flow/...")."""
    eps_lo, eps_hi = flow_clip_eps(clip_eps, clip_eps_lo, clip_eps_hi)
    log_ratio, bias = _log_ratio_from_sums(sums_B3, D, b_B, std_B, ratio_norm)
    ratio = torch.exp(log_ratio)
    w = 1.0 / h_B if grad_reweight else torch.ones_like(h_B)
    policy_loss = -(clipped_surrogate(ratio, adv_B, eps_lo, eps_hi) * w).mean()

    mse_B = sums_B3[:, 2] / D
    if reg == "mse":
        reg_B = mse_B
    elif reg == "latent_kl":
        reg_B = b_B * b_B / (2.0 * std_B * std_B) * mse_B
        if latent_kl_norm == "flow_grpo":                  # ÷ 2g² instead of ÷ 2s², s² = g²·h
            reg_B = reg_B * h_B
    else:
        reg_B = torch.zeros_like(mse_B)
    reg_mean = reg_B.mean()
    loss = flow_weight * policy_loss + beta * reg_mean

    with torch.no_grad():
        metrics = {
            "flow/policy_loss": policy_loss.detach(),
            "flow/reg": reg_mean.detach(),
            "flow/ratio_mean": ratio.mean(),
            "flow/ratio_max": ratio.max(),
            "flow/ratio_min": ratio.min(),
            "flow/clip_frac": clip_active(ratio, adv_B, eps_lo, eps_hi).to(sums_B3.dtype).mean(),
            "flow/log_ratio_abs_max": log_ratio.abs().max(),
            "flow/drift_bias_mean": bias.mean(),
            "flow/velocity_mse": mse_B.mean(),
        }
    return loss, {k: m.detach() for k, m in metrics.items()}


def flow_grpo_loss(*, v_BD: Tensor, xi_BD: Tensor, v_old_BD: Tensor, v_ref_BD: Tensor, adv_B, b_B, std_B, h_B,
                   clip_eps: float = 1e-6, beta: float = 1.5e-5, reg: str = "mse", ratio_norm: bool = True,
                   grad_reweight: bool = False, flow_weight: float = 1.0, clip_eps_lo: float | None = None,
                   clip_eps_hi: float | None = None,
                   latent_kl_norm: str = "project") -> tuple[Tensor, dict[str, Tensor]]:
    """FlowGRPO loss with RatioNorm and the velocity regulariser (§7, §8); one row = one (trajectory,
    window step) pair, so every 1/(G·W) is a mean over rows.

    v_BD (grad), xi_BD, v_old_BD, v_ref_BD: [B, ...] of one shape; adv_B, b_B, std_B, h_B: numbers or [B].
        loss = λ·(−mean_B[min(r·A, clip(r, 1−ε, 1+ε)·A)·w]) + β·mean_B reg_B,   λ = flow_weight (§9)
    r = r̂ (ratio_norm) or the plain ratio; w = 1/h (grad_reweight) or 1; reg_B = mean_D (v − v_ref)² ("mse"),
    b²/(2s²)·mean_D (v − v_ref)² ("latent_kl"; times h with latent_kl_norm="flow_grpo", see LATENT_KL_NORMS),
    or 0 ("none"). The clip range is [1 − ε_lo, 1 + ε_hi], each side clip_eps unless clip_eps_lo / clip_eps_hi
    is given. Returns a 0-dim loss in float32 (float64 if
    any input is) and detached metrics "flow/...".
    """
    check_flow_loss_args(v_BD=v_BD, xi_BD=xi_BD, v_old_BD=v_old_BD, v_ref_BD=v_ref_BD, clip_eps=clip_eps,
                         beta=beta, reg=reg, flow_weight=flow_weight, clip_eps_lo=clip_eps_lo,
                         clip_eps_hi=clip_eps_hi, latent_kl_norm=latent_kl_norm)
    B, dev = v_BD.shape[0], v_BD.device
    dt = compute_dtype(v_BD, xi_BD, v_old_BD, v_ref_BD, adv_B, b_B, std_B, h_B)
    v = _flat(v_BD, B, "v_BD").to(dt)
    t = _prepare(B, dt, xi_BD=xi_BD.detach(), v_old_BD=v_old_BD.detach(), v_ref_BD=v_ref_BD.detach())
    rows = {name: per_row(val, B, name, dt, dev) for name, val in
            (("adv_B", adv_B), ("b_B", b_B), ("std_B", std_B), ("h_B", h_B))}
    sums = flow_row_sums(v, t["xi_BD"], t["v_old_BD"], t["v_ref_BD"])
    return flow_loss_from_sums(sums, v.shape[1], **rows, clip_eps=clip_eps, beta=beta, reg=reg,
                               ratio_norm=ratio_norm, grad_reweight=grad_reweight, flow_weight=flow_weight,
                               clip_eps_lo=clip_eps_lo, clip_eps_hi=clip_eps_hi, latent_kl_norm=latent_kl_norm)
