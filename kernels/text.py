"""The public text ops with backend dispatch (ALGORITHM.md §6): `token_logprobs`, `text_grpo_loss` and the
fused `linear_text_grpo_loss` (hidden states → per-token log-probs → GRPO loss in one call).

backend="torch" runs the reference (kernels/reference/text.py) unchanged. backend="triton" runs the fused
log-prob kernels of kernels/triton/token.py (never holding the [T, V] logits) behind two
`torch.library.custom_op`s, so the op traces under torch.compile and autograd reaches the kernels' backward:

    unigrpo_kernels::token_logprobs_fwd  hidden, weight, targets, τ, with_entropy, bias? → logp, entropy (or
                                         an empty tensor), lse                    [T] fp32 each
    unigrpo_kernels::token_logprobs_bwd  g_logp, g_entropy?, hidden, weight, targets, lse, entropy?, τ,
                                         need_dh, need_dw, bias?, need_db → dH (hidden's dtype), dW (weight's
                                         dtype), dbias (the bias's dtype; empty tensors where not needed)

Shape legend: T scored tokens, H hidden, V vocabulary, B sequences, L padded tokens per sequence.

Decisions:
- text_grpo_loss has no kernel of its own: its "triton" backend runs the reference math on the [B, L]
  log-probs. The per-token work is O(B·L) elementwise (~10⁴–10⁵ elements per step, well under 0.1% of the
  6·T·H·V flops of the log-prob backward next to it), so a kernel would only save launch latency, and
  torch.compile fuses these elementwise ops where the trainer compiles. The formula lives once.
- linear_text_grpo_loss is the composition token_logprobs → scatter into [B, L] → text_grpo_loss. The loss
  gradient w.r.t. each log-prob is elementwise, so autograd hands the kernels' backward exactly the
  per-token upstream g_t; nothing of size T·V exists in the forward or the backward. That holds for every
  loss option (issue 20: GSPO's sequence ratio, the bias-corrected KL, the "global_token" normaliser are all
  [B, L] math on the log-probs), and for the optional lm_head bias, which the kernels add tile by tile.
- The triton path computes in fp32 (bf16/fp16 inputs read as such, fp32 accumulation) and refuses float64
  inputs (use backend="torch" there). Its log-probs are fp32; dH and dW come back in the dtypes of hidden
  and weight. Targets are not range-checked on the device (that would be a host sync): out-of-range ids give
  a wrong log-prob instead of an error; the torch backend raises.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .dispatch import resolve_backend
from .reference import text as ref

__all__ = ["token_logprobs", "text_grpo_loss", "linear_text_grpo_loss"]


def _kernels():
    from .triton import token   # lazy: importing unigrpo_kernels never needs triton
    return token


# ----------------------------------------------------------------------------------------- custom ops

@torch.library.custom_op("unigrpo_kernels::token_logprobs_fwd", mutates_args=())
def _token_fwd_op(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float,
                  with_entropy: bool, bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    logp, ent, lse = _kernels().token_forward(hidden, weight, targets, temperature, with_entropy, bias)
    return logp, ent if ent is not None else logp.new_empty(0), lse


@_token_fwd_op.register_fake
def _(hidden, weight, targets, temperature, with_entropy, bias=None):
    T = hidden.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    return hidden.new_empty(T, **f32), hidden.new_empty(T if with_entropy else 0, **f32), hidden.new_empty(T, **f32)


@torch.library.custom_op("unigrpo_kernels::token_logprobs_bwd", mutates_args=())
def _token_bwd_op(grad_logp: Tensor, grad_entropy: Optional[Tensor], hidden: Tensor, weight: Tensor,
                  targets: Tensor, lse: Tensor, entropy: Optional[Tensor], temperature: float, need_dh: bool,
                  need_dw: bool, bias: Optional[Tensor] = None, need_db: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    dh, dw, db = _kernels().token_backward(grad_logp, grad_entropy, hidden, weight, targets, lse, entropy,
                                           temperature, need_dh, need_dw, bias, need_db)
    return ((dh if dh is not None else hidden.new_empty(0)), (dw if dw is not None else weight.new_empty(0)),
            (db if db is not None else hidden.new_empty(0)))


@_token_bwd_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, targets, lse, entropy, temperature, need_dh, need_dw, bias=None,
      need_db=False):
    return (torch.empty_like(hidden) if need_dh else hidden.new_empty(0),
            torch.empty_like(weight) if need_dw else weight.new_empty(0),
            torch.empty_like(bias) if need_db else hidden.new_empty(0))


def _token_setup_context(ctx, inputs, output):
    hidden, weight, targets, temperature, with_entropy = inputs[:5]
    bias = inputs[5] if len(inputs) > 5 else None
    _, ent, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)     # an unused entropy output skips the entropy term (None, not zeros)
    ctx.save_for_backward(hidden, weight, targets, lse, ent, bias)
    ctx.temperature = temperature
    ctx.with_entropy = with_entropy


def _token_backward(ctx, g_logp, g_ent, g_lse):
    """The autograd Function's backward: only calls the backward op. Grads arrive as None when unused."""
    hidden, weight, targets, lse, ent, bias = ctx.saved_tensors
    need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_db = bias is not None and len(ctx.needs_input_grad) > 5 and ctx.needs_input_grad[5]
    if not (need_dh or need_dw or need_db):
        return None, None, None, None, None, None
    if g_logp is None:
        g_logp = lse.new_zeros(lse.shape)
    use_ent = ctx.with_entropy and g_ent is not None
    dh, dw, db = _token_bwd_op(g_logp, g_ent if use_ent else None, hidden, weight, targets, lse,
                               ent if use_ent else None, ctx.temperature, need_dh, need_dw, bias, need_db)
    return dh if need_dh else None, dw if need_dw else None, None, None, None, db if need_db else None


_token_fwd_op.register_autograd(_token_backward, setup_context=_token_setup_context)


# ------------------------------------------------------------------------------------------ public ops

def token_logprobs(hidden_TH: Tensor, weight_VH: Tensor, targets_T: Tensor, *, temperature: float = 1.0,
                   return_entropy: bool = False, bias_V: Tensor | None = None, backend: str = "auto"):
    """log softmax((hidden·Wᵀ + bias)/τ) at the targets. hidden_TH [T, H], weight_VH [V, H], targets_T int [T]
    in [0, V), bias_V [V] or None (an lm_head bias). Returns logp_T [T] (and entropy_T [T] with
    return_entropy), fp32 (float64 on the torch backend with a float64 input); differentiable in hidden,
    weight and bias. backend: "auto" | "torch" | "triton"."""
    be = resolve_backend(backend, hidden_TH.device if isinstance(hidden_TH, Tensor) else None, op="token_logprobs")
    if be == "torch":
        return ref.token_logprobs(hidden_TH, weight_VH, targets_T, temperature=temperature,
                                  return_entropy=return_entropy, bias_V=bias_V)
    ref.check_token_args(hidden_TH, weight_VH, targets_T, temperature, bias_V)
    if bias_V is None:      # the unbiased op call, exactly as before the bias existed
        logp, ent, _ = _token_fwd_op(hidden_TH, weight_VH, targets_T, float(temperature), bool(return_entropy))
    else:
        logp, ent, _ = _token_fwd_op(hidden_TH, weight_VH, targets_T, float(temperature), bool(return_entropy),
                                     bias_V)
    return (logp, ent) if return_entropy else logp


def text_grpo_loss(*, logp_BL: Tensor, old_logp_BL: Tensor, adv_B, mask_BL: Tensor, eps_lo: float = 0.2,
                   eps_hi: float = 0.2, aggregation: str = "sequence", ref_logp_BL: Tensor | None = None,
                   kl_coef: float = 0.0, max_len: int | None = None, global_tokens: float | None = None,
                   ratio_level: str = "token", kl_bias_correction: bool = False,
                   backend: str = "auto") -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO loss on reasoning tokens (§6); arguments, return and metrics exactly as the reference
    `text_grpo_loss`. Both backends run the reference math (see the file docstring)."""
    resolve_backend(backend, logp_BL.device if isinstance(logp_BL, Tensor) else None, op="text_grpo_loss")
    return ref.text_grpo_loss(logp_BL=logp_BL, old_logp_BL=old_logp_BL, adv_B=adv_B, mask_BL=mask_BL,
                              eps_lo=eps_lo, eps_hi=eps_hi, aggregation=aggregation, ref_logp_BL=ref_logp_BL,
                              kl_coef=kl_coef, max_len=max_len, global_tokens=global_tokens,
                              ratio_level=ratio_level, kl_bias_correction=kl_bias_correction)


def linear_text_grpo_loss(hidden_TH: Tensor, weight_VH: Tensor, targets_T: Tensor, *, slot_T: Tensor | None,
                          old_logp_BL: Tensor, adv_B, mask_BL: Tensor, temperature: float = 1.0,
                          eps_lo: float = 0.2, eps_hi: float = 0.2, aggregation: str = "sequence",
                          ref_logp_BL: Tensor | None = None, kl_coef: float = 0.0, max_len: int | None = None,
                          global_tokens: float | None = None, ratio_level: str = "token",
                          kl_bias_correction: bool = False, bias_V: Tensor | None = None,
                          return_logp: bool = False, backend: str = "auto"):
    """GRPO text loss straight from the hidden states: token_logprobs → [B, L] → text_grpo_loss, one call.

    hidden_TH [T, H]: the hidden state predicting each scored token (e.g. hidden[text_pos]); weight_VH [V, H]
    (the lm_head) and bias_V [V] or None (its bias, if it has one); targets_T int [T]; slot_T long [T]: flat
    index b·L + l of each token in the [B, L] grid of old_logp_BL / mask_BL / ref_logp_BL (the trainer's
    `text_slot`), or None when T == B·L in row-major order. Grid positions no token fills read log-prob 0 and
    must be masked (mask_BL == 0); every real position must be filled exactly once. The other arguments are
    text_grpo_loss's.
    Returns (loss, metrics), plus the detached logp_BL [B, L] with return_logp (for the trainer's own
    metrics). Differentiable in hidden, weight and bias."""
    if not isinstance(old_logp_BL, Tensor) or old_logp_BL.dim() != 2:
        raise ValueError(f"old_logp_BL must be a 2-D tensor [B, L], got {getattr(old_logp_BL, 'shape', old_logp_BL)}")
    B, L = old_logp_BL.shape
    logp_T = token_logprobs(hidden_TH, weight_VH, targets_T, temperature=temperature, bias_V=bias_V,
                            backend=backend)
    T = logp_T.shape[0]
    if slot_T is None:
        if T != B * L:
            raise ValueError(f"slot_T=None needs T == B·L, got T={T} and [B, L]={[B, L]}")
        logp_BL = logp_T.view(B, L)
    else:
        if not isinstance(slot_T, Tensor) or slot_T.shape != (T,) or slot_T.dtype.is_floating_point:
            raise ValueError(f"slot_T must be an integer tensor [T={T}], got {getattr(slot_T, 'shape', slot_T)}")
        logp_BL = logp_T.new_zeros(B * L).index_copy(0, slot_T.to(logp_T.device, torch.long), logp_T).view(B, L)
    loss, metrics = text_grpo_loss(logp_BL=logp_BL, old_logp_BL=old_logp_BL, adv_B=adv_B, mask_BL=mask_BL,
                                   eps_lo=eps_lo, eps_hi=eps_hi, aggregation=aggregation, ref_logp_BL=ref_logp_BL,
                                   kl_coef=kl_coef, max_len=max_len, global_tokens=global_tokens,
                                   ratio_level=ratio_level, kl_bias_correction=kl_bias_correction,
                                   backend=backend)
    if return_logp:
        return loss, metrics, logp_BL.detach()
    return loss, metrics
