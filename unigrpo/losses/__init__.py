"""The training objective's parts: the loss options (config.py) and the packed training batch (packing.py).
The losses' math lives in unigrpo_kernels (the reference implementations are the spec)."""
from unigrpo.losses.config import AGGREGATIONS, REGS, LossConfig, ReFLConfig
from unigrpo.losses.packing import PackedBatch, chunks, pack, pack_unconditional

__all__ = ["AGGREGATIONS", "REGS", "LossConfig", "ReFLConfig", "PackedBatch", "chunks", "pack", "pack_unconditional"]
