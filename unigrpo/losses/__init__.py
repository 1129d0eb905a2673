"""The training objectives and their parts (ALGORITHM.md §5–§9, §11), used by unigrpo.trainer:

    config.py    LossConfig, ReFLConfig (the allowed aggregations and regularisers are the kernels' own)
    packing.py   PackedBatch: the packed training batch of trajectory rows; mini-batches
    forward.py   PackedForward: the policy's or the reference's packed forward (token log-probs, guided v)
    grpo.py      UniGRPOObjective: prepare (no-grad recompute of the old policy, ξ) and the mini-batch loss
                 L_text + λ·L_flow + β·L_reg
    refl.py      ReFLObjective: the ReFL baseline's surrogate loss

An objective has `prepare(traj, rows, adv_R, prompts, minibatches)` and `loss(prepared, rows)`; the trainer
owns the loop, the backward and the optimizer step. The losses' math lives in unigrpo_kernels (the
reference implementations are the spec)."""
from unigrpo.losses.config import AGGREGATIONS, REGS, LossConfig, ReFLConfig
from unigrpo.losses.packing import PackedBatch, chunks, pack, pack_unconditional

__all__ = ["AGGREGATIONS", "REGS", "LossConfig", "ReFLConfig", "PackedBatch", "chunks", "pack", "pack_unconditional"]
