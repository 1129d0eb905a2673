"""The `token` suite: token_logprobs (log softmax(hidden·Wᵀ/τ) at the targets, training: fwd / bwd / full;
with entropy: fwd, the old-log-prob recompute) and linear_text_grpo_loss (hidden → GRPO text loss, full).

Providers: "torch" (the reference, kernels/reference/text.py: it materialises the [T, V] logits in fp32 —
bf16 inputs are cast up first), "torch.compile" (that reference through torch.compile, dynamic=False),
"triton" (unigrpo_kernels.text, the fused kernels of kernels/triton/token.py: fp32 accumulation, never a
[T, V] buffer) and, when `liger_kernel` is importable, "liger" (LigerFusedLinearCrossEntropyLoss with
reduction="none", logp = −CE; τ = 1 and no entropy, so only on the log-prob-only case). Liger is a peer
library, not a dependency: it is never installed by this project. On CPU only the torch providers run unless
--providers names triton (the interpreter).

Shapes: GPU — the paper's (ALGORITHM.md §10; DESIGN.md: T = 12,288 reasoning tokens = 24 sequences × 512,
hidden 3584, vocabulary 152,064; bf16 hidden and lm_head) and short reasoning (T = 2,048 = 8 × 256, same
model; --quick runs only this one). CPU — T=64, H=64, V=512 fp32 (T=32, H=32, V=256 with --quick).

FLOPs counted (unit TFLOP/s against the bf16 matmul ceiling measured in the same run):
    fwd  2·T·H·V   (the logits GEMM; the softmax statistics are O(T·V) and not counted)
    bwd  6·T·H·V   (the fused backward's own work: recompute the logits 2·T·H·V, dW 2·T·H·V, dH 2·T·H·V)
    full 8·T·H·V
The same count divides every provider's time, so throughput ratios are speed ratios. The eager reference
does only 4·T·H·V in its backward (it keeps the logits), so its bwd "TFLOP/s" credits it for a recompute it
skips: read bwd rows as time. The torch reference computes its GEMMs in fp32 (it upcasts bf16), which alone
makes it several × slower than a bf16 GEMM: that is the reference's choice, the "liger" row is the bf16 peer.

Inputs: hidden ~ N(0, 1), W ~ N(0, 1/H) (logits of unit scale), targets uniform in [0, V), τ = 1. The loss
case: old log-probs = a 0.1-noisy copy of the reference's, advantages ~ N(0, 1), all tokens real,
ε = 0.2 / 0.28, aggregation "sequence".

Tolerances (‖out − ref‖/‖ref‖ in float64 against the reference):
| output                | tol  | why                                                                      |
| logp, entropy         | 5e-3 | triton/compile accumulate in fp32 (~1e-6); liger's bf16 logits round at  |
|                       |      | 2⁻⁹·|z|, which puts its logp ~1e-3 off                                   |
| dH, dW (bf16)         | 1e-2 | written in bf16 (2⁻⁸ ulp) from dlogits rounded to bf16 before the GEMMs  |
| loss                  | 1e-3 | a mean of O(1) terms of fp32 log-probs                                   |
| CPU fp32: logp, grads | 1e-4 | fp32 everywhere, different summation order                               |
"""
from __future__ import annotations

import torch

from ..checks import OpCase, run_op_case
from unigrpo_kernels import available_backends
from unigrpo_kernels.dtypes import dtype_name
from unigrpo_kernels.reference import text as ref

NAME = "token"
DESCRIPTION = ("token_logprobs (fwd/bwd/full, +entropy fwd) and linear_text_grpo_loss (full): torch, compile, "
               "triton, liger")

_LOSS_KW = dict(eps_lo=0.2, eps_hi=0.28, aggregation="sequence")
_LOSS_VARIANTS = {
    "grpo": (_LOSS_KW, "ε 0.2/0.28, sequence aggregation"),
    "gspo": (dict(eps_lo=3e-4, eps_hi=4e-4, aggregation="sequence", ratio_level="sequence"),
             "GSPO: sequence ratio, ε 3e-4/4e-4"),
    "dapo": (dict(eps_lo=0.2, eps_hi=0.28, aggregation="global"), "DAPO: ÷ the batch's tokens, ε 0.2/0.28"),
}
"""loss_type → (text_grpo_loss options, row note); the grpo row keeps its historical op name."""


def shapes(ctx) -> list[tuple[int, int, int, int, torch.dtype]]:
    """(B sequences, L tokens each, H hidden, V vocabulary, dtype) of this device's cases; T = B·L."""
    if ctx.is_cuda:   # --quick: the short-reasoning case only (fits a short GPU lease)
        short = [(8, 256, 3584, 152_064, torch.bfloat16)]
        return short if ctx.quick else [(24, 512, 3584, 152_064, torch.bfloat16)] + short
    return [(4, 8, 32, 256, torch.float32)] if ctx.quick else [(4, 16, 64, 512, torch.float32)]


def compiled(fn):
    """torch.compile(fn, dynamic=False), built on the first call (so listing cases never imports dynamo)."""
    box = []

    def call(*args, **kwargs):
        if not box:
            box.append(torch.compile(fn, dynamic=False))
        return box[0](*args, **kwargs)

    return call


def _liger():
    """A token_logprobs-shaped wrapper of liger's fused linear cross-entropy, or None when not importable."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:
        return None
    ce = LigerFusedLinearCrossEntropyLoss(reduction="none")

    def fn(hidden_TH, weight_VH, targets_T, temperature=1.0, return_entropy=False):
        if temperature != 1.0 or return_entropy:
            raise ValueError("the liger provider has no temperature and no entropy")
        return -ce(weight_VH, hidden_TH, targets_T).float()

    return fn


def _fused(device: torch.device, op: str):
    """The fused text ops available on `device` (backend name → module function), none if not importable."""
    try:
        from unigrpo_kernels import text as fused
    except ImportError:
        return {}
    return {be: getattr(fused, op) for be in available_backends(device, op="token_logprobs") if be != "torch"}


def token_case(B: int, L: int, H: int, V: int, dtype: torch.dtype, device: torch.device, entropy: bool) -> OpCase:
    T = B * L

    def make_inputs():
        g = torch.Generator(device=device).manual_seed(0)
        h = torch.randn(T, H, generator=g, device=device).to(dtype)
        w = (torch.randn(V, H, generator=g, device=device) / H ** 0.5).to(dtype)
        tgt = torch.randint(0, V, (T,), generator=g, device=device)
        return {"hidden_TH": h.requires_grad_(not entropy), "weight_VH": w.requires_grad_(not entropy),
                "targets_T": tgt, "temperature": 1.0, "return_entropy": entropy}

    provs = {"torch": ref.token_logprobs, "torch.compile": compiled(ref.token_logprobs)}
    for be, fn in _fused(device, "token_logprobs").items():
        provs[be] = lambda fn=fn, be=be, **kw: fn(**kw, backend=be)
    liger = _liger()
    if liger is not None and not entropy:
        provs["liger"] = liger
    low = dtype != torch.float32
    f = T * H * V
    common = dict(suite=NAME, op="token_logprobs", shape=f"T={T} H={H} V={V}", dtype=dtype_name(dtype),
                  make_inputs=make_inputs, providers=provs)
    if entropy:
        return OpCase(**common, outputs=lambda res: {"logp": res[0], "entropy": res[1]},
                      tol={"logp": 5e-3 if low else 1e-4, "entropy": 5e-3 if low else 1e-4}, modes=("fwd",),
                      flops={"fwd": 2 * f}, note="with entropy, no grad (old log-prob recompute)")
    return OpCase(**common, outputs=lambda res: {"logp": res}, loss=lambda res: res.sum(),
                  grad_inputs=("hidden_TH", "weight_VH"),
                  tol={"logp": 5e-3 if low else 1e-4, "grad:hidden_TH": 1e-2 if low else 1e-4,
                       "grad:weight_VH": 1e-2 if low else 1e-4},
                  modes=("fwd", "bwd", "full"), flops={"fwd": 2 * f, "bwd": 6 * f, "full": 8 * f},
                  note="bwd FLOPs count the fused recompute (6·T·H·V)")


def _reference_linear_loss(hidden_TH, weight_VH, targets_T, *, slot_T, old_logp_BL, adv_B, mask_BL,
                           temperature=1.0, **kw):
    """The reference composition the fused op replaces: logits → log-probs → [B, L] → text_grpo_loss."""
    B, L = old_logp_BL.shape
    lp = ref.token_logprobs(hidden_TH, weight_VH, targets_T, temperature=temperature)
    lp_BL = lp.new_zeros(B * L).index_copy(0, slot_T, lp).view(B, L)
    return ref.text_grpo_loss(logp_BL=lp_BL, old_logp_BL=old_logp_BL, adv_B=adv_B, mask_BL=mask_BL, **kw)


def loss_case(B: int, L: int, H: int, V: int, dtype: torch.dtype, device: torch.device,
              loss_type: str = "grpo") -> OpCase:
    T = B * L
    loss_kw, note = _LOSS_VARIANTS[loss_type]
    if loss_kw.get("aggregation") == "global":
        loss_kw = dict(loss_kw, global_tokens=float(T))

    def make_inputs():
        g = torch.Generator(device=device).manual_seed(1)
        h = torch.randn(T, H, generator=g, device=device).to(dtype)
        w = (torch.randn(V, H, generator=g, device=device) / H ** 0.5).to(dtype)
        tgt = torch.randint(0, V, (T,), generator=g, device=device)
        with torch.no_grad():
            lp = ref.token_logprobs(h, w, tgt)
        old = (lp + 0.1 * torch.randn(T, generator=g, device=device)).view(B, L)
        return {"hidden_TH": h.requires_grad_(), "weight_VH": w.requires_grad_(), "targets_T": tgt,
                "slot_T": torch.arange(T, device=device), "old_logp_BL": old,
                "adv_B": torch.randn(B, generator=g, device=device),
                "mask_BL": torch.ones(B, L, dtype=torch.bool, device=device), **loss_kw}

    provs = {"torch": _reference_linear_loss, "torch.compile": compiled(_reference_linear_loss)}
    for be, fn in _fused(device, "linear_text_grpo_loss").items():
        provs[be] = lambda fn=fn, be=be, **kw: fn(**kw, backend=be)
    low = dtype != torch.float32
    op = "linear_text_grpo_loss" if loss_type == "grpo" else f"linear_text_grpo_loss[{loss_type}]"
    return OpCase(suite=NAME, op=op, shape=f"B={B} L={L} H={H} V={V}", dtype=dtype_name(dtype),
                  make_inputs=make_inputs, providers=provs, outputs=lambda res: {"loss": res[0]},
                  loss=lambda res: res[0], grad_inputs=("hidden_TH", "weight_VH"),
                  tol={"loss": 1e-3 if low else 1e-4, "grad:hidden_TH": 1e-2 if low else 1e-4,
                       "grad:weight_VH": 1e-2 if low else 1e-4},
                  modes=("full",), flops={"full": 8 * T * H * V}, note=note)


def cases(ctx) -> list[OpCase]:
    out = []
    for B, L, H, V, dt in shapes(ctx):
        out += [token_case(B, L, H, V, dt, ctx.device, entropy=False),
                token_case(B, L, H, V, dt, ctx.device, entropy=True),
                *(loss_case(B, L, H, V, dt, ctx.device, lt) for lt in _LOSS_VARIANTS)]
    return out


run = run_op_case
