"""Ahead-of-time view of what a GPU would compile: the Triton launches of the fused ops, recorded at given
shapes with the GPU launch configs, and each distinct specialisation compiled for a GPU target. No GPU and
no memory: the launchers run on meta tensors and the kernels are replaced by recorders, so the paper's shapes
and shapes past 2³¹ elements cost nothing. Used by tests/test_triton_aot.py and tests/test_gpu_preempt.py.

    python tests/_triton_aot.py ARCH CASES_JSON     # (TRITON_INTERPRET unset) → one JSON line per variant

A launch's specialisation is what Triton's JIT keys its cache on: each integer argument as == 1 (then a
constexpr), divisible by 16 or neither, i32 or i64 by size; each tensor by dtype and 16-byte alignment; the
constexpr arguments and num_warps / num_stages. Alignment comes from the storage offset (allocations are
aligned), as on the GPU. The compile reports the PTX's wgmma use, ptxas' registers and spill bytes, the
shared memory in bytes and, for the int64 check, the TTIR's address arithmetic.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch

_TT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
       torch.int32: "i32", torch.bool: "i1"}


def spec(arg):
    """The JIT cache key of one launch argument (see the module docstring)."""
    if isinstance(arg, torch.Tensor):
        return ("*" + _TT[arg.dtype], (arg.storage_offset() * arg.element_size()) % 16 == 0)
    if isinstance(arg, (bool, str)) or arg is None:
        return arg
    if isinstance(arg, (int, np.integer)):
        v = int(arg)
        kind = "i32" if -2**31 <= v < 2**31 else "i64"
        return (kind, "1" if v == 1 else ("D" if v % 16 == 0 else ""))
    if isinstance(arg, float):
        return ("fp32", "")
    raise TypeError(f"unexpected launch argument {arg!r}")


@dataclass
class Launch:
    kernel: str
    args: dict            # parameter name -> spec (runtime arguments)
    constexprs: dict      # parameter name -> value
    options: dict         # num_warps, num_stages
    cases: list = field(default_factory=list)

    def key(self):
        return (self.kernel, tuple(self.args.items()), tuple(sorted(self.constexprs.items())),
                tuple(sorted(self.options.items())))


class _Recorder:
    """Stands in for a @triton.jit kernel: kernel[grid](*args, **kw) records a Launch, runs nothing."""

    def __init__(self, fn, sink, current):
        self.fn, self.sink, self.current = fn, sink, current

    def __getitem__(self, grid):
        def launch(*args, **kw):
            names = [n for n in self.fn.arg_names if n not in kw]
            opts = {k: kw.pop(k) for k in ("num_warps", "num_stages") if k in kw}
            self.sink.append(Launch(self.fn.__name__, dict(zip(names, map(spec, args))), kw, opts,
                                    [self.current[0]]))
        return launch


def record(cases) -> list[Launch]:
    """The distinct launches of `cases`: (label, op, shape dict) with op one of token_fwd, token_bwd,
    sde_step, flow_sums, flow_bwd, flow_finalize (see _run_case), at the GPU launch configs."""
    from unigrpo_kernels.triton import flow as FK, token as TK

    cuda = torch.device("cuda")
    launches: list[Launch] = []
    current = [None]
    real_tcfg, real_fcfg, real_fin = TK._config, FK._config, FK._finalize_blocks
    patches = [(TK, "_config", lambda V, dot_f32, device, *rest: real_tcfg(V, dot_f32, cuda, *rest)),
               (FK, "_config", lambda D, device: real_fcfg(D, cuda)),
               (FK, "_finalize_blocks", lambda B, C, device: real_fin(B, C, cuda)),
               (TK, "_dot_f32", lambda h, w: h.dtype != w.dtype or h.dtype == torch.float32),  # not interpreted
               (TK, "_trip", int)]
    patches += [(mod, n, _Recorder(getattr(mod, n), launches, current))
                for mod in (TK, FK) for n in dir(mod) if n.startswith("_") and n.endswith("_kernel")]
    saved = [(mod, n, getattr(mod, n)) for mod, n, _ in patches]
    try:
        for mod, n, value in patches:
            setattr(mod, n, value)
        for case in cases:
            current[0] = case[0]
            _run_case(TK, FK, *case)
    finally:
        for mod, n, value in saved:
            setattr(mod, n, value)
    unique: dict = {}
    for L in launches:
        first = unique.setdefault(L.key(), L)
        if first is not L and L.cases[0] not in first.cases:
            first.cases += L.cases
    return list(unique.values())


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _run_case(TK, FK, label, op, s):
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[s.get("dtype", "fp32")]
    if op.startswith("token"):
        T, H, V = s["T"], s["H"], s["V"]
        h, w, tgt = _meta(T, H, dtype=dt), _meta(V, H, dtype=dt), _meta(T, dtype=torch.int64)
        if op == "token_fwd":
            TK.token_forward(h, w, tgt, 1.0, s["entropy"])
        else:
            g = _meta(T)
            TK.token_backward(g, g if s["entropy"] else None, h, w, tgt, g, g if s["entropy"] else None, 1.0,
                              need_dh=s.get("dh", True), need_dw=s.get("dw", True))
        return
    B, D = s["B"], s["D"]
    v = _meta(B, D, dtype=dt)
    x = _meta(B, D)
    row = _meta(B)
    if op == "sde_step":
        FK.sde_step_fwd(x, v, x, row, row, row, s["mean"])
    elif op == "flow_sums":
        FK.flow_sums_partials(v, x, v, v)
    elif op == "flow_bwd":
        FK.flow_sums_bwd(_meta(B, 3), v, x, v, v, s["old"], s["ref"])
    elif op == "flow_finalize":
        FK.flow_loss_finalize(_meta(B, s["C"], 3), row, row, row, row, D, 0.8, 1.2, 0.1, s["reg"], s["norm"],
                              s["reweight"])
    else:
        raise ValueError(f"unknown op {op!r}")


# ----------------------------------------------------------------------------------------------- compile

def _ptxas_report(ptx: str, arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas
    try:
        ptxas = get_ptxas(arch).path
    except TypeError:                         # older triton: get_ptxas() takes no architecture
        ptxas = get_ptxas().path
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/k.ptx"
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", path, "-o", f"{d}/k.o"],
                             capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed: {out.stderr[-2000:]}")
    return out.stderr


def compile_launch(L: Launch, arch: int) -> dict:
    """Compile one recorded launch for sm_<arch> (cuda, warp 32); returns its report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from unigrpo_kernels.triton import flow as FK, token as TK

    fn = getattr(TK, L.kernel, None) or getattr(FK, L.kernel)
    sig, consts, attrs = {}, dict(L.constexprs), {}
    for name in fn.arg_names:
        if name in L.constexprs:
            sig[name] = "constexpr"
            continue
        kind, flag = L.args[name] if isinstance(L.args[name], tuple) else (None, None)
        if flag == "1":
            sig[name], consts[name] = "constexpr", 1
            continue
        sig[name] = kind
        if flag is True or flag == "D":
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                        target=GPUTarget("cuda", arch, 32), options=dict(L.options))
    ptx = ck.asm["ptx"]
    rep = _ptxas_report(ptx, arch)
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", rep)]
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", rep)]
    return dict(kernel=L.kernel, cases=L.cases, constexprs=L.constexprs, options=L.options,
                wgmma="wgmma" in ptx, mma="mma.sync" in ptx or "wgmma" in ptx, regs=max(regs) if regs else None,
                spill_bytes=sum(spills), shared=int(ck.metadata.shared), ttir=ck.asm["ttir"],
                triton=triton.__version__)


def main(argv):
    arch, cases = int(argv[0]), json.loads(argv[1])
    for L in record([tuple(c) for c in cases]):
        print(json.dumps(compile_launch(L, arch)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
