"""Image codecs: images [B, 3, H, W] in [-1, 1] ↔ latents [B, C, h, w] (the space the flow works in).

- "pixel" (the `tiny` preset): space-to-depth by image_size / latent_size (4 for tiny), so a 32×32 RGB canvas
  is a 48×8×8 latent. Exact and free; the 2×2 patchify of the model then gives 16 tokens of 192 values.
- "flux-vae" (`small`, `bagel-7b`): a FLUX-style VAE (8× down, 16 channels) loaded from a local checkpoint;
  that loader belongs to BAGEL checkpoint support and is not built yet, so asking for it is a clear error.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from unigrpo.model.config import ModelConfig


class PixelCodec:
    """Space-to-depth by `factor`: [B, 3, H, W] ↔ [B, 3·f², H/f, W/f]."""

    def __init__(self, factor: int = 2):
        self.factor = factor

    def encode(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images_B3HW, self.factor)

    def decode(self, latents_BChw: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents_BChw, self.factor).clamp(-1, 1)


def build_codec(cfg: ModelConfig):
    if cfg.codec == "pixel":
        factor = cfg.image_size // cfg.latent_size
        if factor * cfg.latent_size != cfg.image_size or 3 * factor * factor != cfg.latent_channels:
            raise ValueError(f"pixel codec: image_size {cfg.image_size}, latent_size {cfg.latent_size} and "
                             f"latent_channels {cfg.latent_channels} must satisfy channels = 3·(image/latent)²")
        return PixelCodec(factor)
    raise ValueError(f"codec {cfg.codec!r} needs a VAE checkpoint (FLUX-style, loaded from a local BAGEL "
                     "directory), which this version cannot load yet; use the 'pixel' codec (preset tiny)")
