"""The packed training batch (ALGORITHM.md §9): per trajectory row [prompt + reasoning] (causal text) then its
W noisy window latents, each its own block that sees the text and itself; and mini-batching of rows.

Legend: R trajectories, W window steps, T reasoning tokens, M = R·W image blocks, S packed sequence length."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from unigrpo.model import PackedLayout, text_then_blocks
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


def pack(traj: Trajectories, rows: list[int], sigmas: torch.Tensor, image_tokens: int, pad_id: int) -> PackedBatch:
    """The packed training batch of the given trajectory rows (§9)."""
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


def pack_unconditional(batch: PackedBatch, uncond_ids: list[int], image_tokens: int, pad_id: int) -> PackedBatch:
    """The same image blocks as `batch` against the unconditional context `uncond_ids` (CFG's other branch):
    each row is [uncond text] + its W noise blocks; no text targets."""
    R, M = batch.ids_BS.shape[0], batch.latents_M.shape[0]
    W = M // R
    dev = batch.latents_M.device
    layout, ids = text_then_blocks([uncond_ids] * R, W, image_tokens, pad_id, device=dev)
    none = torch.zeros(0, dtype=torch.long, device=dev)
    return PackedBatch(layout, ids, none, none, none, batch.latents_M, batch.sigma_M)


def chunks(items: list, n: int):
    """`items` in consecutive slices of at most n."""
    for i in range(0, len(items), n):
        yield items[i:i + n]
