"""CLIP image–text similarity as a reward: transformers' CLIPModel and CLIPProcessor from a local directory.

score_i = cos(image_embed_i, text_embed_i) ∈ [−1, 1], the image against its own prompt. The same loading code
serves CLIP-architecture preference models (PickScore, HPS v2 are CLIP checkpoints; PickScore multiplies the
cosine by the model's logit scale, which `logit_scale: true` does). Nothing is downloaded: the directory
must hold the model and processor files that `save_pretrained` writes.
"""
from __future__ import annotations

import os

import torch
from unigrpo.world.render import to_uint8

__all__ = ["ClipReward"]


class ClipReward:
    """CLIP cosine similarity of each image with its prompt, float32 [B] (module docstring)."""

    def __init__(self, path: str, *, device: str = "cpu", batch_size: int = 32, logit_scale: bool = False):
        from transformers import CLIPModel, CLIPProcessor

        if not os.path.isdir(path):
            raise FileNotFoundError(f"clip reward: model directory {path!r} not found (a CLIP model and processor "
                                    "saved with save_pretrained)")
        try:
            self.model = CLIPModel.from_pretrained(path, local_files_only=True).eval().to(device)
            self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"clip reward: cannot load a CLIP model and processor from {path!r}: {err}") from None
        self.device, self.batch_size, self.logit_scale = device, batch_size, logit_scale

    @torch.no_grad()
    def __call__(self, images, prompts, metadata):

        pixels = to_uint8(images.float().cpu())           # uint8 [B, H, W, 3], as a saved PNG would hold
        out = []
        for s in range(0, len(prompts), self.batch_size):
            inputs = self.processor(text=list(prompts[s:s + self.batch_size]), images=list(pixels[s:s + self.batch_size]),
                                    return_tensors="pt", padding=True, truncation=True)
            o = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
            cos = (o.image_embeds * o.text_embeds).sum(-1)   # CLIPModel returns unit-norm embeddings
            if self.logit_scale:
                cos = cos * self.model.logit_scale.exp()
            out.append(cos.float().cpu())
        return torch.cat(out)
