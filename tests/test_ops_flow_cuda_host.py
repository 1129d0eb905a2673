"""The CUDA flow library's host side, pre-empting GPU failures on the CPU (issue 17):

- it launches on torch's current stream, and an error a launch returns is raised (kernels/cuda_lib.py with the
  C entry points stubbed); flow.cu checks cudaGetLastError after every kernel launch (a source read);
- non-contiguous, offset and misaligned inputs through the public flow ops with backend="cuda": contiguous
  copies where needed, misaligned pointers passed through to the library's scalar path, a clear error on a
  direct call with a non-contiguous tensor.
"""
import os
import re

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------- CUDA library: the current stream, errors after launch

@pytest.fixture
def fake_cuda_lib(monkeypatch):
    """kernels/cuda_lib.py wired to a stand-in library on the CPU: CPU tensors pass the device check, torch's
    current stream is a marker, and each C entry point records its arguments and returns `code`."""
    import contextlib

    import torch

    from unigrpo_kernels import cuda_lib as cl

    class Lib:
        code = 0
        calls: list = []

        def unigrpo_cuda_error_string(self, code):
            return b"too many resources requested for launch"

        def __getattr__(self, name):
            def entry(*args):
                Lib.calls.append((name, args))
                return Lib.code
            return entry

    class Stream:
        cuda_stream = 0x5EED

    monkeypatch.setattr(cl, "_require", lambda dev: Lib())
    monkeypatch.setattr(cl, "_check_device", lambda **t: torch.device("cpu"))
    monkeypatch.setattr(cl, "_chunk_count", lambda chunks, B, D, code, dev: 2)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "device", lambda dev: contextlib.nullcontext())
    Lib.calls = []
    return cl, Lib


def _flow_calls(cl):
    import torch

    B, D = 3, 10
    x, xi = torch.zeros(B, D), torch.zeros(B, D)
    v = torch.zeros(B, D, dtype=torch.bfloat16)
    r = torch.zeros(B)
    return {"unigrpo_sde_step_fwd": lambda: cl.sde_step_fwd(x, v, xi, r, r, r, True),
            "unigrpo_flow_sums_fwd": lambda: cl.flow_sums_fwd(v, xi, v, v),
            "unigrpo_flow_sums_bwd": lambda: cl.flow_sums_bwd(torch.zeros(B, 3), v, xi, v, v, True, False)}


def test_cuda_lib_launches_on_torchs_current_stream(fake_cuda_lib):
    cl, Lib = fake_cuda_lib
    for name, call in _flow_calls(cl).items():
        Lib.calls.clear()
        call()
        assert [c[0] for c in Lib.calls] == [name]
        assert Lib.calls[0][1][-1] == 0x5EED, f"{name} got stream {Lib.calls[0][1][-1]!r}, not the current one"


def test_cuda_lib_raises_the_error_a_launch_returns(fake_cuda_lib):
    cl, Lib = fake_cuda_lib
    Lib.code = 7
    for name, call in _flow_calls(cl).items():
        with pytest.raises(RuntimeError, match=rf"{name} failed: too many resources requested for launch \(cudaError 7\)"):
            call()


def _cu_functions(src: str) -> dict[str, str]:
    """Top-level function name → body of a C++/CUDA source (brace matching; namespaces and extern "C" blocks
    are descended into)."""
    out, depth, start, sig_start = {}, 0, None, 0
    stack = []
    i = 0
    while i < len(src):
        c = src[i]
        if c == "{":
            head = src[sig_start:i]
            is_scope = re.search(r'(namespace\s*\w*|extern\s*"C")\s*$', head.strip()) is not None
            stack.append(is_scope)
            if not is_scope and start is None:
                m = re.search(r"(\w+)\s*\([^()]*(?:\([^()]*\)[^()]*)*\)\s*(?:const\s*)?$", head.strip())
                start = (m.group(1) if m else None, i)
            sig_start = i + 1
        elif c == "}":
            is_scope = stack.pop() if stack else False
            if start is not None and not is_scope and len([s for s in stack if not s]) == 0:
                name, at = start
                if name:
                    out[name] = src[at:i + 1]
                start = None
            sig_start = i + 1
        elif c == ";" and start is None:
            sig_start = i + 1
        i += 1
    return out


def unchecked_launches(src: str) -> list[str]:
    """Functions that launch a kernel (<<<…>>>) without a launch-error check (`launched()`, i.e.
    cudaGetLastError) after the launch in the same function or, for a helper, in every function calling it."""
    funcs = _cu_functions(src)
    bad = []
    for name, body in funcs.items():
        if "<<<" not in body:
            continue
        if "launched()" in body[body.rindex("<<<"):]:
            continue
        callers = {n: b for n, b in funcs.items() if n != name and re.search(rf"\b{name}\s*[<(]", b)}
        if not callers or not all("launched()" in b[list(re.finditer(rf"\b{name}\s*[<(]", b))[-1].start():]
                                  for b in callers.values()):
            bad.append(name)
    return bad


def test_every_cuda_launch_is_checked_for_errors():
    """flow.cu returns cudaGetLastError after every launch (via `launched()`), so kernels/cuda_lib.py raises it
    (test above): a bad launch configuration is an exception, not silently wrong output. The check sees the
    removal of one such call."""
    import os

    path = os.path.join(os.path.dirname(TESTS), "kernels", "cuda", "flow.cu")
    with open(path) as f:
        src = f.read()
    assert "cudaError_t launched() { return cudaGetLastError(); }" in src
    funcs = _cu_functions(src)
    assert {"reduce_partials", "flow_sums_bwd_dispatch", "flow_sums_bwd_launch", "unigrpo_flow_sums_bwd"} <= set(funcs)
    assert unchecked_launches(src) == []
    broken = src.replace("    flow_sums_bwd_dispatch<TV, false>(p, use_old, use_ref, grid, stream);\n  }\n  return launched();",
                         "    flow_sums_bwd_dispatch<TV, false>(p, use_old, use_ref, grid, stream);\n  }\n  return cudaSuccess;")
    assert broken != src and unchecked_launches(broken) == ["flow_sums_bwd_dispatch"]


# --------------------------------------------- CUDA flow ops on non-contiguous, offset and misaligned inputs

def test_cuda_flow_ops_take_strided_offset_and_misaligned_inputs(fake_cuda_lib, monkeypatch):
    """Through the public ops with backend="cuda" (the C entry points stubbed): non-contiguous inputs (a
    transpose, a column slice) reach the library as contiguous copies — its own check
    would refuse them otherwise (tests/test_ops_flow_cuda.py names that error) — while a contiguous view at
    an odd storage offset (a pointer 4 bytes past a 16-byte boundary) is passed as it is: flow.cu picks its
    scalar path from the pointers' alignment, and the host emulation there runs that path misaligned."""
    import torch

    from unigrpo_kernels import flow as F

    cl, Lib = fake_cuda_lib
    monkeypatch.setattr(F, "resolve_backend", lambda name, device=None, op=None: "cuda")
    B, D = 3, 120
    x = torch.randn(D, B).t()                                              # a transpose: strides (1, B)
    v = torch.randn(B, D + 3, dtype=torch.bfloat16)[:, 1:D + 1]            # a column slice: row stride D + 3
    xi = torch.randn(B * D + 1)[1:].view(B, D)                             # contiguous, 4 bytes off alignment
    assert not x.is_contiguous() and not v.is_contiguous() and xi.is_contiguous() and xi.data_ptr() % 16 != 0
    F.sde_step(x, v, a_B=1.0, b_B=0.5, std_B=0.1, noise_BD=xi, backend="cuda")
    (name, args), = Lib.calls
    assert name == "unigrpo_sde_step_fwd"
    ptrs = dict(zip(("x", "v", "xi"), args[:3]))
    assert ptrs["xi"] == xi.data_ptr(), "the misaligned contiguous noise was copied (or moved)"
    assert ptrs["x"] != x.data_ptr() and ptrs["v"] != v.data_ptr()       # made contiguous first
    Lib.calls.clear()
    g = torch.randn(B * D + 1)[1:].view(B, D)                              # misaligned v_old
    loss_in = dict(v_BD=torch.randn(D, B).t(), xi_BD=torch.randn(B, D), v_old_BD=g, v_ref_BD=torch.randn(B, D),
                   adv_B=torch.randn(B), b_B=torch.full((B,), 0.5), std_B=torch.full((B,), 0.1),
                   h_B=torch.full((B,), 0.1))
    monkeypatch.setattr(F, "_finalize_impl", lambda mod: None)   # the stub's sums are zeros: torch finalize
    F.flow_grpo_loss(**loss_in, clip_eps=0.2, backend="cuda")
    names = [c[0] for c in Lib.calls]
    assert names == ["unigrpo_flow_sums_fwd"], names
    assert Lib.calls[0][1][2] == g.data_ptr()                              # v_old passed as it is
    with pytest.raises(ValueError, match=r"v_BD must be contiguous"):      # the library's own check, direct call
        cl.flow_sums_fwd(torch.zeros(D, B).t(), torch.zeros(B, D), torch.zeros(B, D), torch.zeros(B, D))
