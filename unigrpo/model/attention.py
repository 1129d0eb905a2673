"""Attention over the packed mixed text/image sequence: one interface (`attend`), four backends.

The mask rule is `PackedLayout.visible()` (layout.py): text causal within its document; an image block sees the
earlier text and clean ("full") blocks of its document and itself, bidirectionally; "noise" blocks are seen by
nobody else; padding sees only itself. Every backend computes exactly that attention; tests/test_attention.py
checks each against the dense-mask SDPA reference.

Backends (`resolve_attention_backend` picks one, once, and logs it; `packed_attention_inputs` builds what it
needs once per batch; the model's layers call `attend`):
- "sdpa": torch's scaled_dot_product_attention with the dense boolean mask [B, 1, S, S]. Any device, float64
  included: the reference, the CPU path, and the cached (generation) path's only backend.
- "flex": FlexAttention with a BlockMask from `PackedLayout.block_mask` (full tiles skip the mask_mod, empty
  tiles are skipped; built by evaluating `visible()` on chunks of query rows, never an O(B·S²) index tensor).
  Compiled with torch.compile(dynamic=False) on CUDA; eager on CPU (forward only: FlexAttention has no CPU
  backward, and eager materialises the scores). How recompiles are avoided: the compiled kernel is specialised
  to the shapes of q/k/v and of the BlockMask's tensors, so every batch is padded (inside `attend`, q/k/v
  only; the rest of the model keeps S) to a bucket length `flex_bucket(S)` — multiples of 128 up to 1024,
  then 8 lengths per octave (≤ 12.5% padding; a padded key tile costs one diagonal block). The mask_mod is a
  closure of one code object whose captured layout tensors have the bucket's shape, so a new batch in a
  known bucket (same B, dtype, grad mode) reuses the compiled kernel. Training at 1024 px (S = 12,288 image
  tokens + 100–700 text) lands in one bucket (13,312). Keep the number of (B, bucket, grad mode)
  combinations below dynamo's recompile limit (8 by default).
- "split": the design of a flash-attn varlen path in pure torch (any device, float64, exact autograd): every
  segment's queries attend to two disjoint key sets — the earlier context (text / full segments) of their
  document, non-causally, and the segment itself (causal for text, bidirectional for an image block) — each a
  separate attention returning its log-sum-exp, merged exactly by `merge_partials`:
  o = (e^{lse1}·o1 + e^{lse2}·o2) / (e^{lse1} + e^{lse2}). Segments of equal length are batched; blocks that
  share a prefix (the W window blocks of a trajectory) share one prefix attention. Scores are materialised
  per segment group in fp32 (float64 stays float64): a reference, not a fast path.
- "flash": flash-attn's `flash_attn_varlen_func` (optional extra; imported on first use; "flash" is an error
  when it is not importable). Same decomposition as "split", but each segment is one varlen sequence whose
  keys are gathered as [its earlier context, itself] (`causal=True` for text uses flash-attn's bottom-right
  alignment, which is exactly "all the context plus causal within the segment"), so no merge is needed: two
  calls per layer (text causal, images bidirectional). Why not the log-sum-exp merge on flash-attn: its
  autograd Functions drop the gradient of the returned softmax_lse (`backward(ctx, dout, *args)` in
  flash_attn/flash_attn_interface.py), so a merge through it would give wrong gradients. The gather costs a
  copy of Q, of K/V with each block's context repeated (W·T = 1,536 extra key tokens per trajectory at
  1024 px: 12% more K/V than the 12,800 tokens) and a scatter of the output; the FLOPs are unchanged. The
  packing runs on CPU with `varlen_attention_reference` (flash-attn's contract in torch) standing in for the
  kernel, so only the kernel call itself needs a GPU to test.

Tensors: q [B, heads, S, hd]; k, v [B, kv_heads, S, hd] (GQA: query head h uses kv head h // (heads /
kv_heads), as SDPA's enable_gqa, FlexAttention and flash-attn do); flat token index = row·S + position.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from unigrpo.model.layout import FULL, NOISE, PAD, TEXT, PackedLayout
from unigrpo_kernels.dispatch import resolve_request

logger = logging.getLogger(__name__)

BACKENDS = ("sdpa", "flex", "split", "flash")
"""the concrete backends; "auto" resolves to one of them"""
_logged: set[tuple] = set()
_flex_fns: dict[bool, Callable] = {}
_flash: dict[str, object] = {}


# ------------------------------------------------------------------------------------------------ selection

def flash_available() -> bool:
    """True when flash-attn imports (tried once per process, on first call; never at import time)."""
    if "fn" not in _flash:
        try:
            from flash_attn import flash_attn_varlen_func
            _flash["fn"], _flash["error"] = flash_attn_varlen_func, None
        except Exception as err:  # ImportError, or a build that does not match this torch
            _flash["fn"], _flash["error"] = None, f"{type(err).__name__}: {err}"
    return _flash["fn"] is not None


def flash_varlen_kernel() -> Callable:
    """flash_attn.flash_attn_varlen_func. Test hook: tests replace this function (monkeypatch) with one
    returning `varlen_attention_reference`, to run the "flash" packing on CPU."""
    if not flash_available():
        raise RuntimeError(f"attention backend 'flash' needs flash-attn, which is not importable here "
                           f"({_flash['error']}); install the optional extra (pip install flash-attn) or use "
                           f"'flex' / 'split' / 'sdpa'")
    return _flash["fn"]


def resolve_attention_backend(name: str = "auto", device=None) -> str:
    """"auto" | "sdpa" | "flex" | "split" | "flash" → a concrete backend for `device` (default: cuda when
    available). "auto" is "flex" on CUDA and "sdpa" elsewhere (flash-attn is used only when asked for);
    "flash" must be importable and on CUDA; "flex" on CPU is allowed but forward-only. Logged once per
    (request, device, choice). ValueError names a bad request and what is allowed."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                       else "cpu")

    def choose(req: str) -> str:
        if req == "auto":
            return "flex" if dev.type == "cuda" else "sdpa"
        if req == "flash" and not flash_available():
            raise ValueError(f"attention backend 'flash' needs flash-attn, not importable here ({_flash['error']});"
                             " install the optional extra or choose 'auto', 'flex', 'split' or 'sdpa'")
        if req == "flash" and dev.type != "cuda":
            raise ValueError(f"attention backend 'flash' runs on CUDA only, not on device {dev}")
        return req

    return resolve_request(name, kind="attention", known=BACKENDS, choose=choose, where=f"device {dev}",
                           logged=_logged, log=logger,
                           note=lambda c: " (FlexAttention on CPU: eager, forward only)" if c == "flex"
                           and dev.type != "cuda" else "")


def flex_bucket(length: int, granule: int = 128, steps_per_octave: int = 8) -> int:
    """The padded length FlexAttention runs at: the smallest multiple of `granule` ≥ length up to
    granule·steps_per_octave (1024), above that the smallest multiple of 2^⌊log2 length⌋ / steps_per_octave,
    so at most steps_per_octave buckets per octave and ≤ 1/steps_per_octave padding."""
    if length < 1:
        raise ValueError(f"flex_bucket needs a positive length, got {length}")
    octave = 1 << (length.bit_length() - 1)
    step = max(granule, octave // steps_per_octave)
    return -(-length // step) * step


# -------------------------------------------------------------------------------------------- math pieces

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def attention_with_lse(q, k, v, causal: bool = False, scale: float | None = None):
    """Softmax attention that also returns the log-sum-exp of each row, differentiable in both.

    q [G, heads, n, hd]; k, v [G, kv_heads, m, hd] → (o [G, heads, n, hd], lse [G, heads, n]) in fp32 for
    fp16/bf16 inputs, else in the input dtype. `causal`: bottom-right aligned (query i sees key j iff
    j ≤ i + m − n, flash-attn's convention). A row that sees no key gets o = 0 and lse = −inf."""
    G, H, n, hd = q.shape
    Hk, m = k.shape[1], k.shape[2]
    acc = _acc_dtype(q.dtype)
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    if m == 0:
        return q.new_zeros(G, H, n, hd, dtype=acc), q.new_full((G, H, n), -math.inf, dtype=acc)
    qg = q.to(acc).reshape(G, Hk, H // Hk, n, hd)
    s = torch.matmul(qg, k.to(acc)[:, :, None].transpose(-1, -2)) * scale  # [G, Hk, R, n, m]
    if causal:
        i = torch.arange(n, device=q.device)[:, None]
        j = torch.arange(m, device=q.device)[None, :]
        s = s.masked_fill(j > i + (m - n), -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    lse_safe = lse.masked_fill(~torch.isfinite(lse), 0.0)  # empty rows: p = 0 instead of NaN
    p = torch.exp(s - lse_safe[..., None])
    o = torch.matmul(p, v.to(acc)[:, :, None])  # [G, Hk, R, n, hd]
    return o.reshape(G, H, n, hd), lse.reshape(G, H, n)


def merge_partials(o1, lse1, o2, lse2):
    """Exact merge of two attentions of the same queries over disjoint key sets: o [..., hd], lse [...] →
    (o, lse) of the attention over the union, o = (e^{lse1}·o1 + e^{lse2}·o2) / (e^{lse1} + e^{lse2}) in the
    stable form w_i = e^{lse_i − lse}, lse = logaddexp(lse1, lse2). One side may be −inf (no keys): its
    weight and gradient are 0. Both −inf is undefined (the plan never produces it)."""
    lse = torch.logaddexp(lse1, lse2)
    w1 = torch.exp(lse1 - lse)[..., None]
    w2 = torch.exp(lse2 - lse)[..., None]
    return w1 * o1 + w2 * o2, lse


def varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False):
    """flash_attn_varlen_func's contract in torch (no dropout): q [total_q, heads, hd], k/v [total_k, kv_heads,
    hd], cu_seqlens int32 [n + 1] → out [total_q, heads, hd] in q's dtype; causal bottom-right aligned; a row
    with no key gets 0. One attention per sequence (host loop): for tests and the CPU path of "flash"."""
    if dropout_p:
        raise ValueError("varlen_attention_reference has no dropout")
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = []
    for i in range(len(cq) - 1):
        qi = q[cq[i]:cq[i + 1]].transpose(0, 1)[None]
        ki = k[ck[i]:ck[i + 1]].transpose(0, 1)[None]
        vi = v[ck[i]:ck[i + 1]].transpose(0, 1)[None]
        o, _ = attention_with_lse(qi, ki, vi, causal=causal, scale=softmax_scale)
        outs.append(o[0].transpose(0, 1).to(q.dtype))
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


# ------------------------------------------------------------------------------------ the per-batch plan

@dataclass
class SelfGroup:
    """G segments of n tokens each, attending to themselves: idx long [G, n] (flat token indices)."""

    idx: torch.Tensor
    causal: bool


@dataclass
class PrefixGroup:
    """Queries long [nq] (one or more segments that share a prefix) over the prefix keys long [P] (P > 0)."""

    q_idx: torch.Tensor
    kv_idx: torch.Tensor


@dataclass
class VarlenPart:
    """One flash_attn_varlen_func call: sequence i has queries q_idx[cu_q[i]:cu_q[i+1]] and keys
    kv_idx[cu_k[i]:cu_k[i+1]] (its earlier context, then itself); cu_* int32 [n + 1]."""

    q_idx: torch.Tensor
    kv_idx: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    causal: bool


@dataclass
class SplitPlan:
    """What the split and flash backends need of one layout (index tensors on the layout's device)."""

    shape: tuple[int, int]
    self_groups: list[SelfGroup]
    """by (length, causal); the padding tokens are one group of length 1"""
    prefix_groups: list[PrefixGroup]
    varlen: list[VarlenPart]
    """the text part (causal) and the image part (bidirectional), those that are not empty"""
    pad_idx: torch.Tensor
    """long [n_pad] flat indices of padding tokens (they attend to themselves only)"""


def build_split_plan(layout: PackedLayout) -> SplitPlan:
    """The segment decomposition of `layout.visible()`: segment g of document d sees ctx(d, g) — the earlier
    TEXT/FULL segments of d — fully, plus itself (causally if TEXT). Built on the host from the segment table,
    moved to the layout's device once."""
    B, S = layout.shape
    dev = layout.kind_BS.device
    by_len: dict[tuple[int, bool], list[int]] = {}
    prefix: dict[tuple[int, int, int], tuple[list[tuple[int, int]], list[tuple[int, int]]]] = {}
    parts = {True: ([], [], [0], [0]), False: ([], [], [0], [0])}  # causal → (q ranges, kv ranges, cu_q, cu_k)
    ctx: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for sp in layout.segment_table():
        start, n = sp.row * S + sp.start, sp.length
        causal = sp.kind == TEXT
        pre = ctx.setdefault((sp.row, sp.doc), [])
        by_len.setdefault((n, causal), []).append(start)
        if pre:
            key = (sp.row, sp.doc, len(pre))
            prefix.setdefault(key, ([], list(pre)))[0].append((start, n))
        q_r, kv_r, cu_q, cu_k = parts[causal]
        q_r.append((start, n))
        kv_r.extend(pre + [(start, n)])
        cu_q.append(cu_q[-1] + n)
        cu_k.append(cu_k[-1] + sum(length for _, length in pre) + n)
        if sp.kind in (TEXT, FULL):
            pre.append((start, n))
        elif sp.kind != NOISE:
            raise ValueError(f"segment kind {sp.kind} unknown")

    def cat(ranges):
        if not ranges:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat([torch.arange(s, s + n) for s, n in ranges])

    pad_idx = torch.nonzero(layout.kind_BS.reshape(-1).cpu() == PAD).squeeze(1)
    groups = [SelfGroup((torch.tensor(starts)[:, None] + torch.arange(n)[None]).to(dev), causal)
              for (n, causal), starts in sorted(by_len.items())]
    if pad_idx.numel():
        groups.append(SelfGroup(pad_idx[:, None].to(dev), False))
    pgroups = [PrefixGroup(cat(qs).to(dev), cat(kvs).to(dev)) for qs, kvs in prefix.values()]
    varlen = []
    for causal in (True, False):
        q_r, kv_r, cu_q, cu_k = parts[causal]
        if q_r:
            lq = [b - a for a, b in zip(cu_q, cu_q[1:])]
            lk = [b - a for a, b in zip(cu_k, cu_k[1:])]
            varlen.append(VarlenPart(cat(q_r).to(dev), cat(kv_r).to(dev), torch.tensor(cu_q, dtype=torch.int32,
                                     device=dev), torch.tensor(cu_k, dtype=torch.int32, device=dev), max(lq),
                                     max(lk), causal))
    return SplitPlan((B, S), groups, pgroups, varlen, pad_idx.to(dev))


def packed_attention_inputs(layout: PackedLayout, backend: str) -> dict:
    """The keyword inputs `attend` needs for `backend` on this batch — {"mask"} (sdpa), {"block_mask"} (flex,
    padded to flex_bucket(S)) or {"plan"} (split, flash) — built once per (layout, backend) and kept in
    layout.attn_cache."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {', '.join(BACKENDS)} "
                         "(resolve 'auto' with resolve_attention_backend first)")
    key = "plan" if backend in ("split", "flash") else backend
    if key not in layout.attn_cache:
        if backend == "sdpa":
            layout.attn_cache[key] = {"mask": layout.dense_mask()}
        elif backend == "flex":
            layout.attn_cache[key] = {"block_mask": layout.block_mask(pad_to=flex_bucket(layout.shape[1]))}
        else:
            layout.attn_cache[key] = {"plan": build_split_plan(layout)}
    return layout.attn_cache[key]


# ------------------------------------------------------------------------------------------------- attend

def _flex_fn(compiled: bool) -> Callable:
    if compiled not in _flex_fns:
        from torch.nn.attention.flex_attention import flex_attention

        _flex_fns[compiled] = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    return _flex_fns[compiled]


def _flex_attend(q, k, v, block_mask):
    S = q.shape[2]
    L = block_mask.seq_lengths[0]
    if L < S:
        raise ValueError(f"block mask is for {L} tokens, q has {S}")
    if L > S:  # the bucket's padding: zero q/k/v rows that attend to themselves only
        pad = (0, 0, 0, L - S)
        q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
    out = _flex_fn(q.is_cuda)(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])
    return out[:, :, :S]


def _flat(x):
    """[B, h, S, hd] → [B·S, h, hd] (a view when x is the transpose of a token-major tensor, as in the model)."""
    B, h, S, hd = x.shape
    return x.transpose(1, 2).reshape(B * S, h, hd)


def _split_attend(q, k, v, plan: SplitPlan, max_scores: int = 1 << 28):
    B, H, S, hd = q.shape
    acc = _acc_dtype(q.dtype)
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    o_self = qf.new_zeros(B * S, H, hd, dtype=acc)
    l_self = qf.new_full((B * S, H), -math.inf, dtype=acc)
    o_pre, l_pre = torch.zeros_like(o_self), torch.full_like(l_self, -math.inf)
    for g in plan.self_groups:
        G, n = g.idx.shape
        step = max(1, max_scores // (H * n * n))  # bound the materialised scores per call
        for c in range(0, G, step):
            idx = g.idx[c:c + step]
            o, lse = attention_with_lse(qf[idx].transpose(1, 2), kf[idx].transpose(1, 2), vf[idx].transpose(1, 2),
                                        causal=g.causal)
            flat = idx.reshape(-1)
            o_self[flat] = o.transpose(1, 2).reshape(-1, H, hd)
            l_self[flat] = lse.transpose(1, 2).reshape(-1, H)
    for p in plan.prefix_groups:
        o, lse = attention_with_lse(qf[p.q_idx].transpose(0, 1)[None], kf[p.kv_idx].transpose(0, 1)[None],
                                    vf[p.kv_idx].transpose(0, 1)[None])
        o_pre[p.q_idx] = o[0].transpose(0, 1)
        l_pre[p.q_idx] = lse[0].transpose(0, 1)
    out, _ = merge_partials(o_self, l_self, o_pre, l_pre)
    return out.to(q.dtype).view(B, S, H, hd).transpose(1, 2)


def _flash_attend(q, k, v, plan: SplitPlan):
    kernel = flash_varlen_kernel()
    B, H, S, hd = q.shape
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    out = qf.new_zeros(B * S, H, hd)
    for part in plan.varlen:
        out[part.q_idx] = kernel(qf[part.q_idx], kf[part.kv_idx], vf[part.kv_idx], part.cu_q, part.cu_k,
                                 part.max_q, part.max_k, causal=part.causal)
    if plan.pad_idx.numel():
        out[plan.pad_idx] = vf[plan.pad_idx].repeat_interleave(H // k.shape[1], dim=1)
    return out.view(B, S, H, hd).transpose(1, 2)


def attend(q, k, v, *, mask=None, block_mask=None, plan: SplitPlan | None = None, backend: str = "sdpa"):
    """Scaled dot-product attention → [B, heads, S, hd] in q's dtype. q [B, heads, S, hd]; k, v
    [B, kv_heads, Skv, hd]. Backend inputs (from `packed_attention_inputs`): "sdpa" `mask` bool
    [B, 1, S, Skv] (the cached path passes its own); "flex" `block_mask`; "split" / "flash" `plan`
    (Skv = S: packed self-attention only)."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    if backend == "flex":
        if block_mask is None:
            raise ValueError("the flex attention backend needs a block_mask (packed_attention_inputs(layout, 'flex'))")
        return _flex_attend(q, k, v, block_mask)
    if backend in ("split", "flash"):
        if plan is None:
            raise ValueError(f"the {backend} attention backend needs a plan (packed_attention_inputs(layout, "
                             f"{backend!r}))")
        if plan.shape != (q.shape[0], q.shape[2]) or k.shape[2] != q.shape[2]:
            raise ValueError(f"plan is for [B, S] = {plan.shape}, got q {tuple(q.shape)} and k {tuple(k.shape)}")
        return _split_attend(q, k, v, plan) if backend == "split" else _flash_attend(q, k, v, plan)
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {', '.join(BACKENDS)}")
