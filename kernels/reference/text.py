"""Reference (torch backend) math of the text ops: token log-probs (+ entropy) from hidden states and the
lm_head weight, and the GRPO token loss (ALGORITHM.md §6). The spec in code: any device, float64-capable.

Shape legend:
    T   tokens (flattened)          H   hidden size          V   vocabulary size
    B   sequences (trajectories)    L   padded tokens per sequence

Decisions:
- token_logprobs MATERIALISES the [T, V] logits: this is the reference; fused backends must not. Math in
  float32 (float64 if hidden or weight is float64); bf16 inputs are cast up before the matmul.
  targets must be valid ids in [0, V); callers mask padding afterwards (no ignore_index here).
- Entropy of softmax(z), z = logits/τ, is computed as logsumexp(z) − Σ softmax(z)·z (no 0·log 0 NaNs).
- text_grpo_loss: per-token term −min(ρA, clip(ρ, 1−ε_lo, 1+ε_hi)A) (+ kl_coef·k3 when enabled), with
  ρ = exp(logp − old). Padding never counts: the log-ratio (and the KL log-difference) is replaced by 0 at
  masked positions BEFORE exp, so garbage (even ±inf) in padding changes neither the loss nor any gradient.
  mask_BL: bool or numeric, nonzero = real token.
- Aggregations (one normaliser each, applied identically to the policy term and the KL term):
    "sequence": mean over sequences of per-sequence token means; a fully masked row contributes 0 and is
                NOT counted in the number of sequences (all rows masked ⇒ loss 0);
    "token":    sum over all real tokens / total real tokens (0 real tokens ⇒ loss 0);
    "constant": sum / (B·L_max) with L_max = max_len or L (max_len must be >= L);
    "global":   sum / global_tokens, a token count the caller fixes for the whole generation batch (DAPO:
                completion tokens across mini-batches and ranks), so micro- and mini-batch losses just add.
- ratio_level="sequence" (GSPO): one ratio per sequence s_i = exp(mean_t(logp − old)) over its real tokens,
  clipped with the same eps_lo / eps_hi (GSPO's ranges are ~1e-4: the caller passes them), and the per-token
  term −min(s_i·A, clip(s_i)·A) is broadcast to the real tokens of row i, then aggregated as above ("sequence"
  gives GSPO's −mean_i min(s_i·A_i, clip(s_i)·A_i)). ratio metrics are then over sequences with a real token.
- LOSS_TYPES maps the peers' loss_type names to (aggregation, ratio_level): grpo = per-sequence mean then
  mean ("sequence"), bnpo = tokens of the local mini-batch ("token"), dr_grpo = ÷ batch × max completion
  length ("constant"), dapo = ÷ completion tokens of the generation batch ("global"), gspo = sequence ratio.
- KL: k3 = exp(ref − θ) − (ref − θ) − 1 per token; needs ref_logp_BL when kl_coef > 0. "text/kl" is the
  k3 aggregated like the loss, so loss = "text/policy_loss" + kl_coef·"text/kl". kl_bias_correction (TRL's
  use_bias_correction_kl, DeepSeek-V3.2) multiplies each token's k3 by that token's importance weight (ρ_{i,t},
  or s_i with ratio_level="sequence") WITHOUT detaching it, as TRL does: the KL term's gradient then has a
  k3·∂ρ part too. "text/kl_token_mean" is the (corrected, if asked) per-token KL averaged over all real tokens
  of the batch, whatever the aggregation: the number TRL logs as "kl".
- Differentiable in logp_BL only; old_logp_BL, ref_logp_BL and adv_B are detached.
- Metrics over real tokens only: "text/ratio_mean|max|min" (1 when there is no real token),
  "text/clip_frac" (fraction where the clipped branch is strictly selected, i.e. the gradient is zeroed),
  "text/policy_loss", "text/kl" and "text/kl_token_mean" (if ref given). All detached 0-dim tensors (no host
  sync).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .common import check_choice, clip_active, clipped_surrogate, compute_dtype, per_row

__all__ = ["token_logprobs", "text_grpo_loss", "k3_kl", "check_token_args", "AGGREGATIONS", "RATIO_LEVELS",
           "LOSS_TYPES"]

_AGGREGATIONS = ("sequence", "token", "constant", "global")
AGGREGATIONS = _AGGREGATIONS
RATIO_LEVELS = ("token", "sequence")
LOSS_TYPES = {"grpo": ("sequence", "token"), "bnpo": ("token", "token"), "dr_grpo": ("constant", "token"),
              "dapo": ("global", "token"), "gspo": ("sequence", "sequence")}
"""Peer loss_type names (TRL, DAPO, Dr. GRPO, GSPO) → (aggregation, ratio_level)."""


def check_token_args(hidden_TH, weight_VH, targets_T, temperature, bias_V=None) -> None:
    """The argument checks of token_logprobs, shared by every backend (ValueError naming the bad value)."""
    if not isinstance(hidden_TH, Tensor) or hidden_TH.dim() != 2:
        raise ValueError(f"hidden_TH must be a 2-D tensor [T, H], got {getattr(hidden_TH, 'shape', hidden_TH)}")
    T, H = hidden_TH.shape
    if not isinstance(weight_VH, Tensor) or weight_VH.dim() != 2 or weight_VH.shape[1] != H:
        raise ValueError(f"weight_VH must be a 2-D tensor [V, H={H}], got {getattr(weight_VH, 'shape', weight_VH)}")
    if (not isinstance(targets_T, Tensor) or targets_T.shape != (T,) or targets_T.dtype.is_floating_point
            or targets_T.dtype == torch.bool):
        raise ValueError(f"targets_T must be an integer tensor [T={T}], got {getattr(targets_T, 'shape', targets_T)}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature={temperature!r} must be finite and > 0")
    if weight_VH.shape[0] < 1:
        raise ValueError("weight_VH must have at least one vocabulary row")
    if bias_V is not None and (not isinstance(bias_V, Tensor) or bias_V.shape != (weight_VH.shape[0],)
                               or not bias_V.dtype.is_floating_point):
        raise ValueError(f"bias_V must be None or a floating tensor [V={weight_VH.shape[0]}], got "
                         f"{getattr(bias_V, 'shape', bias_V)}")


def token_logprobs(hidden_TH: Tensor, weight_VH: Tensor, targets_T: Tensor, *, temperature: float = 1.0,
                   return_entropy: bool = False, bias_V: Tensor | None = None):
    """log softmax((hidden·Wᵀ + bias)/τ) at the targets. hidden_TH [T, H], weight_VH [V, H], targets_T int [T],
    bias_V [V] or None (an lm_head with a bias). Returns logp_T [T] (and entropy_T [T] with return_entropy) in
    float32 (float64 if an input is)."""
    check_token_args(hidden_TH, weight_VH, targets_T, temperature, bias_V)
    dt = compute_dtype(hidden_TH, weight_VH, bias_V)
    logits_TV = hidden_TH.to(dt) @ weight_VH.to(dt).t()
    if bias_V is not None:
        logits_TV = logits_TV + bias_V.to(dt)
    z_TV = logits_TV / temperature
    logp_TV = torch.log_softmax(z_TV, dim=-1)
    logp_T = logp_TV.gather(1, targets_T.long()[:, None])[:, 0]
    if not return_entropy:
        return logp_T
    entropy_T = torch.logsumexp(z_TV, dim=-1) - (logp_TV.exp() * z_TV).sum(dim=-1)
    return logp_T, entropy_T


def k3_kl(logp_BL: Tensor, ref_logp_BL: Tensor) -> Tensor:
    """k3 estimator of KL(π_θ || π_ref) per token: exp(ref − θ) − (ref − θ) − 1 (>= 0). Same shape."""
    d = ref_logp_BL - logp_BL
    return torch.exp(d) - d - 1.0


def _aggregate(x_BL: Tensor, mask_BL: Tensor, aggregation: str, max_len: int | None,
               global_tokens: float | None = None) -> Tensor:
    """Reduce a per-token quantity (already 0 at padding) to a scalar with the chosen normaliser."""
    B, L = x_BL.shape
    if aggregation == "sequence":
        n_B = mask_BL.sum(dim=1)
        per_seq_B = x_BL.sum(dim=1) / n_B.clamp(min=1)
        return per_seq_B.sum() / (n_B > 0).sum().clamp(min=1)
    if aggregation == "token":
        return x_BL.sum() / mask_BL.sum().clamp(min=1)
    if aggregation == "global":
        return x_BL.sum() / max(float(global_tokens), 1.0)
    return x_BL.sum() / (B * (max_len if max_len is not None else L))


def text_grpo_loss(*, logp_BL: Tensor, old_logp_BL: Tensor, adv_B, mask_BL: Tensor, eps_lo: float = 0.2,
                   eps_hi: float = 0.2, aggregation: str = "sequence", ref_logp_BL: Tensor | None = None,
                   kl_coef: float = 0.0, max_len: int | None = None, global_tokens: float | None = None,
                   ratio_level: str = "token",
                   kl_bias_correction: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO loss on reasoning tokens (§6).

    logp_BL (grad), old_logp_BL, mask_BL, ref_logp_BL: [B, L]; adv_B: number or [B].
        loss = agg(−min(ρA, clip(ρ, 1−ε_lo, 1+ε_hi)A)) + kl_coef·agg(k3 [·ρ]),  ρ = exp(logp − old)
    agg is "sequence" | "token" | "constant" | "global"; ρ is per token or, with ratio_level="sequence", s_i;
    [·ρ] with kl_bias_correction (see the file docstring). Returns a 0-dim loss in float32
    (float64 if any input is) and detached metrics "text/...".
    """
    check_choice("aggregation", aggregation, _AGGREGATIONS)
    check_choice("ratio_level", ratio_level, RATIO_LEVELS)
    if (aggregation == "global") != (global_tokens is not None):
        raise ValueError(f"global_tokens={global_tokens!r} is needed by, and only by, aggregation='global' "
                         f"(got aggregation={aggregation!r})")
    if global_tokens is not None and not (global_tokens >= 0 and math.isfinite(global_tokens)):
        raise ValueError(f"global_tokens={global_tokens!r} must be a finite count >= 0")
    if not isinstance(logp_BL, Tensor) or logp_BL.dim() != 2:
        raise ValueError(f"logp_BL must be a 2-D tensor [B, L], got {getattr(logp_BL, 'shape', logp_BL)}")
    B, L = logp_BL.shape
    for name, t in (("old_logp_BL", old_logp_BL), ("mask_BL", mask_BL), ("ref_logp_BL", ref_logp_BL)):
        if t is None and name == "ref_logp_BL":
            continue
        if not isinstance(t, Tensor) or t.shape != logp_BL.shape:
            raise ValueError(f"{name} must have the shape of logp_BL {[B, L]}, got {getattr(t, 'shape', t)}")
    for name, e in (("eps_lo", eps_lo), ("eps_hi", eps_hi)):
        if not (e >= 0 and math.isfinite(e)):
            raise ValueError(f"{name}={e!r} must be finite and >= 0")
    if not (kl_coef >= 0 and math.isfinite(kl_coef)):
        raise ValueError(f"kl_coef={kl_coef!r} must be finite and >= 0")
    if kl_coef > 0 and ref_logp_BL is None:
        raise ValueError(f"kl_coef={kl_coef!r} > 0 needs ref_logp_BL, got None")
    if max_len is not None and (not isinstance(max_len, int) or max_len < L):
        raise ValueError(f"max_len={max_len!r} must be an int >= L={L} (or None)")
    if max_len is not None and aggregation != "constant":
        raise ValueError(f"max_len={max_len!r} is only used by aggregation='constant', got {aggregation!r}")

    dev = logp_BL.device
    dt = compute_dtype(logp_BL, old_logp_BL, adv_B, ref_logp_BL)
    mask = mask_BL.detach() != 0
    maskf = mask.to(dt)
    adv = per_row(adv_B, B, "adv_B", dt, dev)[:, None]
    logp = logp_BL.to(dt)
    zero = torch.zeros((), dtype=dt, device=dev)

    log_ratio = torch.where(mask, logp - old_logp_BL.detach().to(dt), zero)
    if ratio_level == "sequence":                  # GSPO: s_i = exp(mean_t log ratio), broadcast to the tokens
        seq_B1 = log_ratio.sum(dim=1, keepdim=True) / maskf.sum(dim=1, keepdim=True).clamp(min=1)
        log_ratio = torch.where(mask, seq_B1.expand(B, L), zero)
    ratio = torch.exp(log_ratio)
    term = torch.where(mask, -clipped_surrogate(ratio, adv, eps_lo, eps_hi), zero)
    policy_loss = _aggregate(term, maskf, aggregation, max_len, global_tokens)
    loss = policy_loss

    metrics: dict[str, Tensor] = {"text/policy_loss": policy_loss}
    if ref_logp_BL is not None:
        kl_tok = torch.where(mask, k3_kl(torch.where(mask, logp, zero),
                                         torch.where(mask, ref_logp_BL.detach().to(dt), zero)), zero)
        if kl_bias_correction:                 # TRL: k3 × the (not detached) importance weight
            kl_tok = kl_tok * ratio
        kl = _aggregate(kl_tok, maskf, aggregation, max_len, global_tokens)
        metrics["text/kl"] = kl
        metrics["text/kl_token_mean"] = kl_tok.sum() / maskf.sum().clamp(min=1)
        if kl_coef > 0:
            loss = loss + kl_coef * kl

    with torch.no_grad():
        n_tok = maskf.sum().clamp(min=1)
        big = torch.finfo(dt).max
        one = torch.ones((), dtype=dt, device=dev)
        any_tok = mask.any()                       # no real token: the ratio metrics read a neutral 1
        metrics["text/ratio_mean"] = torch.where(any_tok, (ratio * maskf).sum() / n_tok, one)
        metrics["text/ratio_max"] = torch.where(any_tok, torch.where(mask, ratio, -big).amax(), one) \
            if ratio.numel() else one
        metrics["text/ratio_min"] = torch.where(any_tok, torch.where(mask, ratio, big).amin(), one) \
            if ratio.numel() else one
        metrics["text/clip_frac"] = (clip_active(ratio, adv, eps_lo, eps_hi) & mask).to(dt).sum() / n_tok
    return loss, {k: m.detach() for k, m in metrics.items()}
