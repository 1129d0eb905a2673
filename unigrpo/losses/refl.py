"""The ReFL baseline's objective (ALGORITHM.md §11): x̂0 = x_k − σ_k·v_θ(x_k) at the row's late step k,
decoded, scored by the differentiable surrogate of the verifier (rewards/surrogate.py);
loss = −mean surrogate + β·velocity MSE to the reference (loss.reg = "mse"). No advantages: every trajectory
trains; the text expert does not."""
from __future__ import annotations

import dataclasses

import torch

from unigrpo.losses.forward import PackedForward
from unigrpo.losses.grpo import Minibatches
from unigrpo.losses.packing import pack
from unigrpo.model.codec import PixelCodec
from unigrpo.rewards.surrogate import check_surrogate_records, surrogate_reward_of
from unigrpo.rollout.rollout import Trajectories

__all__ = ["ReFLObjective", "ReFLBatch"]


class ReFLBatch:
    """What `prepare` fixes for the K epochs: the trajectories, their prompts, v_ref at each late step."""

    def __init__(self, traj: Trajectories, prompts: list, v_ref: torch.Tensor, use_ref: bool):
        self.traj, self.prompts, self.v_ref, self.use_ref = traj, prompts, v_ref, use_ref
        self.metrics: dict = {}


class ReFLObjective:
    """A single-process baseline: every trajectory trains (no advantages), only the image expert, at one late
    step per group."""

    distributed = False
    uses_advantages = False
    trains_text = False

    def __init__(self, cfg, forward: PackedForward, policy, ref, sigmas: torch.Tensor, codec):
        if not isinstance(codec, PixelCodec):
            raise ValueError(f"method 'refl' back-propagates through the decoder, which needs the pixel codec; "
                             f"{cfg.base} uses {type(codec).__name__}")
        self.cfg, self.forward, self.policy, self.ref = cfg, forward, policy, ref
        self.sigmas, self.codec = sigmas, codec

    def rollout_config(self, rc):
        """One late step per group: x_k before it is where the gradient enters."""
        return dataclasses.replace(rc, window_size=1, window_lo=rc.steps - self.cfg.refl.late_steps,
                                   window_hi=rc.steps)

    def check_records(self, records) -> None:
        check_surrogate_records(records)   # the surrogate reads the prompts' shapes-world metadata

    def _pack(self, traj: Trajectories, mb: list[int]):
        return pack(traj, mb, self.sigmas, self.forward.image_tokens, self.forward.pad_id)

    def prepare(self, traj: Trajectories, rows: list[int], adv_R, prompts: list,
                minibatches: Minibatches) -> ReFLBatch:
        lc, oc = self.cfg.loss, self.cfg.optim
        use_ref = lc.reg == "mse" and self.ref is not None
        v_ref = torch.zeros_like(traj.x_RW[:, 0])
        if use_ref:
            with torch.no_grad():
                for mb, _ in minibatches(rows, oc.micro):
                    v_r = self.forward.velocities(self.ref, self._pack(traj, mb))
                    v_ref[torch.tensor(mb, device=v_ref.device)] = v_r.float()
        return ReFLBatch(traj, prompts, v_ref, use_ref)

    def loss(self, old: ReFLBatch, mb: list[int], within: list[int] | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(0-dim loss with grad, detached metrics) of the rows `mb`; with `within`, mb's share of that
        mini-batch's loss (both terms are means over rows: the share is len(mb) / len(within))."""
        batch = self._pack(old.traj, mb)
        v = self.forward.velocities(self.policy, batch).float()
        x0 = batch.latents_M - batch.sigma_M.view(-1, *([1] * (v.dim() - 1))) * v
        sur = surrogate_reward_of(self.codec.decode(x0, clamp=False), [old.prompts[i].text for i in mb],
                                  [old.prompts[i].metadata for i in mb], self.cfg.refl.softness)
        loss = -sur.mean()
        mse = ((v - old.v_ref[torch.tensor(mb, device=v.device)]) ** 2).mean() if old.use_ref else torch.zeros(())
        loss = loss + self.cfg.loss.beta * mse
        if within is not None:
            loss = loss * (len(mb) / len(within))
        return loss, {"refl/surrogate": sur.mean().detach(), "flow/velocity_mse": mse.detach()}
