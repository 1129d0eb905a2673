"""The packed training batch (ALGORITHM.md §9): per trajectory row [prompt + reasoning] (causal text) then its
W noisy window latents, each its own block that sees the text and itself; multi-round trajectories (§12)
interleave each round's text, its W noise blocks and its clean image; and mini-batching of rows.

Legend: R trajectories, W window steps, T reasoning tokens, M = R·W image blocks, S packed sequence length."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from unigrpo.model import PackedLayout, episode_document, padded_ids, text_then_blocks
from unigrpo.model.layout import NOISE
from unigrpo.rollout.rollout import Trajectories

__all__ = ["PackedBatch", "pack", "pack_unconditional", "chunks"]


@dataclass
class PackedBatch:
    layout: PackedLayout
    ids_BS: torch.Tensor  # long [R, S]
    text_pos: torch.Tensor  # long [n]: flat index (row·S + position) of the hidden state predicting each token
    text_tgt: torch.Tensor  # long [n]: the reasoning token predicted there
    text_slot: torch.Tensor  # long [n]: flat index (row·T + t) into [R, T] reasoning-token tensors
    latents_M: torch.Tensor  # fp32 [M, C, h, w]: x_j of every (row, window step), row-major
    sigma_M: torch.Tensor  # fp32 [M]
    noise_M: torch.Tensor | None = None
    """long [R·W]: the noise blocks among the M image blocks, in (row, window step) order; None when every
    block is one (single-round). Multi-round batches also hold the clean blocks x̄^r (σ = 0)."""

    def noise_velocities(self, v_M: torch.Tensor) -> torch.Tensor:
        """The window steps' velocities [R·W, C, h, w] among a forward's M block outputs."""
        return v_M if self.noise_M is None else v_M[self.noise_M]


def pack(traj: Trajectories, rows: list[int], sigmas: torch.Tensor, image_tokens: int, pad_id: int) -> PackedBatch:
    """The packed training batch of the given trajectory rows (§9; multi-round trajectories: §12)."""
    if traj.episode is not None:
        return _pack_episodes(traj, rows, sigmas, image_tokens, pad_id)
    rs = traj.reasoning
    W = traj.x_RW.shape[1]
    T = rs.tokens_BT.shape[1]
    seqs, pos, tgt, slot = [], [], [], []
    for i, r in enumerate(rows):
        p_ids = rs.prompt_ids[r]
        n = int(rs.mask_BT[r].sum())
        o_ids = rs.tokens_BT[r, :n].tolist()
        seqs.append(p_ids + o_ids)
        base = len(p_ids) - 1
        pos.append(torch.arange(base, base + n))
        tgt.append(torch.tensor(o_ids, dtype=torch.long))
        slot.append(torch.arange(n) + i * T)
    dev = traj.x_RW.device   # index tensors are built on the host, then moved once
    layout, ids = text_then_blocks(seqs, W, image_tokens, pad_id, device=dev)
    S = layout.shape[1]
    text_pos = torch.cat([p + i * S for i, p in enumerate(pos)])
    idx = torch.tensor(rows, device=dev)
    lat = traj.x_RW[idx].flatten(0, 1)
    sig = sigmas.to(dev)[traj.window_steps[idx].flatten()].float()
    return PackedBatch(layout, ids, text_pos.to(dev), torch.cat(tgt).to(dev), torch.cat(slot).to(dev),
                       lat, sig)


def _pack_episodes(traj: Trajectories, rows: list[int], sigmas: torch.Tensor, image_tokens: int,
                   pad_id: int) -> PackedBatch:
    """One document per row: [c¹ o¹][W noise][x̄¹][c² o²][W noise] … (ALGORITHM.md §12, episode_document);
    the image blocks in that order: round k's W window inputs x_j, then (except after the last round) x̄^k."""
    ep, rs = traj.episode, traj.reasoning
    W, K, T = ep.window, ep.rounds, rs.tokens_BT.shape[1]
    lengths = ep.reasoning_lengths(rs.mask_BT).tolist()
    steps = traj.window_steps
    sig_all = sigmas.to(traj.x_RW.device).float()
    docs, seqs, pos, tgt, slot, lat, sig = [], [], [], [], [], [], []
    for i, r in enumerate(rows):
        ctx = [rs.prompt_ids[r]] + ep.instruction_ids[r]
        ids = []
        for k in range(K):
            n = lengths[r][k]
            o = rs.tokens_BT[r, ep.columns[k]:ep.columns[k] + n].tolist()
            pos.append(len(ids) + len(ctx[k]) - 1 + torch.arange(n))   # the hidden predicting o^k_t
            tgt.append(torch.tensor(o, dtype=torch.long))
            slot.append(torch.arange(n) + ep.columns[k] + i * T)
            ids += ctx[k] + o + [pad_id] * (W * image_tokens)
            lat.append(traj.x_RW[r, k * W:(k + 1) * W])
            sig.append(sig_all[steps[r, k * W:(k + 1) * W]])
            if k < K - 1:
                ids += [pad_id] * image_tokens
                lat.append(ep.latents_RK[r, k:k + 1])
                sig.append(sig_all.new_zeros(1))
        docs.append([episode_document([len(c) + n for c, n in zip(ctx, lengths[r])], W, image_tokens)])
        seqs.append(ids)
    dev = traj.x_RW.device
    layout = PackedLayout.build(docs, device=dev)
    S = layout.shape[1]
    rows_of = [i for i, r in enumerate(rows) for _ in range(K)]
    text_pos = torch.cat([p + i * S for i, p in zip(rows_of, pos)])
    noise = torch.tensor([m for m, k in enumerate(layout.block_kinds) if k == NOISE], dtype=torch.long, device=dev)
    return PackedBatch(layout, padded_ids(seqs, layout.shape, pad_id).to(dev), text_pos.to(dev),
                       torch.cat(tgt).to(dev), torch.cat(slot).to(dev), torch.cat(lat).float(),
                       torch.cat(sig).float(), noise)


def pack_unconditional(batch: PackedBatch, uncond_ids: list[int], image_tokens: int, pad_id: int) -> PackedBatch:
    """The same noise blocks as `batch` against the unconditional context `uncond_ids` (CFG's other branch):
    each row is [uncond text] + its noise blocks (every round's, for episodes: the empty context is the
    unconditional branch of every round, as in the rollout); no text targets."""
    lat, sig = ((batch.latents_M, batch.sigma_M) if batch.noise_M is None else
                (batch.latents_M[batch.noise_M], batch.sigma_M[batch.noise_M]))
    R = batch.ids_BS.shape[0]
    W = lat.shape[0] // R
    dev = lat.device
    layout, ids = text_then_blocks([uncond_ids] * R, W, image_tokens, pad_id, device=dev)
    none = torch.zeros(0, dtype=torch.long, device=dev)
    return PackedBatch(layout, ids, none, none, none, lat, sig)


def chunks(items: list, n: int):
    """`items` in consecutive slices of at most n."""
    for i in range(0, len(items), n):
        yield items[i:i + n]
