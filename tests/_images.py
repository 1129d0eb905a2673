"""Test helper: shapes-world layouts rendered as a batch in the model's image format."""
import numpy as np
import torch

from unigrpo.world import CANVAS, render
from unigrpo.world.render import to_float


def render_batch(layouts, canvas: int = CANVAS) -> torch.Tensor:
    """float32 [B, 3, canvas, canvas] in [-1, 1]."""
    imgs = np.stack([render(lay, canvas) for lay in layouts]) if layouts else np.zeros((0, canvas, canvas, 3), np.uint8)
    return to_float(imgs)
