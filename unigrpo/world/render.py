"""The renderer: a layout drawn as a hard-edged RGB image on a black canvas.

Decisions: a pixel belongs to a shape when its centre lies inside the shape's outline within the object's
box (circle = disc inscribed in the box, square = the box, triangle = upward isosceles triangle with its
apex at the top middle and its base along the bottom edge; its half-width is taken at the bottom of each
pixel row so the apex row is drawn and the triangle spans the whole box). No anti-aliasing, so every pixel is either
black or an exact palette colour. Parts of an object outside the canvas are clipped; later objects paint
over earlier ones. Model-space images are float32 [B, 3, H, W] in [-1, 1].
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from unigrpo.world.layout import CANVAS, OBJ, Layout, center_px
from unigrpo.world.prompts import COLORS


@lru_cache(maxsize=None)
def shape_mask(shape: str, obj: int = OBJ) -> np.ndarray:
    """bool [obj, obj]: the pixels a shape covers inside its box."""
    c = (np.arange(obj) + 0.5) / obj  # pixel centres in box units
    v, u = np.meshgrid(c, c, indexing="ij")
    if shape == "square":
        m = np.ones((obj, obj), bool)
    elif shape == "circle":
        m = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    elif shape == "triangle":
        m = np.abs(u - 0.5) <= (v + 0.5 / obj) / 2
    else:
        raise ValueError(f"unknown shape {shape!r}")
    m.flags.writeable = False
    return m


def render(layout: Layout, canvas: int = CANVAS, obj: int = OBJ) -> np.ndarray:
    """uint8 [canvas, canvas, 3]."""
    img = np.zeros((canvas, canvas, 3), np.uint8)
    for o in layout:
        top, left = center_px(o.y) - obj // 2, center_px(o.x) - obj // 2
        y0, y1 = max(top, 0), min(top + obj, canvas)
        x0, x1 = max(left, 0), min(left + obj, canvas)
        if y0 >= y1 or x0 >= x1:
            continue
        m = shape_mask(o.shape, obj)[y0 - top:y1 - top, x0 - left:x1 - left]
        img[y0:y1, x0:x1][m] = COLORS[o.color]
    return img


def to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [-1, 1] (the inverse of to_uint8)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] in [-1, 1] (values outside are clipped) -> uint8 [B, H, W, 3]."""
    x = ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()
