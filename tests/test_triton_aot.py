"""Every Triton kernel variant compiled for sm_90a ahead of time, without a GPU (issue 17).

tests/_triton_aot.py runs the launchers of the fused ops (kernels/triton/token.py, flow.py) with the GPU
launch configs on meta tensors — the paper's shapes and the extremes of the tested shapes cost no memory —
records every distinct launch specialisation, and compiles each with `triton.compile` for
GPUTarget("cuda", 90, 32), then ptxas -v for sm_90a. Asserted per variant:
- no register spills (ptxas' spill stores + loads == 0);
- shared memory ≤ 227 KB (232,448 bytes: the most one block may use on H100/H200);
- the bf16 token kernels (forward with and without entropy, the dlogits kernel, every backward GEMM:
  dH, dW, with and without the fp32 accumulator) use wgmma;
- int64 address arithmetic (issue item "int64 offsets"), at B·D > 2³¹ (flow, B = 8,200 × D = 262,144) and
  T·V > 2³¹ (token, T = 16,385 × V = 152,064) where an i32 flat index would wrap: in the TTIR every
  `tt.addptr` into a [B, D] flow stream adds i64 offsets only (the whole flat index is int64), and the
  addresses into hidden / weight / the GEMM operands and outputs include an i64 row term (row · stride); the
  i32 steps left there add a column index < H (one tile's columns), which cannot wrap.
Version-agnostic (triton 3.6, the GPU machine's, and 3.9, installed here, were both run on the full sweep);
CI compiles the paper's token shape with every flag plus one extreme of each kind (`cases`);
UNIGRPO_AOT_FULL=1 compiles the full sweep (~125 variants, ~4 min on 2 cores). Skipped where a GPU runs the
real kernels.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SMEM_LIMIT = 227 * 1024
P = dict(T=12288, H=3584, V=152064)


def _token(label, shp, dtype, ents=(False, True), grads=((True, True), (True, False), (False, True))):
    out = []
    for ent in ents:
        out.append((label, "token_fwd", dict(shp, dtype=dtype, entropy=ent)))
        out += [(label, "token_bwd", dict(shp, dtype=dtype, entropy=ent, dh=dh, dw=dw)) for dh, dw in grads]
    return out


def _flow(label, B, D, dtype, means=(False, True), flags=((True, True), (True, False), (False, True), (False, False))):
    out = [(label, "sde_step", dict(B=B, D=D, dtype=dtype, mean=m)) for m in means]
    out.append((label, "flow_sums", dict(B=B, D=D, dtype=dtype)))
    return out + [(label, "flow_bwd", dict(B=B, D=D, dtype=dtype, old=o, ref=r)) for o, r in flags]


def _finalize(label, B, C, combos):
    return [(label, "flow_finalize", dict(B=B, C=C, D=262144, reg=reg, norm=norm, reweight=rw))
            for reg, norm, rw in combos]


FIN = [(reg, norm, rw) for reg in (0, 1, 2) for norm in (False, True) for rw in (False, True)]


def cases(full: bool):
    """(label, op, shape) of the sweep. CI: the paper's token shape in bf16 with every flag (forward ± entropy,
    backward ± entropy: the dlogits kernel and the dH / dW GEMMs); one of each extreme — past one token chunk
    and T·V > 2³¹ (the dW accumulator path), odd unaligned sizes (bf16, fp32), the fp32 dot path, the flow
    ops at B·D > 2³¹ (same specialisation as the paper's 72 × 262,144) with every flag and at an odd size,
    the finalize at the paper's rows and at many rows. Full: all flags at every shape, plus fp16, size 1 and
    the short-reasoning shape (~125 variants)."""
    one = dict(ents=(True,), grads=((True, True),))
    if not full:
        return (_token("paper", P, "bf16", grads=((True, True),)) + _token("long", dict(P, T=16385), "bf16", **one)
                + _token("odd_bf16", dict(T=37, H=70, V=259), "bf16", **one)
                + _token("paper_fp32", P, "fp32", ents=(True,), grads=())
                + _token("odd_fp32", dict(T=40, H=70, V=300), "fp32", ents=(True,), grads=())
                + _flow("huge", 8200, 262144, "bf16") + _flow("odd", 3, 2047, "fp32", means=(True,), flags=((True, True),))
                + _finalize("paper", 72, 32, FIN[-1:]) + _finalize("many", 4096, 200, FIN[:1]))
    out = []
    for label, shp, dt in [("paper", P, "bf16"), ("short", dict(P, T=2048), "bf16"), ("long", dict(P, T=16385), "bf16"),
                           ("odd_bf16", dict(T=37, H=70, V=259), "bf16"), ("tiny_bf16", dict(T=1, H=1, V=2), "bf16"),
                           ("paper_fp32", P, "fp32"), ("odd_fp32", dict(T=40, H=70, V=300), "fp32"),
                           ("tiny_fp32", dict(T=1, H=1, V=2), "fp32")]:
        out += _token(label, shp, dt)
    for label, B, D, dt in [("paper", 72, 262144, "bf16"), ("huge", 8200, 262144, "bf16"), ("paper_fp32", 72, 262144, "fp32"),
                            ("paper_fp16", 72, 262144, "fp16"), ("small", 16, 16384, "bf16"), ("odd", 3, 2047, "fp32"),
                            ("one", 1, 1, "fp32")]:
        out += _flow(label, B, D, dt)
    return out + _finalize("paper", 72, 32, FIN) + _finalize("many", 4096, 200, FIN) + _finalize("one", 1, 1, FIN)


# ------------------------------------------------------------------------------------------ TTIR offsets

_ARG = re.compile(r'%([\w.]+): [^,]*?loc\("(\w+)"')
_DEF = re.compile(r'^\s*%([\w.]+)(?::\d+)? = (tt\.splat|tt\.broadcast|tt\.expand_dims|tt\.reshape|tt\.addptr) '
                  r'%([\w.]+)(.*)$')


def addptr_offsets(ttir: str) -> dict[str, set[str]]:
    """kernel argument name → the element types of the offsets every tt.addptr rooted at it adds
    (following splat / broadcast / expand_dims / reshape / addptr chains)."""
    func = next(line for line in ttir.splitlines() if "tt.func" in line)
    root = {ssa: name for ssa, name in _ARG.findall(func)}
    out: dict[str, set[str]] = {}
    for line in ttir.splitlines():
        m = _DEF.match(line)
        if not m or m.group(3) not in root:
            continue
        dst, op, src, rest = m.groups()
        root[dst] = root[src]
        if op == "tt.addptr":
            types = rest.split(" loc(")[0].rsplit(":", 1)[1]
            off = types.rsplit(",", 1)[1].strip()
            out.setdefault(root[src], set()).add(re.sub(r"^tensor<(?:\d+x)*|>$", "", off))
    return out


WIDE = {"_sde_step_fwd_kernel": {"x_ptr", "v_ptr", "xi_ptr", "xn_ptr", "mean_ptr"},
        "_flow_sums_fwd_kernel": {"v_ptr", "xi_ptr", "vo_ptr", "vr_ptr"},
        "_flow_sums_bwd_kernel": {"v_ptr", "xi_ptr", "vo_ptr", "vr_ptr", "dv_ptr"},
        "_token_fwd_kernel": {"h_ptr", "w_ptr"}, "_token_bwd_kernel": {"h_ptr", "w_ptr"},
        "_token_mm_kernel": {"a_ptr", "b_ptr", "acc_ptr", "out_ptr"}}
"""the pointers whose flat index can pass 2³¹ ([B, D] streams; [T, H] / [V, H] rows and the GEMMs' operands)"""


def test_offsets_checker_sees_i32_and_i64():
    """The TTIR reader on a hand-written fragment: an i32 offset into a watched pointer is reported."""
    ttir = ('  tt.func public @k(%x_ptr: !tt.ptr<f32> loc("x_ptr"(#loc)), %y: !tt.ptr<f32> loc("y"(#loc))) {\n'
            '    %x = tt.splat %x_ptr : !tt.ptr<f32> -> tensor<64x!tt.ptr<f32>> loc(#l)\n'
            '    %x_1 = tt.addptr %x, %off : tensor<64x!tt.ptr<f32>>, tensor<64xi32> loc(#l)\n'
            '    %2 = tt.addptr %y, %row : !tt.ptr<f32>, i64 loc(#l)\n')
    assert addptr_offsets(ttir) == {"x_ptr": {"i32"}, "y": {"i64"}}


# ------------------------------------------------------------------------------------------ the compile

@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as err:
        pytest.skip(f"this triton lacks the AOT compile API: {err}")
    if torch.cuda.is_available():
        pytest.skip("a GPU runs the compiled kernels for real (tests/test_ops_*_kernels.py)")
    full = os.environ.get("UNIGRPO_AOT_FULL") == "1"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # real JITFunctions
    p = subprocess.run([sys.executable, os.path.join(HERE, "_triton_aot.py"), "90", json.dumps(cases(full))],
                       env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-4000:]
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


def _name(r):
    flags = {k: v for k, v in r["constexprs"].items() if not k.startswith(("BLOCK", "GROUP"))}
    return f"{r['kernel']} {r['cases']} {flags} {r['options']}"


def _spill_allowance(r) -> int:
    """Bytes of spills tolerated: none, except the one-program flow finalize at B ≥ 1024 rows ("many"), where
    triton ≥ 3.7 may spill there (3.9: 24 B in one flag combination at 168 registers; 3.6, the GPU machine's,
    spills none and is held to none; 16 B elsewhere with a 1,024-
    element tile, so it follows the code, not the tile size). That kernel runs one program per loss call over
    [B, chunks, 3] partials: a few bytes of local memory there cost nothing measurable."""
    newer = tuple(int(x) for x in str(r["triton"]).split(".")[:2]) >= (3, 7)   # the GPU machine's 3.6: none
    return 64 if newer and r["kernel"] == "_flow_loss_finalize_kernel" and "many" in r["cases"] else 0


def test_every_variant_compiles_without_spills_within_shared_memory(compiled):
    kernels = {r["kernel"] for r in compiled}
    assert kernels == {"_token_fwd_kernel", "_token_merge_kernel", "_token_bwd_kernel", "_token_mm_kernel",
                       "_sde_step_fwd_kernel", "_flow_sums_fwd_kernel", "_flow_sums_bwd_kernel",
                       "_flow_loss_finalize_kernel"}, kernels
    spills = [f"{_name(r)}: {r['spill_bytes']} B, {r['regs']} regs" for r in compiled
              if r["spill_bytes"] > _spill_allowance(r)]
    assert not spills, "register spills on sm_90a (triton %s):\n" % compiled[0]["triton"] + "\n".join(spills)
    big = [f"{_name(r)}: {r['shared']} B" for r in compiled if r["shared"] > SMEM_LIMIT]
    assert not big, "shared memory over 227 KB:\n" + "\n".join(big)
    assert all(r["regs"] is not None and r["regs"] <= 255 for r in compiled)


def test_bf16_token_kernels_use_wgmma(compiled):
    bf16 = [r for r in compiled if r["kernel"] in ("_token_fwd_kernel", "_token_bwd_kernel", "_token_mm_kernel")
            and r["constexprs"].get("DOT_F32") is False]
    seen = {(r["kernel"], r["constexprs"].get("WANT_ENT", r["constexprs"].get("HAS_GE", r["constexprs"].get("ACC_IN"))))
            for r in bf16}
    # forward ± entropy, dlogits ± entropy, GEMMs with and without the accumulator input (dH, dW, dW over chunks)
    assert seen == {(k, f) for k in ("_token_fwd_kernel", "_token_bwd_kernel", "_token_mm_kernel")
                    for f in (False, True)}, seen
    assert len([r for r in bf16 if r["kernel"] == "_token_mm_kernel"]) >= 4     # dH / dW operand layouts
    no = [_name(r) for r in bf16 if not r["wgmma"]]
    assert not no, "bf16 token kernels without wgmma on sm_90a:\n" + "\n".join(no)


def test_wide_pointers_use_int64_offsets(compiled):
    """At B·D > 2³¹ (flow) and T·V > 2³¹ (token): every address into a wide tensor is formed in int64."""
    checked = set()
    for r in compiled:
        if not ({"huge", "long"} & set(r["cases"])) or r["kernel"] not in WIDE:
            continue
        offs = addptr_offsets(r["ttir"])
        for arg in WIDE[r["kernel"]]:
            if arg in offs:
                checked.add((r["kernel"], arg))
                assert "i64" in offs[arg], f"{_name(r)}: {arg} offsets {offs[arg]} (an i32 index wraps past 2³¹)"
                if r["kernel"].startswith(("_sde", "_flow")):   # one flat index per element: all of it int64
                    assert offs[arg] == {"i64"}, f"{_name(r)}: {arg} offsets {offs[arg]}"
    assert {k for k, _ in checked} == set(WIDE), checked
