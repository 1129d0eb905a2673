"""Helpers shared by the reference ops: the PPO clipped surrogate, its clip mask, dtype and row checks.

Shape legend: B rows (samples, or (trajectory, window step) pairs, or sequences); L tokens per row.

Decisions:
- Compute dtype: float64 if any floating input is float64, else float32. bf16/fp16 inputs are cast up
  (ALGORITHM.md §3: bf16 overflows in these formulas), and float64 stays float64 so tests can check the
  math in float64.
- The PPO surrogate min(r·A, clip(r, 1−ε_lo, 1+ε_hi)·A) lives here once and serves both the text loss
  (§6) and the flow loss (§7). It is written literally with torch.minimum; away from the kinks its
  gradient is A·∂r where the unclipped branch is the minimum and exactly 0 where the clipped one is.
- `clip_active` is the mask of elements where the clipped branch is strictly selected (the gradient is
  zeroed): (A > 0 and r > 1+ε_hi) or (A < 0 and r < 1−ε_lo). It is what the `*/clip_frac` metrics count.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["compute_dtype", "clipped_surrogate", "clip_active", "per_row", "check_choice"]


def compute_dtype(*tensors) -> torch.dtype:
    """float64 if any floating tensor among `tensors` is float64, else float32 (Nones/numbers ignored)."""
    for t in tensors:
        if isinstance(t, Tensor) and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def check_choice(name: str, value, allowed: tuple) -> None:
    """Raise ValueError naming `value` and the allowed values when `value` is not one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {', '.join(map(repr, allowed))}")


def per_row(value, B: int, name: str, dtype: torch.dtype, device) -> Tensor:
    """A per-row scalar as a detached [B] tensor of `dtype`: accepts a Python number, a 0-dim tensor or a [B]
    tensor. Raises ValueError for any other shape."""
    if isinstance(value, Tensor):
        if value.dim() == 0:
            return value.detach().to(device=device, dtype=dtype).expand(B)
        if value.shape != (B,):
            raise ValueError(f"{name} must have shape [B]=[{B}] (or be a scalar), got {list(value.shape)}")
        return value.detach().to(device=device, dtype=dtype)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((B,), float(value), dtype=dtype, device=device)
    raise ValueError(f"{name} must be a number or a tensor of shape [B]=[{B}], got {type(value).__name__}")


def clipped_surrogate(ratio: Tensor, adv: Tensor, eps_lo: float, eps_hi: float) -> Tensor:
    """PPO objective per element: min(ratio·adv, clip(ratio, 1−eps_lo, 1+eps_hi)·adv); same shape as ratio
    (adv broadcasts). To be maximised (losses negate it)."""
    clipped = ratio.clamp(1.0 - eps_lo, 1.0 + eps_hi)
    return torch.minimum(ratio * adv, clipped * adv)


def clip_active(ratio: Tensor, adv: Tensor, eps_lo: float, eps_hi: float) -> Tensor:
    """Bool mask, shape of ratio: the clipped branch is strictly the minimum there (zero gradient)."""
    return ((adv > 0) & (ratio > 1.0 + eps_hi)) | ((adv < 0) & (ratio < 1.0 - eps_lo))
