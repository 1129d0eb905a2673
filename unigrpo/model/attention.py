"""Attention over the packed mixed text/image sequence.

Backends (one explicit switch, chosen by the caller):
- "sdpa": torch's scaled_dot_product_attention with a dense boolean mask [B, 1, S, Skv]. Runs everywhere
  (CPU included) and in float64; the reference every other backend is tested against.
- "flex": FlexAttention with a BlockMask built once per batch from the layout (GPU; FlexAttention has no
  CPU backward in the torch versions we support).
q [B, heads, S, hd]; k, v [B, kv_heads, Skv, hd] (GQA: heads is a multiple of kv_heads).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "flex")
_flex = None


def _flex_attention():
    global _flex
    if _flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _flex = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention
    return _flex


def attend(q, k, v, *, mask=None, block_mask=None, backend: str = "sdpa"):
    """Scaled dot-product attention; returns [B, heads, S, hd]."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    if backend == "flex":
        if block_mask is None:
            raise ValueError("the flex attention backend needs a block_mask (PackedLayout.block_mask())")
        return _flex_attention()(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
