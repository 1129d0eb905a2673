"""The packed-sequence layout: which token is text or image, who attends to whom, RoPE positions, routing.

A row of a packed batch holds one or more documents (trajectories); a document is a list of segments:
- "text": causal over all earlier visible tokens of its document;
- "noise": a noisy image block being denoised. It attends to the earlier text/full segments of its document
  and to itself (bidirectionally); nothing else attends to it. Several noise blocks after one text (the W
  window steps of a trajectory) are independent alternatives, so they share one RoPE position and do not
  advance it;
- "full": a clean image block (for editing / interleaved work): bidirectional within itself, visible to
  everything after it in its document; it takes one RoPE position and advances it by one.
All tokens of an image block share one RoPE position (BAGEL's choice). Padding tokens ("pad") see only
themselves (so no softmax row is empty) and are seen by nobody.

Legend: B rows, S tokens per row, M image blocks in the whole batch (row-major order).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

TEXT, NOISE, FULL, PAD = 0, 1, 2, -1
KINDS = {"text": TEXT, "noise": NOISE, "full": FULL}


@dataclass(frozen=True)
class Segment:
    kind: str
    """"text", "noise" or "full\""""
    length: int
    """tokens in the segment"""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"segment kind {self.kind!r} unknown; expected one of {sorted(KINDS)}")
        if not isinstance(self.length, int) or self.length <= 0:
            raise ValueError(f"segment length must be a positive int, got {self.length!r}")


@dataclass
class PackedLayout:
    """Per-token description of a packed batch. All tensors are [B, S] on one device."""

    kind_BS: torch.Tensor  # int8: TEXT / NOISE / FULL / PAD
    doc_BS: torch.Tensor  # int32: document index within the row (-1 for padding)
    seg_BS: torch.Tensor  # int32: segment index within the row, increasing along the row (-1 for padding)
    pos_BS: torch.Tensor  # int64: RoPE position
    block_starts: list[tuple[int, int, int]]  # per image block (row, start, length), row-major order
    block_kinds: list[int]  # per image block: NOISE or FULL

    @staticmethod
    def build(rows: Sequence[Sequence[Sequence[Segment]]], pad_to: int | None = None,
              device: torch.device | str = "cpu") -> "PackedLayout":
        """rows[b] = the documents of row b; a document is a sequence of Segments."""
        lengths = [sum(seg.length for doc in row for seg in doc) for row in rows]
        if not lengths:
            raise ValueError("a layout needs at least one row")
        S = max(lengths)
        if pad_to is not None:
            if pad_to < S:
                raise ValueError(f"pad_to={pad_to} is shorter than the longest row ({S} tokens)")
            S = pad_to
        B = len(rows)
        kind = torch.full((B, S), PAD, dtype=torch.int8)
        doc_id = torch.full((B, S), -1, dtype=torch.int32)
        seg_id = torch.full((B, S), -1, dtype=torch.int32)
        pos = torch.zeros((B, S), dtype=torch.int64)
        blocks, block_kinds = [], []
        for b, row in enumerate(rows):
            t, s = 0, 0
            for d, doc in enumerate(row):
                p = 0
                for seg in doc:
                    k, n = KINDS[seg.kind], seg.length
                    sl = slice(t, t + n)
                    kind[b, sl], doc_id[b, sl], seg_id[b, sl] = k, d, s
                    if k == TEXT:
                        pos[b, sl] = torch.arange(p, p + n)
                        p += n
                    else:
                        pos[b, sl] = p
                        p += 1 if k == FULL else 0
                        blocks.append((b, t, n))
                        block_kinds.append(k)
                    t, s = t + n, s + 1
        dev = torch.device(device)
        return PackedLayout(kind.to(dev), doc_id.to(dev), seg_id.to(dev), pos.to(dev), blocks, block_kinds)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.kind_BS.shape)

    @property
    def is_image_BS(self) -> torch.Tensor:
        """routing: True where the image (generation) expert handles the token"""
        return (self.kind_BS == NOISE) | (self.kind_BS == FULL)

    @property
    def is_text_BS(self) -> torch.Tensor:
        return self.kind_BS == TEXT

    def visible(self, b, q_idx, kv_idx):
        """The mask rule, elementwise over broadcastable index tensors; True = q may attend to kv.
        Shared by the dense mask and FlexAttention's mask_mod."""
        kq, kk = self.kind_BS[b, q_idx], self.kind_BS[b, kv_idx]
        sq, sk = self.seg_BS[b, q_idx], self.seg_BS[b, kv_idx]
        same_doc = (self.doc_BS[b, q_idx] == self.doc_BS[b, kv_idx]) & (kk != PAD) & (kq != PAD)
        in_segment = (sq == sk) & ((kk != TEXT) | (kv_idx <= q_idx))
        from_earlier = (sk < sq) & (kk != NOISE)
        return (same_doc & (in_segment | from_earlier)) | ((kq == PAD) & (q_idx == kv_idx))

    def dense_mask(self) -> torch.Tensor:
        """bool [B, 1, S, S], True = attend (SDPA convention)."""
        B, S = self.shape
        dev = self.kind_BS.device
        b = torch.arange(B, device=dev)[:, None, None]
        q = torch.arange(S, device=dev)[None, :, None]
        kv = torch.arange(S, device=dev)[None, None, :]
        return self.visible(b, q, kv)[:, None]

    def block_mask(self):
        """FlexAttention BlockMask of the same rule (GPU path; built once per batch)."""
        from torch.nn.attention.flex_attention import create_block_mask

        B, S = self.shape

        def mask_mod(b, h, q_idx, kv_idx):
            return self.visible(b, q_idx, kv_idx)

        return create_block_mask(mask_mod, B, None, S, S, device=self.kind_BS.device)
