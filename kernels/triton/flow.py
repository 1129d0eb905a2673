"""Triton kernels of the flow ops (ALGORITHM.md §3, §7, §8): the SDE step, and the per-row sums of the
FlowGRPO loss with their backward. The math is kernels/reference/flow.py; these compute exactly its
`sde_step` per-element part and its `flow_row_sums`, and are tested against them.

Shape legend: B rows (samples × window steps, all in one launch), D latent elements per row (any D ≥ 1).

Decisions:
- Every per-row reduction runs over a grid (B, chunks): each program reduces CHUNK = BLOCK·ITERS elements
  of one row in fp32 and writes a partial; the partials [B, chunks] are summed by torch afterwards in a
  fixed order, so results are bit-reproducible (no float atomics) and short rows still fill the GPU.
- Per-row scalars (a, b, s of §3 — computed once per step in float64 by `step_coeffs_batch`, passed as
  fp32 [B]) are loaded once per program, never recomputed per element.
- Loads are cast to fp32 right after the load (v may be bf16 / fp16 / fp32; latents and ξ are fp32); the
  Triton interpreter computes bf16 arithmetic wrongly otherwise, and fp32 is the compute dtype of §3 anyway.
- Loop trip counts are constexpr (ITERS, ROW_BLOCKS, CHUNK_BLOCKS): the Triton 3.6 interpreter cannot
  loop over a run-time bound with NumPy ≥ 2.4 (it converts a 1-element array with int()); 3.9 can.
- Offsets are int64 (the paper's shape is 72 × 262,144 = 1.9e7 elements per stream; larger batches pass 2³¹).
- The per-row scalar math of the loss (reference `flow_loss_from_sums`: ratios, clipping, regulariser, the
  metrics) runs in one more small kernel, `_flow_loss_finalize_kernel`, which also writes the per-row
  gradient coefficients dL/d(sums) for the backward: in eager mode the ~40 tiny torch ops it replaces
  would cost more launch time (~5 µs each) than the streams themselves (~60 µs each way at the paper's
  shape on an H100). The clip gradient follows torch's rules exactly (minimum splits ties, clamp passes its
  bounds): dsurrogate/dr = A, except 0 where the clipped branch is strictly the minimum.
- Launch configs come from `_config`: fixed sizes (the interpreter cannot run @triton.autotune, and these
  ops are memory-bound streams where a 2–4K-element block with 4–8 warps is near the copy roofline).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..dtypes import KERNEL_DTYPES
from ..reference.flow import FLOW_METRICS, REG_CODES

__all__ = ["sde_step_fwd", "flow_sums_fwd", "flow_sums_partials", "flow_loss_finalize", "flow_sums_bwd"]





def _config(D: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK, ITERS, chunks, num_warps) for rows of D elements. On the interpreter: small blocks."""
    if device.type != "cuda":
        block, iters, warps = 64, 2, 1
    else:
        block, warps = (2048, 8) if D >= 2048 else (max(triton.next_power_of_2(D), 128), 4)
        iters = 4 if D >= 4 * 8192 else 1     # 8K-element chunks: 72 × 262,144 → 2,304 programs on 132 SMs
    chunks = triton.cdiv(D, block * iters)
    return block, iters, chunks, warps


def _finalize_blocks(B: int, C: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_B rows, BLOCK_C partials) per step of the finalize kernel; smaller on the interpreter. On GPU the
    [BLOCK_B, BLOCK_C] partial tile is capped at 2,048 elements (16 fp32 registers a thread at 4 warps): compiled
    for sm_90a (tests/test_triton_aot.py) a 1024 × 64 tile (B ≥ 1024 rows) spilled ~200 KB a thread, a
    64 × 64 one still 716 bytes; 32 × 64 uses 189 registers and does not spill."""
    cuda = device.type == "cuda"
    block_c = min(max(triton.next_power_of_2(C), 2), 64 if cuda else 8)
    block_b = min(max(triton.next_power_of_2(B), 16), max(16, 2048 // block_c) if cuda else 64)
    return block_b, block_c


# ----------------------------------------------------------------------------------------------- kernels

@triton.jit
def _sde_step_fwd_kernel(x_ptr, v_ptr, xi_ptr, a_ptr, b_ptr, s_ptr, xn_ptr, mean_ptr, part_ptr, D, chunks,
                         WANT_MEAN: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    a = tl.load(a_ptr + row)
    b = tl.load(b_ptr + row)
    s = tl.load(s_ptr + row)
    base = row.to(tl.int64) * D
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for it in range(ITERS):
        col = (chunk * ITERS + it) * BLOCK + tl.arange(0, BLOCK)
        m = col < D
        off = base + col
        x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + off, mask=m, other=0.0).to(tl.float32)
        xi = tl.load(xi_ptr + off, mask=m, other=0.0).to(tl.float32)
        mean = a * x + b * v
        xn = mean + s * xi
        tl.store(xn_ptr + off, xn, mask=m)
        if WANT_MEAN:
            tl.store(mean_ptr + off, mean, mask=m)
        d = tl.where(m, xn - mean, 0.0)
        acc += d * d
    tl.store(part_ptr + row * chunks + chunk, tl.sum(acc, axis=0))


@triton.jit
def _flow_sums_fwd_kernel(v_ptr, xi_ptr, vo_ptr, vr_ptr, part_ptr, D, chunks,
                          BLOCK: tl.constexpr, ITERS: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    base = row.to(tl.int64) * D
    acc0 = tl.zeros([BLOCK], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    for it in range(ITERS):
        col = (chunk * ITERS + it) * BLOCK + tl.arange(0, BLOCK)
        m = col < D
        off = base + col
        v = tl.load(v_ptr + off, mask=m, other=0.0).to(tl.float32)
        xi = tl.load(xi_ptr + off, mask=m, other=0.0).to(tl.float32)
        vo = tl.load(vo_ptr + off, mask=m, other=0.0).to(tl.float32)
        vr = tl.load(vr_ptr + off, mask=m, other=0.0).to(tl.float32)
        d_old = v - vo
        d_ref = v - vr
        acc0 += xi * d_old
        acc1 += d_old * d_old
        acc2 += d_ref * d_ref
    out = part_ptr + (row * chunks + chunk) * 3
    tl.store(out, tl.sum(acc0, axis=0))
    tl.store(out + 1, tl.sum(acc1, axis=0))
    tl.store(out + 2, tl.sum(acc2, axis=0))


@triton.jit
def _flow_sums_bwd_kernel(g_ptr, v_ptr, xi_ptr, vo_ptr, vr_ptr, dv_ptr, D,
                          USE_OLD: tl.constexpr, USE_REF: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    g0 = tl.load(g_ptr + row * 3)
    base = row.to(tl.int64) * D
    for it in range(ITERS):
        col = (chunk * ITERS + it) * BLOCK + tl.arange(0, BLOCK)
        m = col < D
        off = base + col
        dv = g0 * tl.load(xi_ptr + off, mask=m, other=0.0).to(tl.float32)
        if USE_OLD or USE_REF:
            v = tl.load(v_ptr + off, mask=m, other=0.0).to(tl.float32)
            if USE_OLD:
                g1 = tl.load(g_ptr + row * 3 + 1)
                dv += 2.0 * g1 * (v - tl.load(vo_ptr + off, mask=m, other=0.0).to(tl.float32))
            if USE_REF:
                g2 = tl.load(g_ptr + row * 3 + 2)
                dv += 2.0 * g2 * (v - tl.load(vr_ptr + off, mask=m, other=0.0).to(tl.float32))
        tl.store(dv_ptr + off, dv.to(dv_ptr.dtype.element_ty), mask=m)


@triton.jit
def _flow_loss_finalize_kernel(part_ptr, chunks, adv_ptr, b_ptr, s_ptr, h_ptr, loss_ptr, metrics_ptr, coef_ptr,
                               B, D, lo, hi, beta, fw, RATIO_NORM: tl.constexpr, REWEIGHT: tl.constexpr,
                               REG: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                               ROW_BLOCKS: tl.constexpr, CHUNK_BLOCKS: tl.constexpr):
    # one program: rows in blocks of BLOCK_B, partials reduced over chunks in a fixed order
    policy_sum = 0.0
    reg_sum = 0.0
    ratio_sum = 0.0
    clip_count = 0.0
    bias_sum = 0.0
    mse_sum = 0.0
    ratio_max = -float("inf")
    ratio_min = float("inf")
    lr_abs_max = 0.0
    inv_B = 1.0 / B
    for rb in range(ROW_BLOCKS):
        rows = rb * BLOCK_B + tl.arange(0, BLOCK_B)
        rm = rows < B
        s0 = tl.zeros([BLOCK_B], dtype=tl.float32)
        s1 = tl.zeros([BLOCK_B], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_B], dtype=tl.float32)
        for cb in range(CHUNK_BLOCKS):
            cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
            m2 = rm[:, None] & (cols < chunks)[None, :]
            off = (rows[:, None] * chunks + cols[None, :]) * 3
            s0 += tl.sum(tl.load(part_ptr + off, mask=m2, other=0.0), axis=1)
            s1 += tl.sum(tl.load(part_ptr + off + 1, mask=m2, other=0.0), axis=1)
            s2 += tl.sum(tl.load(part_ptr + off + 2, mask=m2, other=0.0), axis=1)
        adv = tl.load(adv_ptr + rows, mask=rm, other=0.0)
        b = tl.load(b_ptr + rows, mask=rm, other=0.0)
        s = tl.load(s_ptr + rows, mask=rm, other=1.0)
        h = tl.load(h_ptr + rows, mask=rm, other=1.0)
        lr_hat = b * s0 / D                                   # log r̂ = mean_D(ξ·Δμ), Δμ = b·(v − v_old)
        bias = b * b * s1 / (2.0 * s * s * D)                 # mean_D(Δμ²)/(2s²)
        if RATIO_NORM:
            lr = lr_hat
            dlr_ds0 = b / D
        else:
            lr = lr_hat / s - bias
            dlr_ds0 = b / (s * D)
        r = tl.exp(lr)
        if REWEIGHT:
            w = 1.0 / h
        else:
            w = tl.full([BLOCK_B], 1.0, tl.float32)
        clipped = tl.minimum(tl.maximum(r, lo), hi)
        surr = tl.minimum(r * adv, clipped * adv)
        active = ((adv > 0) & (r > hi)) | ((adv < 0) & (r < lo))
        mse = s2 / D
        if REG == 0:
            reg_k = tl.full([BLOCK_B], 1.0, tl.float32)
        elif REG == 1:
            reg_k = b * b / (2.0 * s * s)
        elif REG == 3:                                        # latent_kl, Flow-GRPO's ÷ 2g² = ÷ 2s²/h
            reg_k = b * b * h / (2.0 * s * s)
        else:
            reg_k = tl.zeros([BLOCK_B], dtype=tl.float32)
        # dL/dlog r = −w·A·r/B where the ratio branch carries the gradient (0 where clipped strictly)
        dlr = tl.where(active, 0.0, -w * adv * r * inv_B)
        tl.store(coef_ptr + rows * 3, fw * (dlr * dlr_ds0), mask=rm)
        if RATIO_NORM:
            tl.store(coef_ptr + rows * 3 + 1, tl.zeros([BLOCK_B], dtype=tl.float32), mask=rm)
        else:
            tl.store(coef_ptr + rows * 3 + 1, fw * (-dlr * b * b / (2.0 * s * s * D)), mask=rm)
        tl.store(coef_ptr + rows * 3 + 2, beta * reg_k * inv_B / D, mask=rm)
        policy_sum += tl.sum(tl.where(rm, -surr * w, 0.0), axis=0)
        if REG != 2:                                          # "none" is 0, even where the mse is not finite
            reg_sum += tl.sum(tl.where(rm, reg_k * mse, 0.0), axis=0)
        ratio_sum += tl.sum(tl.where(rm, r, 0.0), axis=0)
        clip_count += tl.sum(tl.where(rm & active, 1.0, 0.0), axis=0)
        bias_sum += tl.sum(tl.where(rm, bias, 0.0), axis=0)
        mse_sum += tl.sum(tl.where(rm, mse, 0.0), axis=0)
        ratio_max = tl.maximum(ratio_max, tl.max(tl.where(rm, r, -float("inf")), axis=0))
        ratio_min = tl.minimum(ratio_min, tl.min(tl.where(rm, r, float("inf")), axis=0))
        lr_abs_max = tl.maximum(lr_abs_max, tl.max(tl.where(rm, tl.abs(lr), 0.0), axis=0))
    policy = policy_sum * inv_B
    reg_mean = reg_sum * inv_B
    tl.store(loss_ptr, fw * policy + beta * reg_mean)
    tl.store(metrics_ptr + 0, policy)
    tl.store(metrics_ptr + 1, reg_mean)
    tl.store(metrics_ptr + 2, ratio_sum * inv_B)
    tl.store(metrics_ptr + 3, ratio_max)
    tl.store(metrics_ptr + 4, ratio_min)
    tl.store(metrics_ptr + 5, clip_count * inv_B)
    tl.store(metrics_ptr + 6, lr_abs_max)
    tl.store(metrics_ptr + 7, bias_sum * inv_B)
    tl.store(metrics_ptr + 8, mse_sum * inv_B)


# --------------------------------------------------------------------------------------------- launchers

def _check(name: str, t: Tensor, B: int, D: int, dtypes) -> None:
    if t.shape != (B, D) or not t.is_contiguous() or t.dtype not in dtypes:
        raise ValueError(f"{name} must be a contiguous [{B}, {D}] tensor of dtype in "
                         f"{[str(d) for d in dtypes]}, got {list(t.shape)} {t.dtype} contiguous={t.is_contiguous()}")


def sde_step_fwd(x_BD: Tensor, v_BD: Tensor, xi_BD: Tensor, a_B: Tensor, b_B: Tensor, std_B: Tensor,
                 want_mean: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """x' = a·x + b·v + s·ξ per row. x_BD, xi_BD fp32; v_BD bf16/fp16/fp32; a_B, b_B, std_B fp32 [B].
    Returns (x_next_BD fp32, sqsum_B fp32 = Σ_d (x' − μ)², mean_BD fp32 if want_mean else None)."""
    B, D = x_BD.shape
    _check("x_BD", x_BD, B, D, (torch.float32,))
    _check("v_BD", v_BD, B, D, KERNEL_DTYPES)
    _check("xi_BD", xi_BD, B, D, (torch.float32,))
    for name, t in (("a_B", a_B), ("b_B", b_B), ("std_B", std_B)):
        _check(name, t.view(B, 1), B, 1, (torch.float32,))
    block, iters, chunks, warps = _config(D, x_BD.device)
    x_next = torch.empty_like(x_BD)
    mean = torch.empty_like(x_BD) if want_mean else x_next   # an unused pointer when not wanted
    part = torch.empty(B, chunks, dtype=torch.float32, device=x_BD.device)
    _sde_step_fwd_kernel[(B, chunks)](x_BD, v_BD, xi_BD, a_B, b_B, std_B, x_next, mean, part, D, chunks,
                                      WANT_MEAN=want_mean, BLOCK=block, ITERS=iters, num_warps=warps)
    return x_next, part.sum(dim=1), (mean if want_mean else None)


def flow_sums_fwd(v_BD: Tensor, xi_BD: Tensor, v_old_BD: Tensor, v_ref_BD: Tensor) -> Tensor:
    """Row sums of the flow loss (reference `flow_row_sums`): [B, 3] fp32 with Σ ξ·(v − v_old),
    Σ (v − v_old)², Σ (v − v_ref)². v, v_old, v_ref one dtype (bf16/fp16/fp32); ξ fp32."""
    return flow_sums_partials(v_BD, xi_BD, v_old_BD, v_ref_BD).sum(dim=1)


def flow_sums_partials(v_BD: Tensor, xi_BD: Tensor, v_old_BD: Tensor, v_ref_BD: Tensor) -> Tensor:
    """The row sums of `flow_sums_fwd` before their last reduction: [B, chunks, 3] fp32 partials."""
    B, D = v_BD.shape
    _check("v_BD", v_BD, B, D, KERNEL_DTYPES)
    _check("xi_BD", xi_BD, B, D, (torch.float32,))
    _check("v_old_BD", v_old_BD, B, D, (v_BD.dtype,))
    _check("v_ref_BD", v_ref_BD, B, D, (v_BD.dtype,))
    block, iters, chunks, warps = _config(D, v_BD.device)
    part = torch.empty(B, chunks, 3, dtype=torch.float32, device=v_BD.device)
    _flow_sums_fwd_kernel[(B, chunks)](v_BD, xi_BD, v_old_BD, v_ref_BD, part, D, chunks,
                                       BLOCK=block, ITERS=iters, num_warps=warps)
    return part


def flow_loss_finalize(part_BC3: Tensor, adv_B: Tensor, b_B: Tensor, std_B: Tensor, h_B: Tensor, D: int,
                       lo: float, hi: float, beta: float, reg: int, ratio_norm: bool,
                       grad_reweight: bool, flow_weight: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """The per-row scalar math of the flow loss from the partial row sums (reference `flow_loss_from_sums`).
    part_BC3 fp32 [B, C, 3] (C ≥ 1 partials per row, summed here in order); adv/b/std/h fp32 [B];
    lo = 1 − ε_lo, hi = 1 + ε_hi; reg the index in REG_CODES; loss = flow_weight·policy + beta·reg. Returns (loss [] fp32, metrics [9] fp32 in FLOW_METRICS order,
    coef [B, 3] fp32 = dL/d(row sums) for the backward)."""
    B, C = part_BC3.shape[:2]
    _check("part_BC3", part_BC3.view(B, C * 3), B, C * 3, (torch.float32,))
    for name, t in (("adv_B", adv_B), ("b_B", b_B), ("std_B", std_B), ("h_B", h_B)):
        _check(name, t.view(B, 1), B, 1, (torch.float32,))
    if reg not in range(len(REG_CODES)):
        raise ValueError(f"reg code {reg!r} unknown; expected the index of one of {REG_CODES}")
    dev = part_BC3.device
    loss = torch.empty((), dtype=torch.float32, device=dev)
    metrics = torch.empty(len(FLOW_METRICS), dtype=torch.float32, device=dev)
    coef = torch.empty(B, 3, dtype=torch.float32, device=dev)
    block_b, block_c = _finalize_blocks(B, C, dev)
    _flow_loss_finalize_kernel[(1,)](part_BC3, C, adv_B, b_B, std_B, h_B, loss, metrics, coef, B, float(D),
                                     float(lo), float(hi), float(beta), float(flow_weight),
                                     RATIO_NORM=bool(ratio_norm),
                                     REWEIGHT=bool(grad_reweight), REG=int(reg), BLOCK_B=block_b, BLOCK_C=block_c,
                                     ROW_BLOCKS=triton.cdiv(B, block_b), CHUNK_BLOCKS=triton.cdiv(C, block_c),
                                     num_warps=4)
    return loss, metrics, coef


def flow_sums_bwd(g_B3: Tensor, v_BD: Tensor, xi_BD: Tensor, v_old_BD: Tensor, v_ref_BD: Tensor,
                  use_old: bool, use_ref: bool) -> Tensor:
    """dL/dv = g0·ξ + 2·g1·(v − v_old)·[use_old] + 2·g2·(v − v_ref)·[use_ref], one pass; a stream whose flag
    is off is not read. g_B3 fp32 [B, 3] (the upstream gradient of the sums). Returns dv in v's dtype."""
    B, D = v_BD.shape
    _check("g_B3", g_B3, B, 3, (torch.float32,))
    _check("v_BD", v_BD, B, D, KERNEL_DTYPES)
    _check("xi_BD", xi_BD, B, D, (torch.float32,))
    _check("v_old_BD", v_old_BD, B, D, (v_BD.dtype,))
    _check("v_ref_BD", v_ref_BD, B, D, (v_BD.dtype,))
    block, iters, chunks, warps = _config(D, v_BD.device)
    dv = torch.empty_like(v_BD)
    _flow_sums_bwd_kernel[(B, chunks)](g_B3, v_BD, xi_BD, v_old_BD, v_ref_BD, dv, D, USE_OLD=bool(use_old),
                                       USE_REF=bool(use_ref), BLOCK=block, ITERS=iters, num_warps=warps)
    return dv
