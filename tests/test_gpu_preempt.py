"""What would fail first on a GPU, caught on the CPU (issue 17): each test here runs in CI without a GPU.

- Device placement: every kernel test that calls a Triton (or CUDA) backend builds its inputs on the device
  the backend runs on. On CPU the interpreter accepts CPU tensors, so a test that forgets the move passes
  here and is refused by `resolve_backend` on a CUDA machine; an AST read of the test files catches it.
"""
import ast
import os

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------------------------- device placement

def _is_backend_kw(kw: ast.keyword) -> bool:
    return kw.arg == "backend" and isinstance(kw.value, ast.Constant) and kw.value.value in ("triton", "cuda")


def _calls_a_kernel_backend(fn: ast.FunctionDef) -> bool:
    """The function calls an op with backend="triton"/"cuda", a module helper (`_name`) with "triton" as a
    positional argument, a tuple / list of backend names holding "triton", the `_triton` helper, or a torch.ops.unigrpo_kernels op directly."""
    for node in ast.walk(fn):
        if isinstance(node, ast.Call):
            if any(_is_backend_kw(kw) for kw in node.keywords):
                return True
            helper = isinstance(node.func, ast.Name) and node.func.id.startswith("_")
            if helper and any(isinstance(a, ast.Constant) and a.value == "triton" for a in node.args):
                return True
        if isinstance(node, (ast.Tuple, ast.List)) and any(     # `for be in ("torch", "triton")`
                isinstance(e, ast.Constant) and e.value == "triton" for e in node.elts):
            return True
            if isinstance(node.func, ast.Name) and node.func.id == "_triton":
                return True
        if isinstance(node, ast.Attribute) and node.attr == "unigrpo_kernels" and \
                isinstance(node.value, ast.Attribute) and node.value.attr == "ops":
            return True
    return False


def _places_on_device(fn: ast.FunctionDef, placing_helpers: set[str]) -> bool:
    """The function names the test device (DEV), takes a `device` argument, builds its inputs with a helper
    whose default device is DEV, or names "cuda" other than as a backend (a GPU-only test)."""
    if any(a.arg == "device" for a in fn.args.args + fn.args.kwonlyargs):
        return True
    names = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)}
    backend_values = {id(kw.value) for n in ast.walk(fn) if isinstance(n, ast.Call) for kw in n.keywords
                      if _is_backend_kw(kw)}
    cuda = any(isinstance(n, ast.Constant) and n.value == "cuda" and id(n) not in backend_values
               for n in ast.walk(fn))
    cuda = cuda or any(isinstance(n, ast.Attribute) and n.attr == "cuda" and isinstance(n.ctx, ast.Load)
                       and not (isinstance(n.value, ast.Name) and n.value.id == "torch") for n in ast.walk(fn))
    return "DEV" in names or bool(names & placing_helpers) or cuda


def _device_helpers(tree: ast.Module) -> set[str]:
    """Module functions with a `device` parameter defaulting to DEV."""
    out = set()
    for fn in tree.body:
        if isinstance(fn, ast.FunctionDef):
            args = fn.args.args + fn.args.kwonlyargs
            defaults = dict(zip([a.arg for a in fn.args.args][::-1], fn.args.defaults[::-1]))
            defaults.update({a.arg: d for a, d in zip(fn.args.kwonlyargs, fn.args.kw_defaults) if d is not None})
            if any(a.arg == "device" and isinstance(defaults.get("device"), ast.Name)
                   and defaults["device"].id == "DEV" for a in args):
                out.add(fn.name)
    return out


def unplaced_kernel_calls(source: str) -> list[str]:
    """Names of the top-level functions in `source` that call a kernel backend without placing inputs on DEV."""
    tree = ast.parse(source)
    helpers = _device_helpers(tree)
    return [fn.name for fn in tree.body if isinstance(fn, ast.FunctionDef) and fn.name.startswith("test")
            and _calls_a_kernel_backend(fn) and not _places_on_device(fn, helpers)]


@pytest.mark.parametrize("name", ["test_ops_token_kernels.py", "test_ops_flow_kernels.py"])
def test_kernel_tests_put_inputs_on_the_backend_device(name):
    with open(os.path.join(TESTS, name)) as f:
        bad = unplaced_kernel_calls(f.read())
    assert not bad, (f"{name}: {bad} call a kernel backend on tensors never moved to DEV: they pass on CPU "
                     "(the interpreter takes CPU tensors) and are refused on a CUDA machine")


def test_the_placement_check_can_fail():
    """The check flags a function that calls backend="triton" on CPU-built tensors, and accepts the fix."""
    bad = ("def test_x():\n    h = torch.randn(3, 4)\n    TK.token_logprobs(h, w, t, backend='triton')\n")
    good = bad.replace("torch.randn(3, 4)", "torch.randn(3, 4).to(DEV)")
    helper = ("def _case(seed, device=DEV):\n    return 1\n"
              "def test_y():\n    c = _case(1)\n    _run(c, 'triton')\n")
    assert unplaced_kernel_calls(bad) == ["test_x"]
    assert unplaced_kernel_calls(good) == []
    assert unplaced_kernel_calls(helper) == []
    assert unplaced_kernel_calls(helper.replace("device=DEV", "device='cpu'")) == ["test_y"]
    loop = "def test_z():\n    for be in ('torch', 'triton'):\n        op(x, backend=be)\n"
    assert unplaced_kernel_calls(loop) == ["test_z"]


# ------------------------------------------------------------------------- compile variants of a GPU run

def gpu_token_compiles(shapes) -> list:
    """The distinct launches (kernel, specialisation) a CUDA device would compile for the fused token op's
    forward (with and without entropy) and backward (logp only / with entropy) at `shapes` (T, H, V), fp32:
    tests/_triton_aot.py runs the launchers with the GPU launch config on meta tensors, recording only."""
    import _triton_aot as aot

    cases = [(f"{T}x{H}x{V}", op, dict(T=T, H=H, V=V, dtype="fp32", entropy=ent))
             for T, H, V in shapes for ent in (False, True) for op in ("token_fwd", "token_bwd")]
    return aot.record(cases)


def test_fp32_property_test_compiles_few_variants_on_gpu():
    """The fp32 property test's GPU shapes compile at most 36 kernel variants (measured 35: ~8 per shape, 12 for
    the one past the 4096-column split; the 128×128 tiles take ~1-2 s each, so ~1 min of the device check's
    token-test budget); T, H, V drawn as on the CPU compile more (measured 54 on 30 draws, the GPU example
    count: the integer and alignment patterns saturate there)."""
    pytest.importorskip("triton")
    import random

    import test_ops_token_kernels as TT

    few = gpu_token_compiles(TT.GPU_SHAPES)
    rng = random.Random(0)
    drawn = [(rng.randint(1, 40), rng.randint(1, 70), rng.randint(2, 300)) for _ in range(30)]
    many = gpu_token_compiles(drawn)
    assert len(few) <= 36, f"{len(few)} compiled variants for GPU_SHAPES {TT.GPU_SHAPES}"
    assert len(many) > len(few) + 8, (len(many), len(few))   # the counter does see shape-driven variants


# ------------------------------------------------------------------------ "auto" never falls back silently

@pytest.fixture
def fake_cuda_machine(monkeypatch):
    """A CUDA machine as dispatch sees it: torch reports a device, Triton compiles for it, and the CUDA
    library is missing (its probe is False, its status the loader's own message)."""
    import torch

    from unigrpo_kernels import cuda_lib, dispatch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(dispatch._PROBES, "triton", lambda dev: dev is None or dev.type == "cuda")
    monkeypatch.setitem(dispatch._PROBES, "cuda", lambda dev: False)
    monkeypatch.setattr(cuda_lib, "cuda_library_status",
                        lambda device=None: "unavailable: libunigrpo_cuda.so not loaded (x: no such file)")
    monkeypatch.setattr(dispatch, "_logged", set())
    return dispatch


def test_auto_warns_when_the_cuda_library_is_missing(fake_cuda_machine, caplog):
    dispatch = fake_cuda_machine
    with pytest.warns(RuntimeWarning, match=r"falls back to 'triton': cuda unavailable: libunigrpo_cuda.so not loaded"):
        assert dispatch.resolve_backend("auto", "cuda", op="sde_step") == "triton"
    assert any("falls back" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")               # once per (device, op): the second call is quiet
        assert dispatch.resolve_backend("auto", "cuda", op="sde_step") == "triton"
        assert dispatch.resolve_backend("auto", "cuda", op="token_logprobs") == "triton"   # no cuda backend: no loss
        assert dispatch.resolve_backend("auto", "cpu", op="sde_step") == "torch"           # CPU: torch is the plan
    with pytest.raises(ValueError, match="not available"):   # an explicit request still refuses
        dispatch.resolve_backend("cuda", "cuda", op="sde_step")


def test_auto_warns_when_triton_is_missing_too(fake_cuda_machine, monkeypatch):
    dispatch = fake_cuda_machine
    monkeypatch.setitem(dispatch._PROBES, "triton", lambda dev: False)
    with pytest.warns(RuntimeWarning, match=r"falls back to 'torch': cuda unavailable.*; triton "):
        assert dispatch.resolve_backend("auto", "cuda:0", op="flow_grpo_loss") == "torch"


