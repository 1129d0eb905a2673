"""Pictures people would rather look at than read: image grids with captions (PIL only)."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from unigrpo.io import save_png


FRAME_COLORS = {2: (40, 170, 60), 1: (235, 170, 20), 0: (200, 40, 40)}
"""frame level → RGB: 2 green (passes strict), 1 amber (passes GenEval-style only), 0 red (fails)"""


def _frame_level(ok) -> int:
    return 2 * bool(ok) if isinstance(ok, (bool, np.bool_)) else int(ok)


def save_image_grid(images_BHW3: np.ndarray, captions: list[str], path: str, *, ncol: int = 8,
                    tile: int = 128, ok: list[int] | None = None) -> str:
    """uint8 images [B, H, W, 3] → one PNG: tiles upscaled (nearest) to `tile` px high, keeping their aspect
    (an episode's x¹ | x² pair is twice as wide), a caption strip under each, and, when `ok` is given, a frame
    per tile coloured by its level (FRAME_COLORS; a bool True is level 2, False 0). Written atomically;
    returns the path."""
    B = len(images_BHW3)
    ncol = max(1, min(ncol, B))
    nrow = (B + ncol - 1) // ncol
    H, W = images_BHW3.shape[1:3] if B else (1, 1)
    tile_w = max(1, round(tile * W / H))
    cap_h, pad = 26, 4
    cell_w, cell_h = tile_w + 2 * pad, tile + cap_h + 2 * pad
    grid = Image.new("RGB", (ncol * cell_w, nrow * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i in range(B):
        r, c = divmod(i, ncol)
        x0, y0 = c * cell_w, r * cell_h
        if ok is not None:
            draw.rectangle([x0, y0, x0 + cell_w - 1, y0 + tile + 2 * pad - 1],
                           fill=FRAME_COLORS[_frame_level(ok[i])])
        im = Image.fromarray(images_BHW3[i]).resize((tile_w, tile), Image.NEAREST)
        grid.paste(im, (x0 + pad, y0 + pad))
        text = captions[i] if i < len(captions) else ""
        chars = max(8, tile_w // 6)
        lines = [text[:chars], text[chars:2 * chars]]
        draw.text((x0 + pad, y0 + tile + 2 * pad), "\n".join(lines), fill=(0, 0, 0))
    return save_png(grid, path)
