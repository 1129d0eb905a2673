"""UniGRPO's objective (ALGORITHM.md §5–§9) on a batch of trajectories, in two stages:

1. `prepare`, no grad: the old policy's (and the reference's) quantities from the training code path:
   recomputed reasoning log-probs and window velocities v_old, v_ref, then μ_old = a·x + b·v_old and
   ξ = (x' − μ_old)/s. With recompute_old off, v_old = (x' − s·ξ − a·x)/b from the rollout's own noise (exact
   algebra). The largest rollout-vs-training mismatch is logged ("mismatch/text_logp_max", "/flow_logp_max").
2. `loss`, per mini-batch, one packed forward of the policy: L = L_text + λ·L_flow + β·L_reg (§9), the text
   loss fused into the forward (linear_text_grpo_loss: hidden states → loss, never the [tokens × vocab]
   logits) and λ·L_flow + β·L_reg from the guided velocities in one fused call (flow_grpo_loss with
   flow_weight = λ and beta = β; λ = 0 drops the flow part and its regulariser together).

Ablations: loss.train_text = false (FlowGRPO only: no L_text); loss.train_image = false (TextGRPO only: λ = 0).
Legend: R trajectories, W window steps, T reasoning tokens, D latent elements per window step.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from unigrpo.losses.forward import PackedForward, scatter_tokens
from unigrpo.losses.packing import pack
from unigrpo.model import no_text_head
from unigrpo.rollout.rollout import Trajectories
from unigrpo_kernels import flow_grpo_loss, gaussian_logprob, linear_text_grpo_loss, step_coeffs_batch

__all__ = ["OldPolicy", "UniGRPOObjective", "Minibatches"]

Minibatches = Callable[[list[int], int], Iterator[tuple[list[int], float]]]
"""(rows, n) → mini-batches (rows, weight); weight 0 marks a dummy that only keeps FSDP's collectives in step"""


@dataclass
class OldPolicy:
    """What `prepare` fixes for the K epochs of one batch."""
    traj: Trajectories
    rows: list[int]
    adv_R: torch.Tensor      # fp32 [R]
    old_logp: torch.Tensor   # fp32 [R, T]
    ref_logp: torch.Tensor | None
    v_old: torch.Tensor      # fp32 [R, W, C, h, w]
    v_ref: torch.Tensor      # fp32 [R, W, C, h, w]
    xi: torch.Tensor         # fp32 [R, W, C, h, w]
    b_RW: torch.Tensor
    s_RW: torch.Tensor
    h_RW: torch.Tensor
    metrics: dict            # mismatch and entropy of the old policy
    text_tokens: float = 0.0  # reasoning tokens of the trained rows, summed over ranks (aggregation "global")
    text_mask: torch.Tensor | None = None  # bool [R, T]: the tokens L_text trains (default: traj's reasoning mask)

    @property
    def loss_mask(self) -> torch.Tensor:
        return self.traj.reasoning.mask_BT if self.text_mask is None else self.text_mask


class UniGRPOObjective:
    """What the Trainer asks of an objective (ReFLObjective answers the same): `prepare`, `loss`, and
    `distributed` (runs under FSDP), `uses_advantages` (trains only the groups with signal; otherwise every
    trajectory), `trains_text` (the text expert gets gradients), `rollout_config` (its rollout windows) and
    `check_records` (the prompts it can train on)."""

    distributed = True
    uses_advantages = True

    def __init__(self, cfg, forward: PackedForward, policy, ref, sigmas: torch.Tensor, device: torch.device,
                 flow_backend: str, text_backend: str):
        self.cfg, self.forward, self.policy, self.ref = cfg, forward, policy, ref
        self.sigmas, self.device = sigmas, device
        self.flow_backend, self.text_backend = flow_backend, text_backend

    @property
    def trains_text(self) -> bool:
        return self.cfg.loss.train_text

    def rollout_config(self, rc):
        return rc

    def check_records(self, records) -> None:
        """Any prompt: the rewards check theirs."""

    def _text_mask(self, traj: Trajectories) -> torch.Tensor | None:
        """bool [R, T]: the reasoning tokens of the rounds `edit.text_rounds` names (None: every token)."""
        if traj.episode is None or not self.cfg.edit.text_rounds:
            return None
        cols = traj.episode.columns
        keep = torch.zeros(cols[-1], dtype=torch.bool, device=traj.reasoning.mask_BT.device)
        for k in self.cfg.edit.trained_rounds(traj.episode.rounds):
            keep[cols[k]:cols[k + 1]] = True
        return traj.reasoning.mask_BT & keep

    def _pack(self, traj: Trajectories, mb: list[int]):
        return pack(traj, mb, self.sigmas, self.forward.image_tokens, self.forward.pad_id)

    def prepare(self, traj: Trajectories, rows: list[int], adv_R: torch.Tensor, prompts: list,
                minibatches: Minibatches) -> OldPolicy:
        cfg, lc, oc, rc = self.cfg, self.cfg.loss, self.cfg.optim, self.cfg.rollout
        R, T = traj.reasoning.tokens_BT.shape
        W = traj.x_RW.shape[1]
        dev = self.device
        co = step_coeffs_batch(self.sigmas, traj.window_steps.flatten().cpu(), rc.eta, rc.sde_kind)
        a_RW, b_RW, s_RW, h_RW = (co[k].float().view(R, W).to(dev) for k in ("a", "b", "std", "h"))
        mask_RT = traj.reasoning.mask_BT
        old_logp = traj.reasoning.logp_BT.clone()
        v_old = torch.zeros_like(traj.x_RW)
        ref_logp = torch.zeros(R, T, device=dev) if lc.kl_coef > 0 else None
        entropy = torch.zeros(R, T, device=dev)
        v_ref_t = torch.zeros_like(traj.x_RW)
        mism_text, mism_flow = 0.0, 0.0
        with torch.no_grad():
            for mb, weight in minibatches(rows, oc.micro):
                batch = self._pack(traj, mb)
                idx = torch.tensor(mb, device=dev)
                if cfg.recompute_old:
                    (lp, ent), v = self.forward(self.policy, batch, with_entropy=True)
                if self.ref is not None:
                    (lp_ref, _), v_r = self.forward(self.ref, batch, with_entropy=True)
                if weight == 0:
                    continue   # a dummy mini-batch: its forwards only keep FSDP's collectives in step
                if cfg.recompute_old:
                    lp_RT = scatter_tokens(lp, batch, len(mb), T)
                    mism_text = max(mism_text, (lp_RT - traj.reasoning.logp_BT[idx]).abs()[mask_RT[idx]].max().item()
                                    if mask_RT[idx].any() else 0.0)
                    old_logp[idx] = lp_RT
                    entropy[idx] = scatter_tokens(ent, batch, len(mb), T)
                    v_old[idx] = v.float().view(len(mb), W, *v.shape[1:])
                if self.ref is not None:
                    v_ref_t[idx] = v_r.float().view(len(mb), W, *v_r.shape[1:])
                    if ref_logp is not None:
                        ref_logp[idx] = scatter_tokens(lp_ref, batch, len(mb), T)
            bc = lambda t: t.view(R, W, *([1] * (traj.x_RW.dim() - 2)))  # noqa: E731  [R, W] → broadcast
            if not cfg.recompute_old:  # v_old from the rollout's own step: μ_old = x' − s·ξ = a·x + b·v_old
                v_old = (traj.x_next_RW - bc(s_RW) * traj.noise_RW - bc(a_RW) * traj.x_RW) / bc(b_RW)
            mu_old = bc(a_RW) * traj.x_RW + bc(b_RW) * v_old
            xi = (traj.x_next_RW - mu_old) / bc(s_RW)
            if cfg.recompute_old and rows:
                lp_flow = gaussian_logprob(traj.x_next_RW.flatten(0, 1), mu_old.flatten(0, 1), s_RW.flatten())
                sel = torch.tensor(rows, device=dev)
                mism_flow = (lp_flow.view(R, W) - traj.logp_RW)[sel].abs().max().item()
        sel = torch.tensor(rows, dtype=torch.long, device=dev)
        metrics = {"mismatch/text_logp_max": mism_text, "mismatch/flow_logp_max": mism_flow,
                   "text/entropy": (entropy[sel][mask_RT[sel]].mean().item() if cfg.recompute_old and rows
                                    and mask_RT[sel].any() else float("nan"))}
        # DAPO's normaliser: completion tokens of the whole generation batch (every trained row, every rank), fixed
        # once per step so mini- and micro-batch losses add up; one all_reduce under torch.distributed
        text_mask = self._text_mask(traj)
        trained = mask_RT if text_mask is None else text_mask
        n_tok = trained[sel].sum().to(torch.float64) if rows else torch.zeros((), dtype=torch.float64, device=dev)
        if cfg.loss.aggregation == "global" and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(n_tok)
            # FSDP averages gradients over ranks, so each rank divides by N / world (TRL: num_items / processes)
            n_tok = n_tok / torch.distributed.get_world_size()
        return OldPolicy(traj, rows, adv_R, old_logp, ref_logp, v_old, v_ref_t if self.ref is not None else v_old,
                         xi, b_RW, s_RW, h_RW, metrics, float(n_tok), text_mask)

    def shares(self, old: OldPolicy, mb: list[int], within: list[int]) -> tuple[float, float]:
        """(text, flow) shares of the micro-batch `mb` in the mini-batch `within`: the mini-batch's loss is
        Σ over its micro-batches of share·loss(micro-batch), term by term, because each term is a ratio whose
        denominator splits this way (the aggregation's: sequences with tokens, tokens or rows; flow: rows)."""
        mask = old.loss_mask

        def count(rows):
            m = mask[torch.tensor(rows, device=mask.device)]
            agg = self.cfg.loss.aggregation
            return float(m.any(1).sum() if agg == "sequence" else m.sum() if agg == "token" else len(rows))
        if self.cfg.loss.aggregation == "global":   # the normaliser is fixed for the step: micro-batch losses add
            return 1.0, len(mb) / len(within)
        total = count(within)
        return (count(mb) / total if total else 0.0), len(mb) / len(within)

    def loss(self, old: OldPolicy, mb: list[int], within: list[int] | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(0-dim loss with grad, detached metrics) of the mini-batch `mb` (rows of old.traj); with `within`,
        mb is a micro-batch of that mini-batch and the loss is its share of the mini-batch's (see `shares`)."""
        lc, rc = self.cfg.loss, self.cfg.rollout
        traj, adv_R, mask_RT = old.traj, old.adv_R, old.loss_mask
        W = traj.x_RW.shape[1]
        D = traj.x_RW[0, 0].numel()
        dev = self.device
        lam = lc.flow_weight if lc.train_image else 0.0
        # "constant" divides by G·L_max with L_max the configured reasoning cap, not this batch's longest
        max_len = (rc.max_new_tokens or self.policy.cfg.max_text_len) if lc.aggregation == "constant" else None
        batch = self._pack(traj, mb)
        idx = torch.tensor(mb, device=dev)
        text_eps = (lc.gspo_eps_lo, lc.gspo_eps_hi) if lc.ratio_level == "sequence" else (lc.eps_lo, lc.eps_hi)

        def text_loss(hidden, weight):
            """hidden → GRPO text loss in one fused call, inside the forward (FSDP)"""
            h_sel = hidden.reshape(-1, hidden.shape[-1])[batch.text_pos]
            return linear_text_grpo_loss(
                h_sel, weight, batch.text_tgt, slot_T=batch.text_slot, old_logp_BL=old.old_logp[idx],
                adv_B=adv_R[idx], mask_BL=mask_RT[idx], temperature=rc.temperature, eps_lo=text_eps[0],
                eps_hi=text_eps[1], aggregation=lc.aggregation, ratio_level=lc.ratio_level,
                global_tokens=old.text_tokens if lc.aggregation == "global" else None,
                ref_logp_BL=None if old.ref_logp is None else old.ref_logp[idx], kl_coef=lc.kl_coef,
                kl_bias_correction=lc.kl_bias_correction, max_len=max_len, return_logp=True,
                backend=self.text_backend)

        text_out, v = self.forward.with_head(self.policy, batch, text_loss if lc.train_text else no_text_head)
        if lam > 0:
            v = self.forward.guided(self.policy, batch, v)
        loss = torch.zeros((), device=dev)
        m: dict[str, torch.Tensor] = {}
        share_text, share_flow = (1.0, 1.0) if within is None else self.shares(old, mb, within)
        if lc.train_text:
            l_text, mt, lp_RT = text_out
            loss = loss + (l_text if within is None else share_text * l_text)
            m.update(mt)
            with torch.no_grad():
                d = (old.old_logp[idx] - lp_RT)[mask_RT[idx]]
                m["text/approx_kl"] = (torch.exp(d) - d - 1).mean() if d.numel() else torch.zeros((), device=dev)
        if lam > 0:
            l_flow, mf = flow_grpo_loss(
                v_BD=v.float().view(len(mb) * W, D), xi_BD=old.xi[idx].view(-1, D),
                v_old_BD=old.v_old[idx].view(-1, D), v_ref_BD=old.v_ref[idx].view(-1, D),
                adv_B=adv_R[idx].repeat_interleave(W), b_B=old.b_RW[idx].flatten(), std_B=old.s_RW[idx].flatten(),
                h_B=old.h_RW[idx].flatten(), clip_eps=lc.flow_clip, flow_weight=lam, beta=lc.beta, reg=lc.reg,
                ratio_norm=lc.ratio_norm, grad_reweight=lc.grad_reweight, clip_eps_lo=lc.flow_clip_lo,
                clip_eps_hi=lc.flow_clip_hi, latent_kl_norm=lc.latent_kl_norm, backend=self.flow_backend)
            loss = loss + (l_flow if within is None else share_flow * l_flow)   # = λ·L_flow + β·L_reg, one pass
            m.update(mf)
        return loss, m
