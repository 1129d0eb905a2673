"""The packed training forward of a model on a PackedBatch (ALGORITHM.md §9): reasoning-token log-probs (and
entropies) computed inside the forward where FSDP has lm_head gathered, and the window velocities, guided
with CFG exactly as the rollout sampled them."""
from __future__ import annotations

import torch

from unigrpo.losses.packing import PackedBatch, pack_unconditional
from unigrpo.model import no_text_head
from unigrpo_kernels import token_logprobs

__all__ = ["PackedForward", "scatter_tokens"]


class PackedForward:
    """Forwards of the policy or the reference on packed batches, with the run's backends and CFG scale."""

    def __init__(self, *, temperature: float, cfg_scale: float, uncond_ids: list[int], image_tokens: int,
                 pad_id: int, attn_backend: str, text_backend: str, context_grad: bool = True):
        self.temperature, self.cfg_scale, self.uncond_ids = temperature, cfg_scale, uncond_ids
        self.context_grad = context_grad   # False: the clean history blocks get no gradient (model.forward_packed)
        self.image_tokens, self.pad_id = image_tokens, pad_id
        self.attn_backend, self.text_backend = attn_backend, text_backend

    def __call__(self, model, batch: PackedBatch, with_entropy: bool = False):
        """(text log-probs [n] (+ entropy [n]), guided velocities [M, C, h, w])."""
        def head(hidden, weight):
            h_sel = hidden.reshape(-1, hidden.shape[-1])[batch.text_pos]
            return token_logprobs(h_sel, weight, batch.text_tgt, temperature=self.temperature,
                                  return_entropy=with_entropy, backend=self.text_backend)

        text_out, v = model.forward_packed(batch.layout, batch.ids_BS, batch.latents_M, batch.sigma_M,
                                           text_head=head, backend=self.attn_backend,
                                           context_grad=self.context_grad)
        return text_out, self.guided(model, batch, batch.noise_velocities(v))

    def with_head(self, model, batch: PackedBatch, text_head):
        """(text_head's output, conditional velocities of the noise blocks): the training forward,
        `text_head(hidden, lm_head weight)` run inside the model's forward."""
        text_out, v = model.forward_packed(batch.layout, batch.ids_BS, batch.latents_M, batch.sigma_M,
                                           backend=self.attn_backend, text_head=text_head,
                                           context_grad=self.context_grad)
        return text_out, batch.noise_velocities(v)

    def velocities(self, model, batch: PackedBatch) -> torch.Tensor:
        """The conditional velocities of the noise blocks only (no text head, no CFG) [R·W, C, h, w]."""
        _, v = model.forward_packed(batch.layout, batch.ids_BS, batch.latents_M, batch.sigma_M,
                                    backend=self.attn_backend, text_head=no_text_head,
                                    context_grad=self.context_grad)
        return batch.noise_velocities(v)

    def guided(self, model, batch: PackedBatch, v_c: torch.Tensor) -> torch.Tensor:
        """The velocity the rollout sampled with: v_c itself, or with CFG in training rollouts
        (rollout.cfg_scale = w ≠ 1) v_u + w·(v_c − v_u), v_u from a second packed forward against the
        unconditional context (2 evaluations, as in the rollout), so the ratios compare one policy. fp32."""
        w = self.cfg_scale
        if w == 1.0:
            return v_c
        ub = pack_unconditional(batch, self.uncond_ids, self.image_tokens, self.pad_id)
        v_u = self.velocities(model, ub).float()
        return v_u + w * (v_c.float() - v_u)


def scatter_tokens(values_n: torch.Tensor, batch: PackedBatch, R: int, T: int) -> torch.Tensor:
    """Per-token values [n] of a packed batch → [R, T] (zeros where no reasoning token is)."""
    out = torch.zeros(R * T, dtype=values_n.dtype, device=values_n.device)
    out[batch.text_slot] = values_n
    return out.view(R, T)
