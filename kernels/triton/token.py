"""Triton kernels of the fused token log-prob op (ALGORITHM.md §6; the spec is `token_logprobs` in
kernels/reference/text.py): log softmax((hidden·Wᵀ + bias)/τ) at the targets, optionally the entropy, and the
backward to hidden, weight and the optional lm_head bias, never holding the [T, V] logits.

Shape legend: T tokens, H hidden size, V vocabulary; S vocabulary splits of the forward; Tc token chunk and
Vb vocabulary block of the backward; z = logits/τ.

Decisions:
- Forward, grid (T-blocks × S splits): each program runs a tiled GEMM hidden[Tb]·W[tile]ᵀ with fp32
  accumulation over its slice of the vocabulary and keeps per-row online statistics: the running max m,
  s = Σ e^(z−m), a = Σ e^(z−m)·(z−m) and the target's z. `a` is shifted by m, so entropy = log s − a/s has
  no cancellation at large |z| (the unshifted Σ p·z would cancel against lse). Columns past the slice are
  −inf (and excluded from `a`, where 0·(−inf) would be NaN). The partials [4, S, T] are merged by
  `_token_merge_kernel`, each row looping over its S splits in a fixed order: deterministic, no atomics.
- Batch invariance: block sizes, the split width and the backward's Vb depend on (V, dtype, device) only,
  never on T, and no reduction is split across programs by T, so a token's log-prob, entropy and dH row are
  bitwise the same whatever else is in the batch. (The interpreter's tl.dot is numpy's matmul, whose result
  for a row depends on the row's position inside the tile: there, only position-preserving subsets match.)
- Saved for backward: lse [T] and entropy [T], fp32. Gradient of z_j, in fp32:
      d logp/dz_j = onehot_j − p_j,   d entropy/dz_j = −p_j·(z_j − Σ_k p_k z_k) = −p_j·(log p_j + entropy)
  so dz_j = g·(onehot_j − p_j) − e·p_j·(log p_j + entropy), and dlogits = dz/τ (g, e: upstream grads).
- Backward, for each Vb (outer loop) and Tc (inner loop): `_token_bwd_kernel` recomputes the logit tile and
  writes dlogits into a [Tc, Vb] scratch (fp32 math, the target's +g added before the down-cast to the dot
  dtype); `_token_mm_kernel` then does dW[Vb] (+)= dlogitsᵀ·hidden[Tc] and dH[Tc] (+)= dlogits·W[Vb] with
  tl.dot and fp32 accumulators. Sums across launches go through fp32 buffers (dH: [T, H] when V spans several
  Vb and hidden is not fp32; dW: [Vb, H] when T spans several Tc and weight is not fp32), read-modify-written
  tile by tile, each tile by one program: deterministic. The last launch stores in the output dtype.
  Extra memory: Tc·Vb scratch + T·H·4 + Vb·H·4 bytes (+ S·T·16 in the forward), never O(T·V).
- The optional bias [V] (HAS_BIAS) is added to each fp32 logit tile before 1/τ, in the forward and in the
  dlogits recompute. Its gradient dbias_v = Σ_t dlogits_tv: each dlogits program also writes its tile's fp32
  column sums into a [Tc/BT, Vb] partial buffer (WANT_DB), which torch sums over its rows in a fixed order and
  adds into an fp32 [V] accumulator chunk by chunk (deterministic, no atomics; extra memory Tc/BT·Vb·4 + V·4
  bytes). Without a bias the kernels are the unbiased ones (HAS_BIAS / WANT_DB are constexpr False).
  Cost: forward 2·T·H·V flops; backward 6·T·H·V (recompute + two GEMMs).
- Dot dtype: both operands bf16 (or both fp16) → tl.dot in that dtype with fp32 accumulation (tensor cores;
  products are exact in fp32); anything else → fp32 with input_precision="ieee" (like torch's fp32 matmul,
  no TF32). Under the interpreter every dot operand is cast to fp32 right after its load (it computes bf16
  wrongly; bf16→fp32 is exact, so only the summation order differs from the GPU). Elementwise math is fp32.
- Loop trip counts are runtime arguments passed through `_trip`: triton 3.6's interpreter calls int() on a
  1-element numpy array for a runtime range() bound, which numpy ≥ 2 refuses; a numpy integer is handed
  through untouched, so on the interpreter the counts go in as numpy integers (compiled code gets ints).
- Offsets into hidden and weight are int64 (V·H passes 2³¹ for large vocabularies and hidden sizes).
- Launch configs come from `_config` (fixed: the interpreter cannot run @triton.autotune; tiny blocks
  there so the tests cross every block, split and chunk boundary). No autotuning on GPU either: a T-keyed
  autotune would break batch invariance, and the GEMM tiles below (128×128×64, 8 warps, 3 stages) are the
  usual bf16 choice on sm_80/sm_90. Every launch variant is compiled ahead of time for sm_90a at the paper's
  and the tests' extreme shapes by tests/test_triton_aot.py (no GPU needed; triton 3.9 and 3.6): the bf16
  kernels use wgmma with a 3-stage 96 KB smem ring and do not spill (the forward, with its softmax epilogue
  on a 128×128 fp32 tile, uses all 255 registers); fp32 dots and unaligned rows use 64-row tiles (`_config`).
  Not yet run or tuned on a GPU.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from ..dispatch import triton_interpreted
from ..dtypes import KERNEL_DTYPES

__all__ = ["token_forward", "token_backward"]



@dataclass(frozen=True)
class _Config:
    block_t: int      # forward / dlogits tile rows (tokens)
    block_v: int      # forward / dlogits tile columns (vocabulary)
    block_h: int      # reduction step over H
    split: int        # forward vocabulary columns per program (a multiple of block_v)
    warps: int
    stages: int
    mm_m: int         # backward GEMM tiles
    mm_n: int
    mm_k: int
    mm_warps: int
    mm_stages: int
    vb: int           # backward vocabulary block (any size: tiles are masked)
    tc: int           # backward token chunk
    merge: int        # rows per program of the merge
    merge_warps: int


def _config(V: int, dot_f32: bool, device: torch.device, aligned: bool = True) -> _Config:
    """Launch configuration; depends on V, the dot dtype, the device and whether the hidden / weight rows are
    16-byte aligned (H·itemsize % 16 == 0) only — never on T (batch invariance)."""
    if device.type != "cuda":   # the interpreter: small tiles, many boundaries crossed by small shapes
        cfg = _Config(16, 64, 64, split=128, warps=1, stages=1, mm_m=32, mm_n=64, mm_k=64, mm_warps=1,
                      mm_stages=1, vb=128, tc=32, merge=64, merge_warps=1)
    else:
        bh = 32 if dot_f32 else 64        # fp32 tiles are twice the bytes: keep the smem ring at ~96 KB
        # 4096-column splits: the paper's V = 152,064 gives 38 splits, with T = 12,288 3,648 programs on 132 SMs
        # (the last split holds 640 columns: 27 of its 32 tiles are fully masked, 2.2% of the forward's GEMMs).
        # Vb = 4096 and Tc = 16,384: a 128 MiB bf16 scratch, and one token chunk up to T = 16,384.
        cfg = _Config(128, 128, bh, split=4096, warps=8, stages=3, mm_m=128, mm_n=128, mm_k=bh, mm_warps=8,
                      mm_stages=3, vb=4096, tc=16384, merge=256, merge_warps=4)
        # compiled for sm_90a (tests/test_triton_aot.py), the 128-row logit tile spills registers with fp32 dots
        # (28–1,624 bytes) and with bf16 rows that are not 16-byte aligned (odd H: no async copies, ~340
        # bytes); 64 rows (and 64 columns for unaligned fp32) do not spill. The aligned bf16 path is unchanged.
        if dot_f32 or not aligned:
            cfg = dataclasses.replace(cfg, block_t=64, block_v=64 if (dot_f32 and not aligned) else 128)
    # a small vocabulary: one split / one block of just enough tiles (no fully masked tiles)
    round_v = triton.cdiv(V, cfg.block_v) * cfg.block_v
    return dataclasses.replace(cfg, split=min(cfg.split, round_v), vb=min(cfg.vb, round_v))


def _trip(n: int):
    """A loop trip count as a kernel argument (see the file docstring: numpy integers on the interpreter)."""
    return np.int64(n) if triton_interpreted() else int(n)


# ----------------------------------------------------------------------------------------------- kernels

@triton.jit
def _logit_tile(h_ptr, w_ptr, rows, row_ok, cols, col_ok, H, stride_h, stride_w, n_h,
                DOT_F32: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """hidden[rows]·W[cols]ᵀ as an fp32 [BLOCK_T, BLOCK_V] tile (0 where a row or column is out of range)."""
    h_row = h_ptr + rows.to(tl.int64)[:, None] * stride_h       # [BT, 1]
    w_col = w_ptr + cols.to(tl.int64)[None, :] * stride_w       # [1, BV]
    acc = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
    for j in range(n_h):
        ks = j * BLOCK_H + tl.arange(0, BLOCK_H)
        k_ok = ks < H
        x = tl.load(h_row + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_col + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)   # Wᵀ tile [BH, BV]
        if DOT_F32:
            x = x.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(x, wt, acc, input_precision="ieee")
    return acc


@triton.jit
def _token_fwd_kernel(h_ptr, w_ptr, bias_ptr, tgt_ptr, part_ptr, T, H, V, S, stride_h, stride_w, split, inv_tau,
                      n_vt, n_h, WANT_ENT: tl.constexpr, DOT_F32: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    v_lo = pid_s * split
    v_hi = tl.minimum(v_lo + split, V)
    m = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_T], dtype=tl.float32)
    a = tl.zeros([BLOCK_T], dtype=tl.float32)
    zt = tl.zeros([BLOCK_T], dtype=tl.float32)
    for i in range(n_vt):
        cols = v_lo + i * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        acc = _logit_tile(h_ptr, w_ptr, rows, row_ok, cols, col_ok, H, stride_h, stride_w, n_h,
                          DOT_F32, BLOCK_T, BLOCK_V, BLOCK_H)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        z = tl.where(col_ok[None, :], acc * inv_tau, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))        # finite: every tile has a valid column
        alpha = tl.exp(m - m_new)                       # 0 on the first tile (m = −inf)
        d = z - m_new[:, None]
        e = tl.exp(d)                                   # 0 at masked columns
        if WANT_ENT:
            shift = tl.where(m > float("-inf"), m - m_new, 0.0)
            a = alpha * (a + shift * s) + tl.sum(e * tl.where(col_ok[None, :], d, 0.0), axis=1)   # no 0·(−inf)
        s = s * alpha + tl.sum(e, axis=1)
        m = m_new
        hit = (cols[None, :] == tgt[:, None]) & col_ok[None, :]
        zt += tl.sum(tl.where(hit, z, 0.0), axis=1)
    out = part_ptr + pid_s * T + rows                   # part [4, S, T]
    tl.store(out, m, mask=row_ok)
    tl.store(out + S * T, s, mask=row_ok)
    tl.store(out + 2 * S * T, a, mask=row_ok)
    tl.store(out + 3 * S * T, zt, mask=row_ok)


@triton.jit
def _token_merge_kernel(part_ptr, logp_ptr, ent_ptr, lse_ptr, T, S, n_s, WANT_ENT: tl.constexpr,
                        BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < T
    mx = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    for k in range(n_s):
        mx = tl.maximum(mx, tl.load(part_ptr + k * T + rows, mask=ok, other=0.0))
    s = tl.zeros([BLOCK], dtype=tl.float32)
    a = tl.zeros([BLOCK], dtype=tl.float32)
    zt = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(n_s):
        p = part_ptr + k * T + rows
        mk = tl.load(p, mask=ok, other=0.0)
        sk = tl.load(p + S * T, mask=ok, other=1.0)     # rows past T: log 1, no warnings
        scale = tl.exp(mk - mx)
        s += sk * scale
        if WANT_ENT:
            ak = tl.load(p + 2 * S * T, mask=ok, other=0.0)
            a += scale * (ak + (mk - mx) * sk)
        zt += tl.load(p + 3 * S * T, mask=ok, other=0.0)
    log_s = tl.log(s)
    lse = mx + log_s
    tl.store(lse_ptr + rows, lse, mask=ok)
    tl.store(logp_ptr + rows, zt - lse, mask=ok)
    if WANT_ENT:
        tl.store(ent_ptr + rows, log_s - a / s, mask=ok)


@triton.jit
def _token_bwd_kernel(h_ptr, w_ptr, bias_ptr, tgt_ptr, lse_ptr, ent_ptr, gl_ptr, ge_ptr, dz_ptr, db_ptr, t0, t1,
                      v0, v1, H, stride_h, stride_w, stride_dz, stride_db, inv_tau, n_h, HAS_GE: tl.constexpr,
                      DOT_F32: tl.constexpr, HAS_BIAS: tl.constexpr, WANT_DB: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """dlogits for tokens [t0, t1) × columns [v0, v1) into the scratch dz [Tc, Vb] (local indices); with WANT_DB
    also the tile's fp32 column sums into db [Tc/BLOCK_T, Vb] (row = this program's token block)."""
    lrows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    lcols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    rows = t0 + lrows
    cols = v0 + lcols
    row_ok = rows < t1
    col_ok = cols < v1
    acc = _logit_tile(h_ptr, w_ptr, rows, row_ok, cols, col_ok, H, stride_h, stride_w, n_h,
                      DOT_F32, BLOCK_T, BLOCK_V, BLOCK_H)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    g = tl.load(gl_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    logp = acc * inv_tau - lse[:, None]
    p = tl.exp(logp)
    if HAS_GE:
        ge = tl.load(ge_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        dz = -p * (g[:, None] + ge[:, None] * (logp + ent[:, None]))
    else:
        dz = -p * g[:, None]
    dz = tl.where(cols[None, :] == tgt[:, None], dz + g[:, None], dz) * inv_tau   # +g in fp32, then cast
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(dz_ptr + lrows[:, None] * stride_dz + lcols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=ok)
    if WANT_DB:
        tl.store(db_ptr + tl.program_id(0) * stride_db + lcols, tl.sum(tl.where(ok, dz, 0.0), axis=0), mask=col_ok)


@triton.jit
def _token_mm_kernel(a_ptr, b_ptr, acc_ptr, out_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, s_acc, s_out, n_k,
                     ACC_IN: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out[M, N] = (acc[M, N] if ACC_IN) + A[M, K]·B[K, N], fp32 accumulation; A, B by strides, acc/out row
    strides (unit column stride). acc may alias out: each tile is read and written by one program."""
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * n_n                 # grouped order: neighbours share B tiles in L2
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    a_row = a_ptr + rm.to(tl.int64)[:, None] * s_am
    b_col = b_ptr + rn.to(tl.int64)[None, :] * s_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i in range(n_k):
        ks = i * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_row + ks.to(tl.int64)[None, :] * s_ak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_col + ks.to(tl.int64)[:, None] * s_bk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    ok = m_ok[:, None] & n_ok[None, :]
    rm64 = rm.to(tl.int64)[:, None]
    if ACC_IN:
        acc += tl.load(acc_ptr + rm64 * s_acc + rn[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rm64 * s_out + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------- launchers

def _check(hidden_TH: Tensor, weight_VH: Tensor, targets_T: Tensor, bias_V: Tensor | None = None) -> None:
    if hidden_TH.dtype not in KERNEL_DTYPES or weight_VH.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the triton token kernels take fp32/bf16/fp16 hidden and weight, got {hidden_TH.dtype} "
                         f"and {weight_VH.dtype} (use backend='torch' for float64)")
    if hidden_TH.device != weight_VH.device or targets_T.device != hidden_TH.device:
        raise ValueError(f"hidden, weight and targets must be on one device, got {hidden_TH.device}, "
                         f"{weight_VH.device}, {targets_T.device}")
    if bias_V is not None and (bias_V.dtype not in KERNEL_DTYPES or bias_V.device != hidden_TH.device):
        raise ValueError(f"the triton token kernels take an fp32/bf16/fp16 bias on {hidden_TH.device}, got "
                         f"{bias_V.dtype} on {bias_V.device} (use backend='torch' for float64)")


def _rowmajor(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _aligned(hidden_TH: Tensor, weight_VH: Tensor) -> bool:
    """Whether every row of hidden and weight starts 16-byte aligned (their row strides in bytes)."""
    return all(t.stride(0) * t.element_size() % 16 == 0 for t in (hidden_TH, weight_VH))


def _dot_f32(hidden_TH: Tensor, weight_VH: Tensor) -> bool:
    """fp32 dots unless both operands share a 16-bit dtype (and always on the interpreter)."""
    return (triton_interpreted() or hidden_TH.dtype != weight_VH.dtype or hidden_TH.dtype == torch.float32)


def token_forward(hidden_TH: Tensor, weight_VH: Tensor, targets_T: Tensor, temperature: float,
                  want_entropy: bool, bias_V: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
    """hidden [T, H] and weight [V, H] (fp32/bf16/fp16), targets int [T] in [0, V), bias [V] or None → (logp
    [T], entropy [T] or None, lse [T]), fp32; lse is logsumexp(z) with z = (hidden·Wᵀ + bias)/τ (saved for the
    backward)."""
    _check(hidden_TH, weight_VH, targets_T, bias_V)
    bias_V = None if bias_V is None else bias_V.contiguous()
    hidden_TH, weight_VH, targets_T = _rowmajor(hidden_TH), _rowmajor(weight_VH), targets_T.contiguous()
    T, H = hidden_TH.shape
    V = weight_VH.shape[0]
    dev = hidden_TH.device
    logp = torch.empty(T, dtype=torch.float32, device=dev)
    ent = torch.empty(T, dtype=torch.float32, device=dev) if want_entropy else None
    lse = torch.empty(T, dtype=torch.float32, device=dev)
    if T == 0:
        return logp, ent, lse
    dot_f32 = _dot_f32(hidden_TH, weight_VH)
    cfg = _config(V, dot_f32, dev, _aligned(hidden_TH, weight_VH))
    S = triton.cdiv(V, cfg.split)
    part = torch.empty(4, S, T, dtype=torch.float32, device=dev)
    _token_fwd_kernel[(triton.cdiv(T, cfg.block_t), S)](
        hidden_TH, weight_VH, weight_VH if bias_V is None else bias_V, targets_T, part, T, H, V, S,
        hidden_TH.stride(0), weight_VH.stride(0), cfg.split, 1.0 / temperature, _trip(cfg.split // cfg.block_v),
        _trip(triton.cdiv(H, cfg.block_h)), WANT_ENT=want_entropy, DOT_F32=dot_f32, HAS_BIAS=bias_V is not None,
        BLOCK_T=cfg.block_t, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, num_warps=cfg.warps, num_stages=cfg.stages)
    _token_merge_kernel[(triton.cdiv(T, cfg.merge),)](
        part, logp, ent if want_entropy else logp, lse, T, S, _trip(S), WANT_ENT=want_entropy, BLOCK=cfg.merge,
        num_warps=cfg.merge_warps)
    return logp, ent, lse


def _mm(a: Tensor, a_strides: tuple[int, int], b: Tensor, b_strides: tuple[int, int], acc: Tensor | None,
        out: Tensor, M: int, N: int, K: int, dot_f32: bool, cfg: _Config) -> None:
    """out[:M, :N] = (acc if given) + A·B via `_token_mm_kernel` (A, B given as base tensors + strides)."""
    grid = (triton.cdiv(M, cfg.mm_m) * triton.cdiv(N, cfg.mm_n),)
    _token_mm_kernel[grid](
        a, b, acc if acc is not None else out, out, M, N, K, a_strides[0], a_strides[1], b_strides[0], b_strides[1],
        (acc if acc is not None else out).stride(0), out.stride(0), _trip(triton.cdiv(K, cfg.mm_k)),
        ACC_IN=acc is not None, DOT_F32=dot_f32, BLOCK_M=cfg.mm_m, BLOCK_N=cfg.mm_n, BLOCK_K=cfg.mm_k, GROUP_M=8,
        num_warps=cfg.mm_warps, num_stages=cfg.mm_stages)


def token_backward(grad_logp_T: Tensor, grad_entropy_T: Tensor | None, hidden_TH: Tensor, weight_VH: Tensor,
                   targets_T: Tensor, lse_T: Tensor, entropy_T: Tensor | None, temperature: float,
                   need_dh: bool = True, need_dw: bool = True, bias_V: Tensor | None = None,
                   need_db: bool = False) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of Σ_t g_t·logp_t + e_t·entropy_t: (dH [T, H] in hidden's dtype or None, dW [V, H] in weight's
    dtype or None, dbias [V] in the bias's dtype or None (need_db needs bias_V)). grad_entropy_T (and
    entropy_T) may be None: no entropy term."""
    _check(hidden_TH, weight_VH, targets_T, bias_V)
    if need_db and bias_V is None:
        raise ValueError("need_db needs bias_V (the forward's bias)")
    bias_V = None if bias_V is None else bias_V.contiguous()
    hidden_TH, weight_VH, targets_T = _rowmajor(hidden_TH), _rowmajor(weight_VH), targets_T.contiguous()
    T, H = hidden_TH.shape
    V = weight_VH.shape[0]
    dev = hidden_TH.device
    has_ge = grad_entropy_T is not None
    if has_ge and entropy_T is None:
        raise ValueError("grad_entropy_T needs entropy_T (the forward's entropy)")
    g = grad_logp_T.contiguous().float()
    ge = grad_entropy_T.contiguous().float() if has_ge else g
    ent = entropy_T.contiguous() if has_ge else lse_T
    dh = torch.empty_like(hidden_TH) if need_dh else None
    dw = torch.empty_like(weight_VH) if need_dw else None
    db_acc = torch.zeros(V, dtype=torch.float32, device=dev) if need_db else None
    if T == 0 or not (need_dh or need_dw or need_db):
        if dw is not None:
            dw.zero_()
        return dh, dw, (db_acc.to(bias_V.dtype) if need_db else None)
    dot_f32 = _dot_f32(hidden_TH, weight_VH)
    cfg = _config(V, dot_f32, dev, _aligned(hidden_TH, weight_VH))
    vb, tc = min(cfg.vb, V), min(cfg.tc, T)
    n_vb, n_tc = triton.cdiv(V, vb), triton.cdiv(T, tc)
    dz = torch.empty(tc, vb, dtype=torch.float32 if dot_f32 else hidden_TH.dtype, device=dev)
    # fp32 accumulators across launches (see the file docstring); fp32 outputs accumulate in place
    dh_acc = None
    if need_dh and n_vb > 1:
        dh_acc = dh if dh.dtype == torch.float32 else torch.empty(T, H, dtype=torch.float32, device=dev)
    dw_acc = None
    if need_dw and n_tc > 1 and weight_VH.dtype != torch.float32:
        dw_acc = torch.empty(vb, H, dtype=torch.float32, device=dev)
    db_part = torch.empty(triton.cdiv(tc, cfg.block_t), vb, dtype=torch.float32, device=dev) if need_db else dz
    inv_tau = 1.0 / temperature
    n_h = _trip(triton.cdiv(H, cfg.block_h))
    for iv in range(n_vb):
        v0 = iv * vb
        nv = min(vb, V - v0)
        for it in range(n_tc):
            t0 = it * tc
            nt = min(tc, T - t0)
            n_tb = triton.cdiv(nt, cfg.block_t)
            _token_bwd_kernel[(n_tb, triton.cdiv(nv, cfg.block_v))](
                hidden_TH, weight_VH, weight_VH if bias_V is None else bias_V, targets_T, lse_T, ent, g, ge, dz,
                db_part, t0, t0 + nt, v0, v0 + nv, H, hidden_TH.stride(0), weight_VH.stride(0), dz.stride(0),
                db_part.stride(0), inv_tau, n_h, HAS_GE=has_ge, DOT_F32=dot_f32, HAS_BIAS=bias_V is not None,
                WANT_DB=need_db, BLOCK_T=cfg.block_t, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
                num_warps=cfg.warps, num_stages=cfg.stages)
            if need_db:   # the tile column sums, summed over token blocks in order (deterministic)
                db_acc[v0:v0 + nv] += db_part[:n_tb, :nv].sum(dim=0)
            if need_dw:   # dW[v0:v0+nv] (+)= dzᵀ · hidden[t0:t0+nt]; A = dzᵀ: strides (1, Tc-row stride)
                out_w = dw[v0:v0 + nv]
                if dw_acc is None:        # one token chunk, or fp32 weight: accumulate in the output itself
                    _mm(dz, (1, dz.stride(0)), hidden_TH[t0:], (hidden_TH.stride(0), 1),
                        out_w if it > 0 else None, out_w, nv, H, nt, dot_f32, cfg)
                else:
                    _mm(dz, (1, dz.stride(0)), hidden_TH[t0:], (hidden_TH.stride(0), 1),
                        dw_acc if it > 0 else None, out_w if it == n_tc - 1 else dw_acc, nv, H, nt, dot_f32, cfg)
            if need_dh:   # dH[t0:t0+nt] (+)= dz · W[v0:v0+nv]
                out_h = dh[t0:t0 + nt] if iv == n_vb - 1 else dh_acc[t0:t0 + nt]
                acc_h = dh_acc[t0:t0 + nt] if iv > 0 else None
                _mm(dz, (dz.stride(0), 1), weight_VH[v0:], (weight_VH.stride(0), 1), acc_h, out_h, nt, H, nv,
                    dot_f32, cfg)
    return dh, dw, (db_acc.to(bias_V.dtype) if need_db else None)
