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

`visible_rule` (`PackedLayout.visible()` on the layout's tensors) is the one mask rule. Every attention backend
derives its inputs from it or is tested against it (tests/test_attention.py): `dense_mask()` evaluates it
everywhere (SDPA); `block_mask()` classifies BLOCK×BLOCK tiles by evaluating it over chunks of query rows
(torch's uncompiled create_block_mask evaluates the whole [B, S, S] grid at once: 1.4 GB per boolean
intermediate for 8 rows of 13,312 tokens, and several of them) and hands it to FlexAttention as the mask_mod
of the partial tiles; the split / flash-attn backends read the segment table `segments` (recorded by
`build`), whose structure — each segment sees the earlier text / full segments of its document plus itself,
causally if it is text — is the same rule, checked equal to it by the tests.

Legend: B rows, S tokens per row, M image blocks in the whole batch (row-major order).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

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


def visible_rule(kind_BS, doc_BS, seg_BS, b, q_idx, kv_idx):
    """THE mask rule (see the module docstring) over a layout's [B, S] kind / document / segment tensors,
    elementwise over broadcastable index tensors b, q_idx, kv_idx; True = q may attend to kv."""
    kq, kk = kind_BS[b, q_idx], kind_BS[b, kv_idx]
    sq, sk = seg_BS[b, q_idx], seg_BS[b, kv_idx]
    same_doc = (doc_BS[b, q_idx] == doc_BS[b, kv_idx]) & (kk != PAD) & (kq != PAD)
    in_segment = (sq == sk) & ((kk != TEXT) | (kv_idx <= q_idx))
    from_earlier = (sk < sq) & (kk != NOISE)
    return (same_doc & (in_segment | from_earlier)) | ((kq == PAD) & (q_idx == kv_idx))


class SegmentSpan(NamedTuple):
    """One segment of a built layout: tokens [start, start + length) of row `row`, document `doc`."""

    row: int
    doc: int
    start: int
    length: int
    kind: int
    """TEXT, NOISE or FULL"""


@dataclass
class PackedLayout:
    """Per-token description of a packed batch. All tensors are [B, S] on one device."""

    kind_BS: torch.Tensor  # int8: TEXT / NOISE / FULL / PAD
    doc_BS: torch.Tensor  # int32: document index within the row (-1 for padding)
    seg_BS: torch.Tensor  # int32: segment index within the row, increasing along the row (-1 for padding)
    pos_BS: torch.Tensor  # int64: RoPE position
    block_starts: list[tuple[int, int, int]]  # per image block (row, start, length), row-major order
    block_kinds: list[int]  # per image block: NOISE or FULL
    segments: tuple[SegmentSpan, ...] = ()
    """every segment in row-major order (recorded by `build`; derived from the tensors when empty)"""
    attn_cache: dict = field(default_factory=dict, repr=False, compare=False)
    """per-backend attention inputs built from this layout (unigrpo.model.attention.packed_attention_inputs
    fills it), so the old-log-prob, reference and K policy forwards of one batch build them once"""

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
        blocks, block_kinds, spans = [], [], []
        for b, row in enumerate(rows):
            t, s = 0, 0
            for d, doc in enumerate(row):
                p = 0
                for seg in doc:
                    k, n = KINDS[seg.kind], seg.length
                    sl = slice(t, t + n)
                    kind[b, sl], doc_id[b, sl], seg_id[b, sl] = k, d, s
                    spans.append(SegmentSpan(b, d, t, n, k))
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
        return PackedLayout(kind.to(dev), doc_id.to(dev), seg_id.to(dev), pos.to(dev), blocks, block_kinds,
                            tuple(spans))

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
        Shared by the dense mask, the FlexAttention block mask and its mask_mod (`visible_rule`)."""
        return visible_rule(self.kind_BS, self.doc_BS, self.seg_BS, b, q_idx, kv_idx)

    def dense_mask(self) -> torch.Tensor:
        """bool [B, 1, S, S], True = attend (SDPA convention)."""
        B, S = self.shape
        dev = self.kind_BS.device
        b = torch.arange(B, device=dev)[:, None, None]
        q = torch.arange(S, device=dev)[None, :, None]
        kv = torch.arange(S, device=dev)[None, None, :]
        return self.visible(b, q, kv)[:, None]

    def segment_table(self) -> tuple[SegmentSpan, ...]:
        """`segments`, or (for a layout not made by `build`) the same table read back from the tensors."""
        if self.segments:
            return self.segments
        kind, doc, seg = self.kind_BS.cpu(), self.doc_BS.cpu(), self.seg_BS.cpu()
        spans = []
        for b in range(kind.shape[0]):
            real = torch.nonzero(kind[b] != PAD).squeeze(1).tolist()
            for t in real:
                if spans and spans[-1].row == b and int(seg[b, t]) == int(seg[b, spans[-1].start]) \
                        and spans[-1].start + spans[-1].length == t:
                    spans[-1] = spans[-1]._replace(length=spans[-1].length + 1)
                else:
                    spans.append(SegmentSpan(b, int(doc[b, t]), t, 1, int(kind[b, t])))
        return tuple(spans)

    def padded(self, length: int) -> "PackedLayout":
        """The same layout with PAD columns appended up to `length` tokens per row (they see only themselves,
        so every real token's visibility is unchanged)."""
        B, S = self.shape
        if length < S:
            raise ValueError(f"cannot pad a layout of {S} tokens to {length}")
        if length == S:
            return self
        n = length - S

        def ext(t, value):
            return torch.cat([t, t.new_full((B, n), value)], dim=1)

        return PackedLayout(ext(self.kind_BS, PAD), ext(self.doc_BS, -1), ext(self.seg_BS, -1), ext(self.pos_BS, 0),
                            list(self.block_starts), list(self.block_kinds), self.segment_table())

    def block_mask(self, pad_to: int | None = None, block_size: int = 128, max_chunk_elems: int = 1 << 26):
        """FlexAttention BlockMask of `visible()` over the layout padded to `pad_to` tokens (a multiple of
        block_size; default: S rounded up to one). Built once per batch, on the layout's device.

        Tiles are classified by evaluating `visible()` on chunks of whole query-block rows (at most
        ~max_chunk_elems mask elements at a time, so memory stays O(chunk), not O(B·S²)): a tile with every
        element visible is a "full" block (the kernel skips the mask_mod there), one with some visible a
        partial block (mask_mod = `visible()` of the padded layout, evaluated inside the kernel), the rest is
        skipped. The query and key lengths of the mask are `pad_to`; `attend` pads q/k/v to it."""
        from torch.nn.attention.flex_attention import BlockMask

        B, S = self.shape
        L = pad_to if pad_to is not None else -(-S // block_size) * block_size
        if L < S or L % block_size:
            raise ValueError(f"block_mask pad_to={L} must be >= the layout length {S} and a multiple of "
                             f"block_size={block_size}")
        lay = self.padded(L)
        dev = lay.kind_BS.device
        nb = L // block_size
        rows_per_chunk = max(1, max_chunk_elems // (B * L * block_size))
        b = torch.arange(B, device=dev)[:, None, None]
        kv = torch.arange(L, device=dev)[None, None, :]
        counts = []
        for q0 in range(0, nb, rows_per_chunk):
            q1 = min(nb, q0 + rows_per_chunk)
            q = torch.arange(q0 * block_size, q1 * block_size, device=dev)[None, :, None]
            vis = lay.visible(b, q, kv)  # [B, (q1-q0)·bs, L]
            counts.append(vis.view(B, q1 - q0, block_size, nb, block_size).sum(dim=(2, 4)))
        counts = torch.cat(counts, dim=1)[:, None]  # [B, 1, nb, nb] visible elements per tile
        full = counts == block_size * block_size
        partial = (counts > 0) & ~full

        def ordered(dense):  # (count, indices) in BlockMask's layout: the selected block indices first, in order
            num = dense.sum(-1, dtype=torch.int32)
            idx = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
            return num, idx

        kv_num, kv_idx = ordered(partial)
        full_num, full_idx = ordered(full)

        kind, doc, seg = lay.kind_BS, lay.doc_BS, lay.seg_BS

        def mask_mod(b, h, q_idx, kv_idx):  # captures tensors only (one code object): no recompile per batch
            return visible_rule(kind, doc, seg, b, q_idx, kv_idx)

        return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=mask_mod,
                                        seq_lengths=(L, L))


def padded_ids(seqs: Sequence[Sequence[int]], shape: tuple[int, int], pad_id: int) -> torch.Tensor:
    """long [R, S]: row i starts with seqs[i], the rest is pad_id (a packed batch's text ids, on the host)."""
    ids = torch.full(shape, pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return ids


def text_then_blocks(texts: Sequence[Sequence[int]], blocks: int, block_tokens: int, pad_id: int,
                     device: torch.device | str = "cpu") -> tuple[PackedLayout, torch.Tensor]:
    """The packed layout of rows [texts[i]] + `blocks` noise blocks of `block_tokens` tokens (one document a
    row: every block sees the row's text and itself) and its text ids padded with pad_id: (layout, long [R, S]),
    both on `device`."""
    rows = [[[Segment("text", len(t))] + [Segment("noise", block_tokens)] * blocks] for t in texts]
    layout = PackedLayout.build(rows, device=device)
    return layout, padded_ids(texts, layout.shape, pad_id).to(device)


def episode_document(round_texts: Sequence[int], blocks: int, block_tokens: int) -> list[Segment]:
    """The segments of one multi-round trajectory (ALGORITHM.md §12): per round r, its text (instruction +
    reasoning, round_texts[r] tokens, causal), then its `blocks` noise blocks, then, except after the last
    round, round r's clean image as a "full" block. Under `visible_rule` a round's noise blocks see exactly
    that round's context H^r (the full blocks and texts before them) and themselves; a later round's text
    never sees them. The noise blocks and the clean block of one round share one RoPE position, the one the
    rollout denoised and then appended the image at."""
    if not round_texts:
        raise ValueError("an episode needs at least one round")
    doc: list[Segment] = []
    for r, n in enumerate(round_texts):
        doc += [Segment("text", n)] + [Segment("noise", block_tokens)] * blocks
        if r < len(round_texts) - 1:
            doc.append(Segment("full", block_tokens))
    return doc


def no_text_head(hidden: torch.Tensor, weight: torch.Tensor) -> None:
    """A forward_packed text_head for forwards that need only the velocities."""
    return None
