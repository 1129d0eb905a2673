"""The optimizer stage (ALGORITHM.md §9): AdamW over the text and image expert parameter groups, and the
gradient norms that clipping and the metrics share."""
from __future__ import annotations

import torch

from unigrpo.train_config import OptimConfig

__all__ = ["build_optimizer", "grad_norms"]


def build_optimizer(groups: dict[str, list], cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with one parameter group per expert ("text": lr_text, "image": lr_image), named as in `groups`."""
    return torch.optim.AdamW(
        [{"params": groups["text"], "lr": cfg.lr_text, "name": "text"},
         {"params": groups["image"], "lr": cfg.lr_image, "name": "image"}],
        betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (FSDP gradient norms are DTensors), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def grad_norms(groups: dict[str, list]) -> tuple[dict[str, float], torch.Tensor]:
    """The gradients' L2 norms, each gradient read once: per group (0.0 for a group without gradients) and in
    total (a 0-dim tensor, the value clip_grad_norm_ computes: the norm of the per-tensor norms, in group order).
    Sharded (DTensor) gradients reduce across ranks here."""
    per_tensor = {k: [torch.linalg.vector_norm(p.grad) for p in ps if p.grad is not None] for k, ps in groups.items()}
    every = [n for ns in per_tensor.values() for n in ns]
    total = _local(torch.linalg.vector_norm(torch.stack(every))) if every else torch.tensor(0.0)
    return {k: _local(torch.linalg.vector_norm(torch.stack(ns))).item() if ns else 0.0
            for k, ns in per_tensor.items()}, total
