"""Image codecs: images [B, 3, H, W] in [-1, 1] ↔ latents [B, C, h, w] (the space the flow works in).

- "pixel" (the `tiny` preset): space-to-depth by image_size / latent_size (4 for tiny), so a 32×32 RGB canvas
  is a 48×8×8 latent. Exact and free; the 2×2 patchify of the model then gives 16 tokens of 192 values.
- "flux-vae" (`small`, `bagel-7b`, BAGEL checkpoints): the FLUX autoencoder (unigrpo/model/flux_vae.py; 8×
  down, 16 channels for FLUX.1 / BAGEL) loaded from the local ae.safetensors named by `model.vae_path`
  (load_bagel sets it; nothing is downloaded). Without a path, asking for it is a clear error.

FluxVAECodec decisions: the VAE is frozen and runs under no_grad; it runs on the device of its input, moving
there on first use (the bundle's model may be moved after the codec was built), in its own dtype (float32 by
default); outputs come back in the input's floating dtype. `encode` uses the posterior mean (deterministic;
BAGEL samples — see flux_vae.py); `decode` clamps to [-1, 1] like PixelCodec. Both work in chunks of
`max_batch` images: one 1024-px image through the decoder holds ~0.5 GB per 128-channel fp32 activation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from unigrpo.model.config import ModelConfig
from unigrpo.model.flux_vae import load_flux_vae


class PixelCodec:
    """Space-to-depth by `factor`: [B, 3, H, W] ↔ [B, 3·f², H/f, W/f]."""

    def __init__(self, factor: int = 2):
        self.factor = factor

    def encode(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images_B3HW, self.factor)

    def decode(self, latents_BChw: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """clamp=False keeps values outside [-1, 1] (and their gradients: ReFL's reward sees overshoot)."""
        x = F.pixel_shuffle(latents_BChw, self.factor)
        return x.clamp(-1, 1) if clamp else x


class FluxVAECodec:
    """images [B, 3, H, W] in [-1, 1] ↔ normalised FLUX latents [B, z, H/d, W/d] (d = vae.params.downsample)."""

    def __init__(self, vae, max_batch: int = 4):
        self.vae = vae
        self.max_batch = max_batch

    @property
    def downsample(self) -> int:
        return self.vae.params.downsample

    def to(self, device=None, dtype=None) -> "FluxVAECodec":
        self.vae.to(device=device, dtype=dtype)
        return self

    def _run(self, fn, x: torch.Tensor) -> torch.Tensor:
        p = next(self.vae.parameters())
        if p.device != x.device:
            self.vae.to(x.device)
        out_dtype = x.dtype if x.is_floating_point() else torch.float32
        with torch.no_grad():
            parts = [fn(chunk.to(p.dtype)) for chunk in x.split(self.max_batch)]
        return torch.cat(parts).to(out_dtype)

    def encode(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        d = self.downsample
        if images_B3HW.shape[-1] % d or images_B3HW.shape[-2] % d:
            raise ValueError(f"flux-vae encode: image size {tuple(images_B3HW.shape[-2:])} must be a multiple of {d}")
        return self._run(self.vae.encode, images_B3HW)

    def decode(self, latents_BChw: torch.Tensor) -> torch.Tensor:
        return self._run(self.vae.decode, latents_BChw).clamp(-1, 1)


def build_codec(cfg: ModelConfig):
    if cfg.codec == "pixel":
        factor = cfg.image_size // cfg.latent_size
        if factor * cfg.latent_size != cfg.image_size or 3 * factor * factor != cfg.latent_channels:
            raise ValueError(f"pixel codec: image_size {cfg.image_size}, latent_size {cfg.latent_size} and "
                             f"latent_channels {cfg.latent_channels} must satisfy channels = 3·(image/latent)²")
        return PixelCodec(factor)
    if not cfg.vae_path:
        raise ValueError(f"codec {cfg.codec!r} needs model.vae_path = a local ae.safetensors (the FLUX VAE of a "
                         "BAGEL checkpoint directory; unigrpo.model.bagel.load_bagel sets it); none is set. "
                         "Use the 'pixel' codec (preset tiny) for a model without a VAE")

    vae = load_flux_vae(cfg.vae_path)
    p = vae.params
    if p.z_channels != cfg.latent_channels or cfg.latent_size * p.downsample != cfg.image_size:
        raise ValueError(f"flux-vae at {cfg.vae_path}: {p.z_channels} channels, {p.downsample}× down, but the model "
                         f"expects latent_channels {cfg.latent_channels} and image_size {cfg.image_size} = "
                         f"latent_size {cfg.latent_size} × {p.downsample}")
    return FluxVAECodec(vae)
