"""The `flow` suite: sde_step (rollout, forward only) and flow_grpo_loss (training: forward, backward, both).

Providers: "torch" (the reference, kernels/reference/flow.py — the ground truth every other provider is
checked against), "torch.compile" (that same reference through torch.compile, dynamic=False), and the fused
backends of `unigrpo_kernels.flow` available on the device (`available_backends(device, op=...)`: "triton",
"cuda"). On CPU only the two torch providers run unless --providers names triton (the interpreter).

Shapes: GPU — the paper's (ALGORITHM.md §10: 1024 px → D = 16·128·128 = 262,144 latent elements per sample;
24 samples × 3 window steps = 72 rows) and a small one (B=16, D=16,384); v in bf16 (the model's dtype),
latents and ξ in fp32 (§3). CPU — the tiny preset's D = 48·8·8 = 3,072 with B=8 (and B=72 without --quick),
v in fp32 (the CPU model's dtype).

Bytes that must move (each stream read or written once; e_v = bytes per element of v: 2 bf16, 4 fp32;
per-row scalars and [B] outputs are negligible and not counted):
- sde_step fwd: reads x (4 B), v (e_v), ξ (4 B); writes x' (4 B)  →  12 + e_v = 14 B/element (bf16 v).
  μ is not requested (return_mean=False, as in the rollout).
- flow_grpo_loss with RatioNorm on, reg "mse", β > 0 (the paper's setting; §7 shows these streams suffice):
  fwd  reads v, ξ, v_old, v_ref                    →  4 + 3·e_v = 10 B/element (bf16)
  bwd  reads v, ξ, v_ref; writes dL/dv (v's dtype) →  4 + 3·e_v = 10 B/element (bf16)
  full fwd + bwd: two passes (the backward needs per-row scalars that the forward reduces over all of D)
                                                   →  20 B/element (bf16), 32 (fp32)
  At the paper's shape (72 × 262,144 = 18.9 M elements) that is 264 MB for sde_step and 377 MB for the full
  loss. The reference moves more than this (it materialises v − v_old, v − v_ref and products): its GB/s is
  "useful bytes per second", which is what a fused kernel is judged by.

Inputs: x, v, ξ ~ N(0, 1); v_old = v + 0.05·N(0, 1) and v_ref = v + 0.05·N(0, 1) (in v's dtype) so both
ratio terms and the regulariser are non-trivial; advantages ~ N(0, 1); a, b, s, h of §3 from the paper's
schedule (25 steps, shift 3, η = 0.8) at the window steps 0–4. clip_eps = 0.2, not the paper's 1e-6: with
1e-6 a ratio within one fp32 rounding of the clip edge would make the clip decision, and so dL/dv, depend on
summation order; the per-element work is the same for any ε.

Tolerances (‖out − ref‖/‖ref‖ in float64; every provider computes in fp32 from the same inputs, so only
rounding order differs):
| output | tol | why |
| x' (fp32)        | 1e-5 | 3 multiply-adds per element; FMA contraction changes the last bit at most |
| log-prob [B]     | 1e-4 | one fp32 sum over D per row in a different order: ~√D·ulp worst |
| loss (fp32)      | 1e-4 | the same row sums, then [B]-sized scalar math |
| dL/dv fp32       | 1e-5 | per element c_i·b·ξ/D + 2β(v − v_ref)/(D·B): a few roundings |
| dL/dv bf16       | 1e-2 | written in bf16: equal fp32 values may round one bf16 ulp (2⁻⁸) apart |
"""
from __future__ import annotations

from functools import partial

import torch

from ..checks import OpCase, compiled, run_op_case
from unigrpo_kernels import available_backends
from unigrpo_kernels import flow as fused
from unigrpo_kernels.dtypes import dtype_name
from unigrpo_kernels.reference import flow as ref

NAME = "flow"
DESCRIPTION = "sde_step (fwd) and flow_grpo_loss (fwd/bwd/full): torch, torch.compile, triton, cuda"

_LOSS_KW = dict(clip_eps=0.2, beta=1.5e-5, reg="mse", ratio_norm=True, grad_reweight=False)


def shapes(ctx) -> list[tuple[int, int, torch.dtype]]:
    """(B rows, D elements per row, v dtype) of this device's cases."""
    if ctx.is_cuda:
        return [(72, 262_144, torch.bfloat16), (16, 16_384, torch.bfloat16)]
    return [(8, 3_072, torch.float32)] + ([] if ctx.quick else [(72, 3_072, torch.float32)])


def providers(op: str, device: torch.device) -> dict:
    """"torch" (reference), "torch.compile", then every fused backend of `op` available on `device`."""
    fn = getattr(ref, op)
    out = {"torch": fn, "torch.compile": compiled(fn)}
    for be in available_backends(device, op=op):
        if be != "torch":
            out[be] = partial(getattr(fused, op), backend=be)
    return out


def _rows_coeffs(B: int, dev: torch.device) -> dict[str, torch.Tensor]:
    """a, b, std, h [B] fp32 of the paper's schedule at window steps 0–4 (§3, §10)."""
    co = ref.step_coeffs_batch(ref.sigma_schedule(25, 3.0), torch.arange(B) % 5, 0.8)
    return {k: co[k].float().to(dev) for k in ("a", "b", "std", "h")}


def _randn(g, shape, dev, dtype=torch.float32):
    return torch.randn(shape, generator=g, device=dev).to(dtype)


def sde_step_case(B: int, D: int, v_dtype: torch.dtype, device: torch.device) -> OpCase:
    e_v = torch.finfo(v_dtype).bits // 8

    def make_inputs():
        g = torch.Generator(device=device).manual_seed(0)
        co = _rows_coeffs(B, device)
        return {"x_BD": _randn(g, (B, D), device), "v_BD": _randn(g, (B, D), device, v_dtype),
                "noise_BD": _randn(g, (B, D), device), "a_B": co["a"], "b_B": co["b"], "std_B": co["std"]}

    return OpCase(
        suite=NAME, op="sde_step", shape=f"B={B} D={D}", dtype=f"v={dtype_name(v_dtype)} x,ξ=fp32",
        make_inputs=make_inputs, providers=providers("sde_step", device),
        outputs=lambda res: {"x_next": res[0], "logp": res[1]}, tol={"x_next": 1e-5, "logp": 1e-4},
        modes=("fwd",), bytes={"fwd": B * D * (12 + e_v)})


def flow_loss_case(B: int, D: int, v_dtype: torch.dtype, device: torch.device) -> OpCase:
    e_v = torch.finfo(v_dtype).bits // 8

    def make_inputs():
        g = torch.Generator(device=device).manual_seed(1)
        co = _rows_coeffs(B, device)
        v = _randn(g, (B, D), device)
        return {"v_BD": v.to(v_dtype).requires_grad_(), "xi_BD": _randn(g, (B, D), device),
                "v_old_BD": (v + 0.05 * _randn(g, (B, D), device)).to(v_dtype),
                "v_ref_BD": (v + 0.05 * _randn(g, (B, D), device)).to(v_dtype),
                "adv_B": _randn(g, (B,), device), "b_B": co["b"], "std_B": co["std"], "h_B": co["h"], **_LOSS_KW}

    per_pass = B * D * (4 + 3 * e_v)
    return OpCase(
        suite=NAME, op="flow_grpo_loss", shape=f"B={B} D={D}", dtype=f"v={dtype_name(v_dtype)} ξ=fp32",
        make_inputs=make_inputs, providers=providers("flow_grpo_loss", device),
        outputs=lambda res: {"loss": res[0]}, loss=lambda res: res[0], grad_inputs=("v_BD",),
        tol={"loss": 1e-4, "grad:v_BD": 1e-2 if e_v < 4 else 1e-5},
        modes=("fwd", "bwd", "full"), bytes={"fwd": per_pass, "bwd": per_pass, "full": 2 * per_pass},
        note="RatioNorm, reg mse, clip 0.2")


def cases(ctx) -> list[OpCase]:
    out = []
    for B, D, dt in shapes(ctx):
        out += [sde_step_case(B, D, dt, ctx.device), flow_loss_case(B, D, dt, ctx.device)]
    return out


run = run_op_case
