"""The public flow ops with backend dispatch: `sde_step` and `flow_grpo_loss` (ALGORITHM.md §3, §7, §8).

backend="torch" runs the reference (kernels/reference/flow.py) unchanged. "triton" (kernels/triton/flow.py)
and "cuda" (kernels/cuda_lib.py) run fused kernels behind `torch.library.custom_op`s, so the ops trace
under torch.compile and autograd reaches the kernels' own backward:

    unigrpo_kernels::sde_step_fwd   x, v, ξ, a, b, s → x', Σ_d (x' − μ)², μ (or an empty tensor)
    unigrpo_kernels::flow_loss_fwd  v, ξ, v_old, v_ref, per-row A/b/s/h → loss, metrics [9], dL/d(row sums) [B, 3]
    unigrpo_kernels::flow_loss_bwd  upstream grad of the loss, coefficients → dL/dv, one pass over the streams
    unigrpo_kernels::flow_sums      v, ξ, v_old, v_ref → [B, 3] row sums (reference `flow_row_sums`)
    unigrpo_kernels::flow_sums_bwd  upstream grad of the sums → dL/dv, one pass

Decisions:
- flow_grpo_loss is three launches: the row sums, one small kernel for the per-row scalar math (ratios,
  clipping, regulariser, metrics, and the gradient coefficients), and the one-pass backward. The cuda backend
  has no finalize kernel of its own and uses the Triton one on its [B, 3] sums (torch's CUDA builds ship
  triton); without triton it runs the reference's `flow_loss_from_sums` with torch ops and differentiates it
  with autograd (`flow_sums`).
  The sde_step log-prob is finished by the reference's `logprob_from_sq_mean` on [B] tensors.
- The fused backends compute in float32 and refuse float64 inputs (ask for backend="torch" there).
  v, v_old and v_ref are read in one dtype (bf16 / fp16 / fp32): when they differ all three are read as
  fp32. ξ and the latents are fp32 (§3).
- The backward reads v_old only without RatioNorm (the drift term; with RatioNorm the sums' second column
  feeds only a detached metric, so its gradient is exactly 0) and v_ref only when β > 0 and reg != "none".
"""
from __future__ import annotations

import importlib.util
import logging

import torch
from torch import Tensor

from .dispatch import resolve_backend
from .dtypes import KERNEL_DTYPES
from .reference import flow as ref
from .reference.common import per_row

__all__ = ["sde_step", "flow_grpo_loss"]

logger = logging.getLogger(__name__)


def _finalize_impl(mod):
    """The per-row finalize kernel of a backend: its own, else the Triton one (CUDA builds of torch ship
    triton), else None (the caller then runs the reference's scalar math with torch ops)."""
    fin = getattr(mod, "flow_loss_finalize", None)
    if fin is None and importlib.util.find_spec("triton") is not None:
        from .triton.flow import flow_loss_finalize as fin
    return fin


def _impl(backend: str):
    if backend == "triton":
        from .triton import flow as mod
    elif backend == "cuda":
        from . import cuda_lib as mod
    else:
        raise ValueError(f"no fused flow kernels for backend {backend!r}; expected 'triton' or 'cuda'")
    return mod


# ----------------------------------------------------------------------------------------- custom ops

@torch.library.custom_op("unigrpo_kernels::sde_step_fwd", mutates_args=())
def _sde_step_op(x: Tensor, v: Tensor, xi: Tensor, a: Tensor, b: Tensor, s: Tensor, want_mean: bool,
                 backend: str) -> tuple[Tensor, Tensor, Tensor]:
    x_next, sq, mean = _impl(backend).sde_step_fwd(x, v, xi, a, b, s, want_mean)
    return x_next, sq, mean if mean is not None else x.new_empty(0)


@_sde_step_op.register_fake
def _(x, v, xi, a, b, s, want_mean, backend):
    return torch.empty_like(x), x.new_empty(x.shape[0]), torch.empty_like(x) if want_mean else x.new_empty(0)


@torch.library.custom_op("unigrpo_kernels::flow_sums", mutates_args=())
def _flow_sums_op(v: Tensor, xi: Tensor, v_old: Tensor, v_ref: Tensor, use_old: bool, use_ref: bool,
                  backend: str) -> Tensor:
    return _impl(backend).flow_sums_fwd(v, xi, v_old, v_ref)


@_flow_sums_op.register_fake
def _(v, xi, v_old, v_ref, use_old, use_ref, backend):
    return v.new_empty(v.shape[0], 3, dtype=torch.float32)


@torch.library.custom_op("unigrpo_kernels::flow_sums_bwd", mutates_args=())
def _flow_sums_bwd_op(g: Tensor, v: Tensor, xi: Tensor, v_old: Tensor, v_ref: Tensor, use_old: bool,
                      use_ref: bool, backend: str) -> Tensor:
    return _impl(backend).flow_sums_bwd(g, v, xi, v_old, v_ref, use_old, use_ref)


@_flow_sums_bwd_op.register_fake
def _(g, v, xi, v_old, v_ref, use_old, use_ref, backend):
    return torch.empty_like(v)


def _flow_sums_setup(ctx, inputs, output):
    v, xi, v_old, v_ref, use_old, use_ref, backend = inputs
    ctx.save_for_backward(v, xi, v_old, v_ref)
    ctx.flags = (use_old, use_ref, backend)


def _flow_sums_backward(ctx, g):
    v, xi, v_old, v_ref = ctx.saved_tensors
    use_old, use_ref, backend = ctx.flags
    dv = _flow_sums_bwd_op(g.float().contiguous(), v, xi, v_old, v_ref, use_old, use_ref, backend)
    return dv, None, None, None, None, None, None


_flow_sums_op.register_autograd(_flow_sums_backward, setup_context=_flow_sums_setup)


@torch.library.custom_op("unigrpo_kernels::flow_loss_fwd", mutates_args=())
def _flow_loss_op(v: Tensor, xi: Tensor, v_old: Tensor, v_ref: Tensor, adv: Tensor, b: Tensor, s: Tensor,
                  h: Tensor, lo: float, hi: float, beta: float, reg: int, ratio_norm: bool, grad_reweight: bool,
                  flow_weight: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    mod = _impl(backend)
    if hasattr(mod, "flow_sums_partials"):
        part = mod.flow_sums_partials(v, xi, v_old, v_ref)              # [B, chunks, 3]
    else:
        part = mod.flow_sums_fwd(v, xi, v_old, v_ref).unsqueeze(1)      # [B, 1, 3]
    return _finalize_impl(mod)(part, adv, b, s, h, v.shape[1], lo, hi, beta, reg, ratio_norm, grad_reweight,
                               flow_weight)


@_flow_loss_op.register_fake
def _(v, xi, v_old, v_ref, adv, b, s, h, lo, hi, beta, reg, ratio_norm, grad_reweight, flow_weight, backend):
    f32 = dict(dtype=torch.float32, device=v.device)
    return torch.empty((), **f32), torch.empty(len(ref.FLOW_METRICS), **f32), torch.empty(v.shape[0], 3, **f32)


@torch.library.custom_op("unigrpo_kernels::flow_loss_bwd", mutates_args=())
def _flow_loss_bwd_op(g_loss: Tensor, coef: Tensor, v: Tensor, xi: Tensor, v_old: Tensor, v_ref: Tensor,
                      use_old: bool, use_ref: bool, backend: str) -> Tensor:
    g = (coef * g_loss.to(torch.float32)).contiguous()
    return _impl(backend).flow_sums_bwd(g, v, xi, v_old, v_ref, use_old, use_ref)


@_flow_loss_bwd_op.register_fake
def _(g_loss, coef, v, xi, v_old, v_ref, use_old, use_ref, backend):
    return torch.empty_like(v)


def _flow_loss_setup(ctx, inputs, output):
    v, xi, v_old, v_ref = inputs[:4]
    ctx.save_for_backward(output[2], v, xi, v_old, v_ref)
    ratio_norm, reg, beta, backend = inputs[12], inputs[11], inputs[10], inputs[15]
    ctx.flags = (not ratio_norm, reg != ref.REGS.index("none") and beta > 0, backend)


def _flow_loss_backward(ctx, g_loss, g_metrics, g_coef):
    coef, v, xi, v_old, v_ref = ctx.saved_tensors
    use_old, use_ref, backend = ctx.flags
    dv = _flow_loss_bwd_op(g_loss, coef, v, xi, v_old, v_ref, use_old, use_ref, backend)
    return (dv,) + (None,) * 15


_flow_loss_op.register_autograd(_flow_loss_backward, setup_context=_flow_loss_setup)


# ------------------------------------------------------------------------------------------ public ops

def _device(t):
    return t.device if isinstance(t, Tensor) else None


def _refuse_float64(backend: str, **tensors) -> None:
    for name, t in tensors.items():
        if isinstance(t, Tensor) and t.dtype == torch.float64:
            raise ValueError(f"backend {backend!r} computes in float32 but {name} is float64; "
                             "use backend='torch' for float64")


def sde_step(x_BD: Tensor, v_BD: Tensor, *, a_B, b_B, std_B, noise_BD: Tensor, return_mean: bool = False,
             backend: str = "auto"):
    """One stochastic step x' = a·x + b·v + s·ξ and its mean-over-D log-prob (§3); see
    kernels/reference/flow.py `sde_step` for the contract (shapes [B, ...], per-row a/b/std, float32 outputs,
    NaN log-prob where std == 0). backend: "auto" | "torch" | "triton" | "cuda"."""
    be = resolve_backend(backend, _device(x_BD), op="sde_step")
    if be == "torch":
        return ref.sde_step(x_BD, v_BD, a_B=a_B, b_B=b_B, std_B=std_B, noise_BD=noise_BD, return_mean=return_mean)
    ref.check_sde_step_args(x_BD, v_BD, noise_BD)
    _refuse_float64(be, x_BD=x_BD, v_BD=v_BD, noise_BD=noise_BD, a_B=a_B, b_B=b_B, std_B=std_B)
    B, dev = x_BD.shape[0], x_BD.device
    x = x_BD.reshape(B, -1).float().contiguous()
    v = v_BD.reshape(B, -1)
    v = (v if v.dtype in KERNEL_DTYPES else v.float()).contiguous()
    xi = noise_BD.reshape(B, -1).float().contiguous()
    a, b, s = (per_row(val, B, name, torch.float32, dev).contiguous()
               for name, val in (("a_B", a_B), ("b_B", b_B), ("std_B", std_B)))
    x_next, sq_B, mean = _sde_step_op(x, v, xi, a, b, s, bool(return_mean), be)
    logp_B = ref.logprob_from_sq_mean(sq_B / x.shape[1], s)
    x_next = x_next.view(x_BD.shape)
    if return_mean:
        return x_next, logp_B, mean.view(x_BD.shape)
    return x_next, logp_B


def flow_grpo_loss(*, v_BD: Tensor, xi_BD: Tensor, v_old_BD: Tensor, v_ref_BD: Tensor, adv_B, b_B, std_B, h_B,
                   clip_eps: float = 1e-6, beta: float = 1.5e-5, reg: str = "mse", ratio_norm: bool = True,
                   grad_reweight: bool = False, flow_weight: float = 1.0, clip_eps_lo: float | None = None,
                   clip_eps_hi: float | None = None, latent_kl_norm: str = "project",
                   backend: str = "auto") -> tuple[Tensor, dict[str, Tensor]]:
    """λ·FlowGRPO loss with RatioNorm + β·velocity regulariser (§7–§9, λ = flow_weight), differentiable in v_BD;
    see kernels/reference/flow.py `flow_grpo_loss` for the contract. backend: "auto" | "torch" | "triton" | "cuda".
    Returns (0-dim float32 loss, detached metrics "flow/...")."""
    be = resolve_backend(backend, _device(v_BD), op="flow_grpo_loss")
    kw = dict(adv_B=adv_B, b_B=b_B, std_B=std_B, h_B=h_B, clip_eps=clip_eps, beta=beta, reg=reg,
              ratio_norm=ratio_norm, grad_reweight=grad_reweight, flow_weight=flow_weight, clip_eps_lo=clip_eps_lo,
              clip_eps_hi=clip_eps_hi, latent_kl_norm=latent_kl_norm)
    if be == "torch":
        return ref.flow_grpo_loss(v_BD=v_BD, xi_BD=xi_BD, v_old_BD=v_old_BD, v_ref_BD=v_ref_BD, **kw)
    ref.check_flow_loss_args(v_BD=v_BD, xi_BD=xi_BD, v_old_BD=v_old_BD, v_ref_BD=v_ref_BD, clip_eps=clip_eps,
                             beta=beta, reg=reg, flow_weight=flow_weight, clip_eps_lo=clip_eps_lo,
                             clip_eps_hi=clip_eps_hi, latent_kl_norm=latent_kl_norm)
    _refuse_float64(be, v_BD=v_BD, xi_BD=xi_BD, v_old_BD=v_old_BD, v_ref_BD=v_ref_BD, adv_B=adv_B, b_B=b_B,
                    std_B=std_B, h_B=h_B)
    B, dev = v_BD.shape[0], v_BD.device
    v, v_old, v_ref = (t.reshape(B, -1) for t in (v_BD, v_old_BD.detach(), v_ref_BD.detach()))
    if not (v.dtype == v_old.dtype == v_ref.dtype and v.dtype in KERNEL_DTYPES):
        v, v_old, v_ref = v.float(), v_old.float(), v_ref.float()
    v, v_old, v_ref = v.contiguous(), v_old.contiguous(), v_ref.contiguous()
    xi = xi_BD.detach().reshape(B, -1).float().contiguous()
    use_old = not ratio_norm
    use_ref = reg != "none" and beta > 0
    rows = {name: per_row(val, B, name, torch.float32, dev).contiguous() for name, val in
            (("adv_B", adv_B), ("b_B", b_B), ("std_B", std_B), ("h_B", h_B))}
    if _finalize_impl(_impl(be)) is not None:
        eps_lo, eps_hi = ref.flow_clip_eps(clip_eps, clip_eps_lo, clip_eps_hi)
        loss, metrics, _ = _flow_loss_op(v, xi, v_old, v_ref, *rows.values(), 1.0 - eps_lo, 1.0 + eps_hi,
                                         float(beta), ref.reg_code(reg, latent_kl_norm), bool(ratio_norm),
                                         bool(grad_reweight),
                                         float(flow_weight), be)
        return loss, {name: metrics[i].detach() for i, name in enumerate(ref.FLOW_METRICS)}
    sums_B3 = _flow_sums_op(v, xi, v_old, v_ref, use_old, use_ref, be)
    return ref.flow_loss_from_sums(sums_B3, v.shape[1], **rows, **{k: kw[k] for k in kw if k not in rows})
