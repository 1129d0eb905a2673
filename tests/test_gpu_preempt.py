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



# ------------------------------------------------------------- FlexAttention at 1024 px: buckets, recompiles

def _dynamo_limit() -> int:
    import torch._dynamo

    cfg = torch._dynamo.config
    return getattr(cfg, "recompile_limit", None) or cfg.cache_size_limit


def test_1024px_training_stays_within_the_flex_recompile_limit():
    """One training iteration of the paper config (configs/paper.yaml: 32 prompts × G = 24 over 8 ranks, mini-
    batches of 4 trajectories, W = 3 image blocks of 4,096 tokens at 1024 px, text 1–1,024 tokens): the
    compiled flex kernel sees one (rows B, bucket, grad mode) combination per distinct case — the trainer's
    mini-batch sizes (its own `_chunks`, plus the FSDP dummy mini-batch of one row when ranks differ) × the
    buckets of S = text + 3·4,096 × {no_grad (old / reference recompute), grad (the update)} — and their count
    stays within dynamo's recompile limit (past it flex would fall back to eager, materialising the scores)."""
    import yaml

    from unigrpo.model.attention import flex_bucket
    from unigrpo.losses.packing import chunks as _chunks

    with open(os.path.join(os.path.dirname(TESTS), "unigrpo", "configs", "paper.yaml")) as f:
        paper = yaml.safe_load(f)
    world, image_tokens = 8, 4096                     # the yaml's torchrun line; BAGEL at 1024 px: 64 × 64 latents
    rows = paper["prompts_per_iter"] * paper["rollout"]["group_size"] // world
    B_sizes = {len(mb) for mb in _chunks(list(range(rows)), paper["optim"]["minibatch"])}
    if rows % world:
        B_sizes.add(1)                                # _balanced_chunks' dummy mini-batch ([0])
    W = paper["rollout"]["window_size"]
    buckets = {flex_bucket(text + W * image_tokens) for text in range(1, 1025)}
    combos = {(B, L, grad) for B in B_sizes for L in buckets for grad in (False, True)}
    assert B_sizes == {4} and buckets == {13312}
    assert len(combos) <= _dynamo_limit(), (combos, _dynamo_limit())
    # past 1,024 text tokens a second bucket starts: still within the limit with both grad modes
    assert flex_bucket(1025 + W * image_tokens) == 14336 and 2 * 2 <= _dynamo_limit()


def test_flex_block_mask_at_1024px_and_no_recompile_within_a_bucket():
    """The block mask of the 1024-px bucket builds on the CPU (13,312 tokens = 104 tiles of 128: shape and
    sparsity checked), and the compiled flex call — torch.compile(fullgraph=True) with dynamo's compile
    counter as the backend, run on a small layout family with the same bucket logic — compiles once per grad
    mode and B, never per batch: three batches of different text lengths in one bucket add no frame."""
    import torch
    from torch._dynamo.testing import CompileCounter
    from torch.nn.attention.flex_attention import flex_attention

    from unigrpo.model import attention as A
    from unigrpo.model.layout import PackedLayout, Segment

    lay = PackedLayout.build([[[Segment("text", 640)] + [Segment("noise", 4096)] * 3]])
    bm = A.packed_attention_inputs(lay, "flex")["block_mask"]
    assert tuple(bm.seq_lengths) == (13312, 13312) and bm.kv_num_blocks.shape == (1, 1, 104)
    assert 0 < int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum()) < 104 * 104   # sparse: noise blocks

    cnt = CompileCounter()
    fn = torch.compile(lambda q, k, v, block_mask: flex_attention(q, k, v, block_mask=block_mask),
                       backend=cnt, fullgraph=True, dynamic=False)
    torch._dynamo.reset()
    for grad in (False, True):
        for text in (150, 200, 250):                  # one bucket: flex_bucket(text + 2·256) == 768
            layout = PackedLayout.build([[[Segment("text", text)] + [Segment("noise", 256)] * 2]] * 2)
            assert A.flex_bucket(layout.shape[1]) == 768
            L = 768
            bm = A.packed_attention_inputs(layout, "flex")["block_mask"]
            q, k, v = (torch.randn(2, 2, L, 16) for _ in range(3))   # CPU flex has no backward: the grad
            with torch.set_grad_enabled(grad):                           # mode alone is what dynamo guards on
                fn(q, k, v, bm)
    assert cnt.frame_count == 2, f"{cnt.frame_count} compiled frames for 2 grad modes × 3 batches in one bucket"
