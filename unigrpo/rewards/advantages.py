"""Group-normalised GRPO advantages (ALGORITHM.md §5).

Shape legend: B rows (trajectories), G group size (samples per prompt), P = B / G prompts.

Decisions:
- Rows are grouped consecutively: rows [g·G:(g+1)·G] are prompt g's group. B not a multiple of G raises.
- A_i = (r_i − mean_group(r)) / (std + eps), population std (divide by G, not G−1), then clamped to
  [−clip, clip] (clip=None disables the clamp).
- scope="group": std over the group. scope="batch": std of ALL raw rewards of the batch (the mean stays the
  group mean), Flow-GRPO's global-std option.
- A constant group (max == min) gets advantages of exactly 0, whatever the rounding of its mean and
  whatever eps (even eps = 0, which would otherwise give 0/0). `group_has_signal` marks those rows False.
- Math in float64 (B is small); the result has the rewards' floating dtype (float32 for integer rewards).
  With population std and no clamp, each group's advantages have mean 0 and std σ/(σ + eps); for G <= 26
  the clamp at 5 never binds, since |z| <= sqrt(G − 1) for a population z-score.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["group_advantages", "group_has_signal"]

_SCOPES = ("group", "batch")


def _grouped(rewards_B: Tensor, group_size: int) -> Tensor:
    """rewards [B] → float64 [P, G], validating shapes."""
    if not isinstance(rewards_B, Tensor) or rewards_B.dim() != 1:
        raise ValueError(f"rewards_B must be a 1-D tensor [B], got {getattr(rewards_B, 'shape', rewards_B)}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be an int >= 1")
    B = rewards_B.shape[0]
    if B % group_size != 0:
        raise ValueError(f"batch size B={B} is not a multiple of group_size G={group_size}")
    return rewards_B.detach().to(torch.float64).reshape(B // group_size, group_size)


def _constant_P1(r_PG: Tensor) -> Tensor:
    """Bool [P, 1]: the group's rewards are all equal (zero std, no signal)."""
    return (r_PG.amax(dim=1, keepdim=True) == r_PG.amin(dim=1, keepdim=True))


def group_advantages(rewards_B: Tensor, group_size: int, *, scope: str = "group", eps: float = 1e-4,
                     clip: float | None = 5.0) -> Tensor:
    """A = (r − mean_group(r)) / (std + eps), clamped to [−clip, clip]. rewards_B: [B] → adv_B: [B]."""
    if scope not in _SCOPES:
        raise ValueError(f"scope={scope!r} is not supported; expected one of {', '.join(map(repr, _SCOPES))}")
    if not eps >= 0:
        raise ValueError(f"eps={eps!r} must be >= 0")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip={clip!r} must be > 0 (or None to disable)")
    r_PG = _grouped(rewards_B, group_size)
    out_dtype = rewards_B.dtype if rewards_B.dtype.is_floating_point else torch.float32
    if r_PG.numel() == 0:
        return torch.zeros_like(rewards_B, dtype=out_dtype)
    centered_PG = r_PG - r_PG.mean(dim=1, keepdim=True)
    if scope == "group":
        std = r_PG.std(dim=1, correction=0, keepdim=True)
    else:
        std = r_PG.std(correction=0)
    adv_PG = centered_PG / (std + eps)
    if clip is not None:
        adv_PG = adv_PG.clamp(-clip, clip)
    adv_PG = torch.where(_constant_P1(r_PG), torch.zeros_like(adv_PG), adv_PG)
    return adv_PG.reshape(-1).to(out_dtype)


def group_has_signal(rewards_B: Tensor, group_size: int) -> Tensor:
    """Bool [B]: False on every row of a group whose rewards are all equal (zero std), True otherwise."""
    r_PG = _grouped(rewards_B, group_size)
    return (~_constant_P1(r_PG)).expand_as(r_PG).reshape(-1)
