"""The `attention` suite: the packed text+image training attention (fwd / bwd / full) of every backend, and
dense causal attention doing the same useful work as a yardstick.

Providers of `packed_attention` (unigrpo/model/attention.py): "torch" = SDPA with the dense boolean mask
[B, 1, S, S] (the sdpa backend: the reference the others are checked against; on GPU its K/V heads are
expanded first so SDPA may pick its memory-efficient kernel, which takes an arbitrary mask — the math
fallback would need 28·S² fp32 scores per row), "flex" (FlexAttention, compiled, block mask padded to the
bucket; GPU only — it has no CPU backward), "split" (the pure-torch segment decomposition with the
log-sum-exp merge: a reference, it materialises each block's fp32 scores), "flash" (flash-attn varlen; only
when flash_attn imports). The mask / block mask / plan is built once per batch, outside the timed calls (as
in training, where one build serves every layer, forward and backward); its build time is its own row
(op `packed_attention_inputs`, mode `build`, no throughput).

`causal_attention` is the yardstick: SDPA with is_causal=True (forced to its flash kernel on GPU), one row
of length L chosen so that its causal pairs L(L+1)/2 match the packed case's useful pairs; its K/V carry all
28 heads (pre-expanded, so SDPA's flash kernel needs no GQA support; FLOPs do not depend on K/V heads).

Shapes (GPU, BAGEL-7B's attention at 1024 px, bf16): 28 query heads, 4 KV heads, head dim 128; a trajectory
is ~512 text tokens (prompt + reasoning) then W = 3 noise blocks of 4096 image tokens.
- "rows": the trainer's packing, one trajectory per row, B = 2 (texts 512 and 448, so row 2 is padded);
- "docs": two trajectories packed in one row as two documents (texts 512 and 384).
--quick on GPU: "rows" only, with W = 1 noise block per trajectory.
CPU (marked CPU figures, smoke test of the suite): 4 heads / 2 KV, head dim 32, blocks of 64 tokens
(16 with --quick), fp32.

FLOPs counted — useful work only: a (query, key) pair is counted when `visible()` allows it and neither
token is padding (each segment: n·P + n(n+1)/2 for text, n·(P + n) for an image block, P = the context
tokens before it in its document). Per pair and head: forward 4·hd (QKᵀ and PV, 2·hd each), backward
10·hd (recompute QKᵀ, dV, dP, dQ, dK), full 14·hd. The same count divides every provider's time, so
TFLOP/s ratios are speed ratios; a backend that computes masked-out or padded work is not credited for it.
At the "rows" shape 35% of the S² pairs are useful.

Tolerances (‖out − ref‖/‖ref‖ in float64 against the dense-mask SDPA on the same inputs):
| output            | tol  | why                                                                  |
| out, bf16         | 1e-2 | bf16 output (2⁻⁸ relative ulp), fp32 accumulation in every backend    |
| dq, dk, dv, bf16  | 2e-2 | bf16 gradients, sums over up to S keys / queries in another order    |
| fp32 (CPU)        | 1e-4 | fp32 throughout; measured ~1e-6 (tests/test_attention.py)            |
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..checks import OpCase, run_op_case
from ..context import Row, make_row
from ..timing import time_ms
from unigrpo.model import attention as A
from unigrpo.model.layout import NOISE, TEXT, PackedLayout, Segment, episode_document
from unigrpo_kernels.dtypes import dtype_name

NAME = "attention"
DESCRIPTION = ("packed text+image attention (fwd/bwd/full): sdpa dense mask (torch), flex, split, flash; "
               "vs dense causal SDPA at equal useful FLOPs")



@dataclass
class PackedCase(OpCase):
    """An OpCase plus the layout, so `run` can also time the per-batch build of each backend's inputs."""

    layout: PackedLayout | None = None
    backends: tuple[str, ...] = field(default_factory=tuple)


def useful_pairs(layout: PackedLayout) -> int:
    """Visible (query, key) pairs between real tokens (padding excluded), from the segment table."""
    total, ctx = 0, {}
    for sp in layout.segment_table():
        P = ctx.get((sp.row, sp.doc), 0)
        n = sp.length
        total += n * P + (n * (n + 1) // 2 if sp.kind == TEXT else n * n)
        if sp.kind != NOISE:  # noise blocks are nobody's context
            ctx[(sp.row, sp.doc)] = P + n
    return total


def causal_length(pairs: int) -> int:
    """L whose causal pair count L(L+1)/2 is nearest to `pairs`."""
    return max(1, round((math.sqrt(8 * pairs + 1) - 1) / 2))


def shapes(ctx) -> list[dict]:
    """The packed cases of this device: name, rows (documents per row as (text tokens, W, image tokens); a
    tuple of text lengths is a multi-round trajectory, the "rounds" case),
    heads, kv_heads, hd, dtype."""
    if ctx.is_cuda:
        model = dict(heads=28, kv_heads=4, hd=128, dtype=torch.bfloat16)
        if ctx.quick:   # one noise block per trajectory: ~4.6k tokens a row instead of ~12.8k (short GPU lease)
            return [dict(name="rows", rows=[[(512, 1, 4096)], [(448, 1, 4096)]], **model)]
        return [dict(name="rows", rows=[[(512, 3, 4096)], [(448, 3, 4096)]], **model),
                dict(name="docs", rows=[[(512, 3, 4096), (384, 3, 4096)]], **model),
                dict(name="rounds", rows=[[((512, 256), 3, 4096)]], **model)]
    n, t = (16, 12) if ctx.quick else (64, 48)
    model = dict(heads=4, kv_heads=2, hd=32, dtype=torch.float32)
    return [dict(name="rows", rows=[[(t, 3, n)], [(t - 4, 3, n)]], **model),
            dict(name="docs", rows=[[(t, 3, n), (t // 2, 3, n)]], **model),
            dict(name="rounds", rows=[[((t, t // 2), 3, n)], [((t - 4, t // 2), 3, n)]], **model)]


def build_layout(rows, device) -> PackedLayout:
    """rows of documents (T, W, N): T text tokens then W noise blocks of N tokens; T a tuple of per-round text
    lengths makes a multi-round trajectory (`episode_document`, ALGORITHM.md §12)."""
    return PackedLayout.build([[episode_document(T, W, N) if isinstance(T, tuple) else
                                [Segment("text", T)] + [Segment("noise", N)] * W for T, W, N in row] for row in rows],
                              device=device)


def _randn(g, shape, device, dtype):
    return torch.randn(shape, generator=g, device=device).to(dtype)


def _sdpa_dense(layout):
    def fn(q, k, v):
        mask = A.packed_attention_inputs(layout, "sdpa")["mask"]
        if q.is_cuda and q.shape[1] != k.shape[1]:  # let SDPA choose its memory-efficient kernel
            r = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    return fn


def _backend(layout, backend):
    def fn(q, k, v):
        return A.attend(q, k, v, backend=backend, **A.packed_attention_inputs(layout, backend))
    return fn


def packed_case(spec: dict, device: torch.device) -> PackedCase:
    layout = build_layout(spec["rows"], device)
    B, S = layout.shape
    H, Hk, hd, dtype = spec["heads"], spec["kv_heads"], spec["hd"], spec["dtype"]
    pairs = useful_pairs(layout)
    weight = {}

    def make_inputs():
        g = torch.Generator(device=device).manual_seed(0)
        return {"q": _randn(g, (B, H, S, hd), device, dtype).requires_grad_(),
                "k": _randn(g, (B, Hk, S, hd), device, dtype).requires_grad_(),
                "v": _randn(g, (B, Hk, S, hd), device, dtype).requires_grad_()}

    def loss(out):  # a fixed random cotangent, so every gradient is non-trivial
        if "w" not in weight:
            weight["w"] = _randn(torch.Generator(device=device).manual_seed(1), out.shape, device, out.dtype)
        return (out * weight["w"]).sum()

    backends = ["flex"] if device.type == "cuda" else []
    backends.append("split")
    if device.type == "cuda" and A.flash_available():
        backends.append("flash")
    provs = {"torch": _sdpa_dense(layout), **{be: _backend(layout, be) for be in backends}}
    low = dtype != torch.float32
    texts = ",".join("+".join(map(str, T)) if isinstance(T, tuple) else str(T) for row in spec["rows"] for T, _, _ in row)
    W, N = spec["rows"][0][0][1], spec["rows"][0][0][2]
    shape = (f"{spec['name']}: B={B} S={S} docs={sum(len(r) for r in spec['rows'])} T={texts} W={W}×{N} "
             f"H={H}/{Hk} hd={hd}")
    f = hd * H * pairs
    return PackedCase(
        suite=NAME, op="packed_attention", shape=shape, dtype=dtype_name(dtype), make_inputs=make_inputs,
        providers=provs, outputs=lambda res: {"out": res}, loss=loss, grad_inputs=("q", "k", "v"),
        tol={"out": 1e-2 if low else 1e-4, **{f"grad:{n}": 2e-2 if low else 1e-4 for n in "qkv"}},
        modes=("fwd", "bwd", "full"), flops={"fwd": 4 * f, "bwd": 10 * f, "full": 14 * f},
        note=f"torch = SDPA + dense mask; useful pairs {pairs} ({pairs / (B * S * S):.0%} of B·S²)",
        layout=layout, backends=tuple(backends))


def causal_case(spec: dict, pairs: int, device: torch.device) -> OpCase:
    L = causal_length(pairs)
    H, hd, dtype = spec["heads"], spec["hd"], spec["dtype"]

    def make_inputs():
        g = torch.Generator(device=device).manual_seed(2)
        return {n: _randn(g, (1, H, L, hd), device, dtype).requires_grad_() for n in "qkv"}

    def sdpa_causal(q, k, v):
        if q.is_cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    f = hd * H * (L * (L + 1) // 2)
    low = dtype != torch.float32
    return OpCase(
        suite=NAME, op="causal_attention", shape=f"{spec['name']}-equivalent: B=1 L={L} H={H} hd={hd}",
        dtype=dtype_name(dtype), make_inputs=make_inputs, providers={"torch": sdpa_causal},
        outputs=lambda res: {"out": res}, loss=lambda res: res.float().sum(), grad_inputs=("q", "k", "v"),
        tol={"out": 1e-2 if low else 1e-4, **{f"grad:{n}": 2e-2 if low else 1e-4 for n in "qkv"}},
        modes=("fwd", "bwd", "full"), flops={"fwd": 4 * f, "bwd": 10 * f, "full": 14 * f},
        note=f"SDPA is_causal ({'flash kernel' if device.type == 'cuda' else 'CPU'}); L(L+1)/2 ≈ the "
             f"{spec['name']} case's useful pairs")


def cases(ctx) -> list[OpCase]:
    out = []
    for spec in shapes(ctx):
        pc = packed_case(spec, ctx.device)
        out += [pc, causal_case(spec, useful_pairs(pc.layout), ctx.device)]
    return out


def run(case: OpCase, ctx) -> list[Row]:
    """The op protocol (checks.run_op_case), then for packed cases the build time of each wanted backend's
    per-batch inputs (dense mask / block mask / split plan; flash uses the split plan) on a fresh copy of the
    layout."""
    rows = run_op_case(case, ctx)
    if not isinstance(case, PackedCase):
        return rows
    for backend in ("sdpa",) + tuple(b for b in case.backends if b != "flash"):
        name = "torch" if backend == "sdpa" else backend
        if not (name == "torch" or ctx.wants(name)):
            continue
        ms = time_ms(ctx, lambda lay: A.packed_attention_inputs(lay, backend),
                     setup=lambda: dataclasses.replace(case.layout, attn_cache={}))
        rows.append(make_row(ctx, suite=NAME, op="packed_attention_inputs", provider=name, mode="build",
                             shape=case.shape, dtype="-", ms=ms,
                             note={"sdpa": "dense bool mask", "flex": "block mask (tiles of 128, bucket "
                                   f"{A.flex_bucket(case.layout.shape[1])})"}.get(backend, "split plan")))
    return rows
