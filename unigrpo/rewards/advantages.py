"""Group-normalised GRPO advantages (ALGORITHM.md §5).

Shape legend: B rows (trajectories), G group size (samples per prompt), P = B / G prompts.

Decisions:
- Rows are grouped consecutively: rows [g·G:(g+1)·G] are prompt g's group. B not a multiple of G raises.
- A_i = (r_i − mean_group(r)) / (std + eps), population std (divide by G, not G−1), then clamped to
  [−clip, clip] (clip=None disables the clamp).
- scope="group": std over the group. scope="batch": std of ALL raw rewards of the batch (the mean stays the
  group mean), Flow-GRPO's global-std option. scope="none": centred only, not divided (TRL's
  scale_rewards="none", Dr. GRPO's argument: dividing by the std up-weights near-constant groups).
- std="population" (divide by n, the default, §5) or "sample" (n − 1; TRL's torch.std). A group of one has no
  sample std; it is constant, so its advantage is 0 anyway.
- group_ids (int [B], optional): rows with equal ids form one group, wherever they sit and whatever its size
  (Flow-GRPO's PerPromptStatTracker: one group per prompt string across the batch; `prompt_group_ids` builds
  the ids from the texts). Without it the consecutive rule above holds (and its arithmetic is unchanged).
- A constant group (max == min) gets advantages of exactly 0, whatever the rounding of its mean and
  whatever eps (even eps = 0, which would otherwise give 0/0). `group_has_signal` marks those rows False.
- Math in float64 (B is small); the result has the rewards' floating dtype (float32 for integer rewards).
  With population std and no clamp, each group's advantages have mean 0 and std σ/(σ + eps); for G <= 26
  the clamp at 5 never binds, since |z| <= sqrt(G − 1) for a population z-score.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["group_advantages", "group_has_signal", "prompt_group_ids", "ADV_SCOPES", "ADV_STDS"]

_SCOPES = ("group", "batch", "none")
ADV_SCOPES = _SCOPES
"""How advantages are scaled after centring on the group mean: group std, batch std, or not at all."""
ADV_STDS = ("population", "sample")
"""The std's divisor: n (population) or n − 1 (sample)."""


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


def prompt_group_ids(texts: list[str]) -> Tensor:
    """int64 [B]: rows with the same prompt string share an id (ids in order of first appearance)."""
    first: dict[str, int] = {}
    return torch.tensor([first.setdefault(t, len(first)) for t in texts], dtype=torch.int64)


def _labelled(r_B: Tensor, ids_B: Tensor, scope: str, correction: int) -> tuple[Tensor, Tensor, Tensor]:
    """Groups by label: (centred [B], scale [B] or [] — the std to divide by, constant-group mask [B])."""
    if not isinstance(ids_B, Tensor) or ids_B.shape != r_B.shape or ids_B.dtype.is_floating_point:
        raise ValueError(f"group_ids must be an integer tensor of the rewards' shape {list(r_B.shape)}, "
                         f"got {getattr(ids_B, 'shape', ids_B)!r}")
    _, inv = torch.unique(ids_B.to(r_B.device), return_inverse=True)
    K = int(inv.max()) + 1
    z = r_B.new_zeros(K)
    n = z.index_add(0, inv, torch.ones_like(r_B))
    mean = z.index_add(0, inv, r_B) / n
    centred = r_B - mean[inv]
    hi = torch.full_like(z, -float("inf")).scatter_reduce(0, inv, r_B, "amax")
    lo = torch.full_like(z, float("inf")).scatter_reduce(0, inv, r_B, "amin")
    const = (hi == lo)[inv]
    if scope == "group":
        std = (z.index_add(0, inv, centred * centred) / (n - correction)).sqrt()[inv]
    else:
        std = r_B.std(correction=correction)
    return centred, std, const


def group_advantages(rewards_B: Tensor, group_size: int, *, scope: str = "group", eps: float = 1e-4,
                     clip: float | None = 5.0, std: str = "population", group_ids: Tensor | None = None) -> Tensor:
    """A = (r − mean_group(r)) / (std + eps) (scope "group"/"batch") or r − mean_group(r) ("none"), clamped to
    [−clip, clip]. rewards_B: [B] → adv_B: [B]. group_ids [B] groups rows by label instead of consecutively
    (group_size is then only checked)."""
    if scope not in _SCOPES:
        raise ValueError(f"scope={scope!r} is not supported; expected one of {', '.join(map(repr, _SCOPES))}")
    if std not in ADV_STDS:
        raise ValueError(f"std={std!r} is not supported; expected one of {', '.join(map(repr, ADV_STDS))}")
    if not eps >= 0:
        raise ValueError(f"eps={eps!r} must be >= 0")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip={clip!r} must be > 0 (or None to disable)")
    correction = 0 if std == "population" else 1
    r_PG = _grouped(rewards_B, group_size)
    out_dtype = rewards_B.dtype if rewards_B.dtype.is_floating_point else torch.float32
    if r_PG.numel() == 0:
        return torch.zeros_like(rewards_B, dtype=out_dtype)
    if group_ids is not None:
        r_B = r_PG.reshape(-1)
        centred, scale, const = _labelled(r_B, group_ids, scope, correction)
        adv = centred if scope == "none" else centred / (scale + eps)
        if clip is not None:
            adv = adv.clamp(-clip, clip)
        return torch.where(const, torch.zeros_like(adv), adv).to(out_dtype)
    centered_PG = r_PG - r_PG.mean(dim=1, keepdim=True)
    if scope == "none":
        adv_PG = centered_PG
    else:
        if scope == "group":
            sd = r_PG.std(dim=1, correction=correction, keepdim=True)
        else:
            sd = r_PG.std(correction=correction)
        adv_PG = centered_PG / (sd + eps)
    if clip is not None:
        adv_PG = adv_PG.clamp(-clip, clip)
    adv_PG = torch.where(_constant_P1(r_PG), torch.zeros_like(adv_PG), adv_PG)
    return adv_PG.reshape(-1).to(out_dtype)


def group_has_signal(rewards_B: Tensor, group_size: int, group_ids: Tensor | None = None) -> Tensor:
    """Bool [B]: False on every row of a group whose rewards are all equal (zero std), True otherwise; groups
    by label with group_ids (as in group_advantages)."""
    r_PG = _grouped(rewards_B, group_size)
    if group_ids is not None:
        return ~_labelled(r_PG.reshape(-1), group_ids, "none", 0)[2] if r_PG.numel() else torch.ones(0, dtype=torch.bool)
    return (~_constant_P1(r_PG)).expand_as(r_PG).reshape(-1)
