"""A differentiable surrogate of the shapes verifier, for the ReFL baseline (ALGORITHM.md §11).

The verifier (unigrpo/world/verify.py) segments colours with a hard distance threshold, finds connected
components and classifies shapes: none of that has a gradient. The surrogate keeps the part that does:

1. Soft colour membership. For palette colour c, m_c(pixel) = sigmoid((COLOR_DIST − ‖rgb − c‖) / SOFTNESS),
   rgb in 0..255: ≈ 1 where the hard verifier would label the pixel c, ≈ 0 far from it, smooth in between.
2. Colour mass M_c = Σ_pixels m_c / OBJ², in units of one object box (6 × 6 px).
3. Stray light S = Σ_pixels (1 − Σ_c m_c)·lum / OBJ², lum = mean channel brightness in [0, 1]: light that no
   palette colour explains (dim or mixed colours, texture), which the verifier can only read as noise or
   unknown blobs.
4. The prompt's target masses, from the shapes it asks for (exact rendered areas, shape_mask): the total
   T = Σ_objects area(shape) (× count for counting), and for each colour the prompt names, t_c = the area of
   its objects of that colour.
5. surrogate = 1 − (|Σ_c M_c − T| + Σ_{named c} |M_c − t_c| + S) / (T + Σ_{named c} t_c): 1 when the canvas
   holds exactly the asked-for amount of each asked-for colour on black, 0 for a blank canvas (every prompt);
   it falls for missing objects, for extra ones (unlike the TA-style reward it does not pay for flooding the
   canvas) and for stray light.

What it ignores: shapes (a blob of the right area scores like the right shape) and positions (relations,
separation into distinct objects). And its gradient vanishes on black background (the sigmoid's tail is
≈ e^-10 at distance 255), so gradient ascent can reshape, recolour, dim or remove objects but hardly create
one from nothing. So ReFL optimises a proxy that agrees with the verifier on colours and amounts only;
docs/results.md says what that means for the comparison.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch

from unigrpo.world.layout import OBJ
from unigrpo.world.prompts import COLORS, Prompt
from unigrpo.world.render import shape_mask
from unigrpo.world.verify import COLOR_DIST, expected_objects
from unigrpo.rewards.verifier import shapes_prompts
from unigrpo.rewards.verifier import records_to_prompts

SOFTNESS = 16.0
"""width of the sigmoid edge of the soft colour membership, in RGB distance units (0..441)"""

_PALETTE = tuple(COLORS)


@lru_cache(maxsize=None)
def _shape_area(shape: str) -> float:
    """Rendered area of a shape in units of one object box."""
    return float(shape_mask(shape, OBJ).sum()) / OBJ ** 2


def target_masses(prompt: Prompt) -> tuple[float, dict[str, float]]:
    """(T, {colour: t_c}) for one prompt, in object-box units."""
    per = expected_objects(prompt) // len(prompt.objects)   # counting: one spec, `count` copies
    total, named = 0.0, {}
    for spec in prompt.objects:
        a = _shape_area(spec.shape) * per
        total += a
        if spec.color is not None:
            named[spec.color] = named.get(spec.color, 0.0) + a
    return total, named


def colour_masses(images_B3HW: torch.Tensor, softness: float = SOFTNESS) -> torch.Tensor:
    """Soft colour masses M: [B, C] (C = palette colours, in COLORS order), object-box units.
    images_B3HW: float in [-1, 1] (computed in fp32, or fp64 when given fp64); differentiable."""
    x = images_B3HW.to(torch.promote_types(images_B3HW.dtype, torch.float32))  # fp32, or fp64 for gradcheck
    return _membership(x, softness).sum((2, 3)) / OBJ ** 2


def _membership(x: torch.Tensor, softness: float) -> torch.Tensor:
    """Soft palette membership m_c: [B, C, H, W] of images [B, 3, H, W] in [-1, 1]."""
    rgb = (x + 1.0) * 127.5                                                     # 0..255
    pal = torch.tensor([COLORS[c] for c in _PALETTE], dtype=rgb.dtype, device=rgb.device)  # [C, 3]
    d2 = ((rgb[:, None] - pal[None, :, :, None, None]) ** 2).sum(2)             # [B, C, H, W]
    return torch.sigmoid((COLOR_DIST - torch.sqrt(d2 + 1e-6)) / softness)


def stray_light(images_B3HW: torch.Tensor, softness: float = SOFTNESS) -> torch.Tensor:
    """S: [B], light no palette colour explains, object-box units (module docstring, step 3)."""
    x = images_B3HW.to(torch.promote_types(images_B3HW.dtype, torch.float32))
    lum = ((x + 1.0) / 2.0).clamp(min=0.0).mean(1)                              # [B, H, W]
    explained = _membership(x, softness).sum(1)                                 # [B, H, W]
    return ((1.0 - explained) * lum).sum((1, 2)) / OBJ ** 2


def surrogate_reward(images_B3HW: torch.Tensor, prompts: Sequence[Prompt], softness: float = SOFTNESS) -> torch.Tensor:
    """The differentiable surrogate (module docstring): float32 [B], at most 1."""
    if images_B3HW.dim() != 4 or images_B3HW.shape[1] != 3 or images_B3HW.shape[0] != len(prompts):
        raise ValueError(f"expected images [B, 3, H, W] with B = {len(prompts)} prompts, got "
                         f"{tuple(images_B3HW.shape)}")
    M = colour_masses(images_B3HW, softness)                                   # [B, C]
    B, C = M.shape
    T = torch.empty(B, dtype=M.dtype, device=M.device)
    t = torch.zeros(B, C, dtype=M.dtype, device=M.device)
    named = torch.zeros(B, C, dtype=M.dtype, device=M.device)
    for i, p in enumerate(prompts):
        total, per_colour = target_masses(p)
        T[i] = total
        for c, a in per_colour.items():
            t[i, _PALETTE.index(c)] = a
            named[i, _PALETTE.index(c)] = 1.0
    err = (M.sum(1) - T).abs() + (named * (M - t).abs()).sum(1) + stray_light(images_B3HW, softness)
    return 1.0 - err / (T + t.sum(1))


def surrogate_reward_of(images_B3HW: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict],
                        softness: float = SOFTNESS) -> torch.Tensor:
    """surrogate_reward for prompt texts with their GenEval metadata (what the trainer holds)."""
    return surrogate_reward(images_B3HW, shapes_prompts(prompts, metadata), softness)


def check_surrogate_records(records) -> None:
    """The surrogate scores only shapes-world prompts: fail up front, naming the first other one's line."""
    records_to_prompts(records)
