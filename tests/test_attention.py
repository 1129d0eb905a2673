"""Packed attention: every backend equals the dense-mask SDPA reference (unigrpo/model/attention.py).

What is checked, on CPU:
- attention level, hypothesis over random PackedLayouts (1–3 rows, 1–3 documents per row, documents opening
  with any segment kind, text / noise / full segments of odd lengths, image blocks of several lengths, trailing
  padding): "split" and "flash" (its gather packing run with `varlen_attention_reference` standing in for
  flash_attn_varlen_func) forward and q/k/v gradients, "flex" forward (CPU has no FlexAttention backward),
  in float64 and fp32, against SDPA with `layout.dense_mask()`;
- the FlexAttention block mask built by tiles (`PackedLayout.block_mask`) equals torch's create_block_mask of
  the same `visible()` rule, block for block (partial and full), with bucket padding. This is the test that
  guards the compiled kernel's skipping of the mask_mod on full tiles: eager flex on CPU evaluates the
  mask_mod everywhere, so a tile wrongly marked full passes the output comparison on CPU (checked by
  mutation);
- the model: the packed forward with each backend equals the cached, segment-by-segment forward (the approach
  and helpers of tests/test_model.py), and split / flash parameter gradients equal sdpa's;
- pieces: the log-sum-exp merge, the varlen stand-in's bottom-right causal alignment, the bucket rule,
  backend resolution and its one log line.
On GPU only (skipped here, with the reason): FlexAttention backward and compiled kernels in bf16 / fp32, no
recompile within a bucket, and the real flash-attn kernel (also needs flash-attn importable).

Tolerances (the reference is SDPA on the same inputs, or the cached path for whole-model checks):

| dtype    | atol  | rtol | why |
|----------|-------|------|-----|
| float64  | 1e-12 | 0    | same sums in another order (merged partials, gathered keys, tiles): measured ≤ 6e-15 on |
|          |       |      | values and gradients of O(1) over 150 layouts; a wrong mask moves them by > 1e-2 |
| float32  | 1e-5  | 1e-5 | fp32 scores and softmax in another order: measured ≤ 2.2e-6 over the same 150 layouts |
| bfloat16 | 2e-2  | 2e-2 | elementwise, flash kernel vs its torch stand-in (GPU): bf16 outputs (2⁻⁸ relative ulp) |
| model, float64 | 1e-10 | 0 | as tests/test_model.py: two layers of float64 rounding, far below any real difference |

GPU tests against float64 SDPA on the same (rounded) inputs use ‖err‖/‖ref‖ per output and gradient: the
backend's error must be ≤ 2 × SDPA's own error in that dtype + a floor, and ≤ a cap (STYLE 4):
| dtype    | floor | cap  | why |
|----------|-------|------|-----|
| bfloat16 | 1e-3  | 2e-2 | bf16 P·V and gradients rounded at 2⁻⁸; other kernels tile and order sums differently |
| float32  | 1e-5  | 1e-4 | fp32 accumulation throughout (no TF32 by default); order of sums only |
"""
import contextlib
import dataclasses
import logging
import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unigrpo.model import PackedLayout, Segment, episode_document
from unigrpo.model import attention as A
from unigrpo.model.layout import PAD

from test_model import ATOL64, layouts, make_model, packed_inputs  # the model-level helpers, not copied

TOL = {torch.float64: (1e-12, 0.0), torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}
GPU_REL = {torch.bfloat16: (1e-3, 2e-2), torch.float32: (1e-5, 1e-4)}  # (floor, cap) of ‖err‖/‖ref‖ on GPU
CPU_BACKENDS = ("split", "flash", "flex")  # "flash" runs its packing with the torch stand-in of the kernel
GPU = torch.cuda.is_available()
NEEDS_GPU = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (FlexAttention backward / compiled kernels)")


@contextlib.contextmanager
def emulated_flash():
    """Run the "flash" backend with varlen_attention_reference instead of flash_attn_varlen_func (the
    module's documented test hook)."""
    with mock.patch.object(A, "flash_varlen_kernel", lambda: A.varlen_attention_reference):
        yield


def kernel_for(backend, real_flash=False):
    """The stand-in for "flash" unless the real kernel is asked for (GPU tests)."""
    return emulated_flash() if backend == "flash" and not real_flash else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------ layouts

@st.composite
def any_document(draw):
    """Any segment first; images of 1–7 tokens (several lengths per batch exercise the split grouping)."""
    segs = []
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["text", "noise", "full"]))
        segs.append(Segment(kind, draw(st.integers(1, 9)) if kind == "text" else draw(st.sampled_from([1, 4, 7]))))
    return segs


@st.composite
def packed_layouts(draw):
    rows = draw(st.lists(st.lists(any_document(), min_size=1, max_size=3), min_size=1, max_size=3))
    longest = max(sum(s.length for d in r for s in d) for r in rows)
    return PackedLayout.build(rows, pad_to=longest + draw(st.integers(0, 5)))


def qkv(layout, dtype, seed, heads=4, kv_heads=2, hd=8, device="cpu", grad=True):
    g = torch.Generator(device=device).manual_seed(seed)
    B, S = layout.shape

    def r(h):
        return torch.randn(B, h, S, hd, generator=g, device=device, dtype=torch.float64).to(dtype).requires_grad_(grad)

    return r(heads), r(kv_heads), r(kv_heads)


def run(layout, backend, q, k, v, grad_out=None, real_flash=False):
    """(out, (dq, dk, dv) or None)."""
    with kernel_for(backend, real_flash):
        out = A.attend(q, k, v, backend=backend, **A.packed_attention_inputs(layout, backend))
        if grad_out is None:
            return out.detach(), None
        return out.detach(), torch.autograd.grad(out, (q, k, v), grad_out)


def assert_close(got, want, dtype, what):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------------- attention level

@settings(max_examples=60, deadline=None)
@given(layout=packed_layouts(), seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_every_backend_equals_dense_sdpa(layout, seed, dtype):
    q, k, v = qkv(layout, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(q.shape, generator=g, dtype=torch.float64).to(dtype)
    ref, ref_grads = run(layout, "sdpa", q, k, v, grad_out)
    for backend in CPU_BACKENDS:
        if backend == "flex":  # CPU: forward only, eager
            with torch.no_grad():
                out, _ = run(layout, backend, q.detach(), k.detach(), v.detach())
            assert_close(out, ref, dtype, "flex out")
            continue
        out, grads = run(layout, backend, q, k, v, grad_out)
        assert_close(out, ref, dtype, f"{backend} out")
        for name, a, b in zip("qkv", grads, ref_grads):
            assert_close(a, b, dtype, f"{backend} d{name}")


@settings(max_examples=25, deadline=None)
@given(layout=packed_layouts(), block=st.sampled_from([4, 8, 16]), extra_blocks=st.integers(0, 2))
def test_block_mask_by_tiles_equals_create_block_mask(layout, block, extra_blocks):
    from torch.nn.attention.flex_attention import create_block_mask

    B, S = layout.shape
    L = (-(-S // block) + extra_blocks) * block
    ours = layout.block_mask(pad_to=L, block_size=block, max_chunk_elems=B * L * block)  # one q-block per chunk
    padded = layout.padded(L)
    theirs = create_block_mask(lambda b, h, q, kv: padded.visible(b, q, kv), B, None, L, L, device="cpu",
                               BLOCK_SIZE=block)
    assert ours.seq_lengths == (L, L)
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    assert torch.equal(ours.kv_num_blocks, theirs.kv_num_blocks)
    assert torch.equal(ours.full_kv_num_blocks, theirs.full_kv_num_blocks)
    for num, ours_idx, theirs_idx in ((ours.kv_num_blocks, ours.kv_indices, theirs.kv_indices),
                                      (ours.full_kv_num_blocks, ours.full_kv_indices, theirs.full_kv_indices)):
        for b in range(B):
            for i in range(L // block):
                n = int(num[b, 0, i])
                assert sorted(ours_idx[b, 0, i, :n].tolist()) == sorted(theirs_idx[b, 0, i, :n].tolist())


def test_split_plan_covers_every_token_once_and_reads_back_from_tensors():
    rows = [[[Segment("text", 5), Segment("noise", 4), Segment("full", 4), Segment("text", 3), Segment("noise", 4)],
             [Segment("noise", 4), Segment("text", 2)]],
            [[Segment("text", 7), Segment("noise", 4), Segment("noise", 4)]]]
    layout = PackedLayout.build(rows, pad_to=35)
    B, S = layout.shape
    plan = A.build_split_plan(layout)
    seen = torch.cat([g.idx.reshape(-1) for g in plan.self_groups])
    assert sorted(seen.tolist()) == list(range(B * S))  # every token is in exactly one self group
    varlen_q = torch.cat([p.q_idx for p in plan.varlen])
    assert sorted(varlen_q.tolist() + plan.pad_idx.tolist()) == list(range(B * S))
    # the W noise blocks after a text share one prefix attention
    assert any(p.q_idx.numel() == 8 and p.kv_idx.numel() == 7 for p in plan.prefix_groups)
    bare = dataclasses.replace(layout, segments=(), attn_cache={})
    assert bare.segment_table() == layout.segments
    assert layout.kind_BS[1, 30] == PAD


def test_merge_partials_is_attention_over_the_union():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 9, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 9, 8, generator=g, dtype=torch.float64)
    o, lse = A.attention_with_lse(q, k, v)
    o1, l1 = A.attention_with_lse(q, k[:, :, :3], v[:, :, :3])
    o2, l2 = A.attention_with_lse(q, k[:, :, 3:], v[:, :, 3:])
    om, lm = A.merge_partials(o1, l1, o2, l2)
    torch.testing.assert_close(om, o, atol=1e-12, rtol=0)
    torch.testing.assert_close(lm, lse, atol=1e-12, rtol=0)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(o, sdpa, atol=1e-12, rtol=0)
    oe, le = A.attention_with_lse(q, k[:, :, :0], v[:, :, :0])  # no keys: o = 0, lse = -inf, weight 0
    assert torch.all(oe == 0) and torch.all(le == -math.inf)
    om, lm = A.merge_partials(o, lse, oe, le)
    assert torch.equal(om, o) and torch.equal(lm, lse)


def test_varlen_stand_in_is_bottom_right_causal():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(5, 2, 4, generator=g, dtype=torch.float64)  # one sequence: 2 queries over 5 keys, then 3 over 2
    k = torch.randn(7, 1, 4, generator=g, dtype=torch.float64)
    v = torch.randn(7, 1, 4, generator=g, dtype=torch.float64)
    cu_q, cu_k = torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([0, 5, 7], dtype=torch.int32)
    out = A.varlen_attention_reference(q, k, v, cu_q, cu_k, 3, 5, causal=True)
    mask1 = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)  # flash-attn's docstring example
    mask2 = torch.tensor([[0, 0], [1, 0], [1, 1]], dtype=torch.bool)
    for (qs, ks, m) in ((slice(0, 2), slice(0, 5), mask1), (slice(2, 5), slice(5, 7), mask2)):
        s = torch.einsum("qhd,khd->hqk", q[qs], k[ks].expand(-1, 2, -1)) / 2.0
        p = torch.softmax(s.masked_fill(~m, -math.inf), -1).nan_to_num(0.0)
        want = torch.einsum("hqk,khd->qhd", p, v[ks].expand(-1, 2, -1))
        torch.testing.assert_close(out[qs], want, atol=1e-12, rtol=0)
    assert torch.all(out[2] == 0)  # a row with no visible key is 0, as in flash-attn


# ------------------------------------------------------------------------------------------ model level

@settings(max_examples=25, deadline=None)
@given(rows=layouts(4), seed=st.integers(0, 2**16))
def test_packed_forward_equals_cached_for_every_backend(rows, seed):
    """tests/test_model.py's packed == cached property, for each backend (float64; flex forward eagerly)."""
    assert_packed_equals_cached(make_model(), rows, seed)


def assert_packed_equals_cached(model, rows, seed):
    """Every backend's packed forward of `rows` equals the segment-by-segment cached forward (float64)."""
    layout = PackedLayout.build(rows)
    ids, lat, sig = packed_inputs(model, layout, seed)
    with torch.no_grad():
        cached_text, cached_vel = {}, []
        for b, row in enumerate(rows):
            t = 0
            for doc in row:
                cache = model.new_cache(1, sum(s.length for s in doc))
                for seg in doc:
                    n = seg.length
                    if seg.kind == "text":
                        cached_text[(b, t)] = model.append_text(cache, ids[b:b + 1, t:t + n])[0]
                    else:
                        m = len(cached_vel)
                        fn = model.image_velocity if seg.kind == "noise" else model.append_image
                        cached_vel.append(fn(cache, lat[m:m + 1], sig[m:m + 1])[0])
                    t += n
        for backend in ("sdpa",) + CPU_BACKENDS:
            with kernel_for(backend):
                hidden, vel = model.forward_packed(layout, ids, lat, sig, backend=backend)
            for (b, t), want in cached_text.items():
                torch.testing.assert_close(hidden[b, t:t + want.shape[0]], want, atol=ATOL64, rtol=0,
                                           msg=lambda m: f"{backend} text row {b} at {t}: {m}")
            for m, want in enumerate(cached_vel):
                torch.testing.assert_close(vel[m], want, atol=ATOL64, rtol=0,
                                           msg=lambda msg: f"{backend} image block {m}: {msg}")


@st.composite
def episodes(draw):
    """(W, rows of per-trajectory round text lengths): 1–2 rows of 1–2 trajectories of 1–3 rounds, W = 1–3."""
    W = draw(st.integers(1, 3))
    rounds = st.lists(st.integers(1, 7), min_size=1, max_size=3)
    return W, [[draw(rounds) for _ in range(draw(st.integers(1, 2)))] for _ in range(draw(st.integers(1, 2)))]


@settings(max_examples=15, deadline=None)
@given(episode=episodes(), seed=st.integers(0, 2**16))
def test_multi_round_episodes_see_their_own_round_and_packed_equals_cached(episode, seed):
    """§12's visibility, from the round structure alone: the k-th noise block of a trajectory is round
    r = k // W's; it sees the text of rounds ≤ r, the clean images of rounds < r (the first ones of the
    trajectory, in order) and itself, nothing else; text and clean tokens see no noise block. Then
    packed == cached for every backend (float64)."""
    W, specs = episode
    P = 4   # image tokens of the tiny test model's blocks
    rows = [[episode_document(rt, W, P) for rt in row] for row in specs]
    layout = PackedLayout.build(rows)
    mask, kind = layout.dense_mask()[:, 0], layout.kind_BS
    for b, row in enumerate(specs):
        for d, rt in enumerate(row):
            tok = (layout.doc_BS[b] == d).nonzero().flatten()
            text, full, noise = (tok[kind[b, tok] == k] for k in (0, 2, 1))
            assert len(text) == sum(rt) and len(full) == P * (len(rt) - 1) and len(noise) == P * W * len(rt)
            for k in range(W * len(rt)):
                r, q = k // W, noise[k * P:(k + 1) * P]
                want = torch.zeros(mask.shape[-1], dtype=torch.bool)
                want[text[:sum(rt[:r + 1])]] = True
                want[full[:P * r]] = True
                want[q] = True
                assert torch.equal(mask[b, q], want.expand(P, -1)), (b, d, k)
            assert not mask[b][torch.cat([text, full])][:, noise].any(), (b, d)
    assert_packed_equals_cached(make_model(), rows, seed)


@pytest.mark.parametrize("backend", ["split", "flash"])
def test_model_gradients_equal_sdpa(backend):
    model = make_model(seed=3)
    layout = PackedLayout.build([[[Segment("text", 6), Segment("noise", 4), Segment("noise", 4)],
                                  [Segment("text", 3), Segment("full", 4), Segment("text", 2), Segment("noise", 4)]],
                                 [[Segment("text", 9), Segment("noise", 4)]]])
    ids, lat, sig = packed_inputs(model, layout, 5)
    grads = {}
    for be in ("sdpa", backend):
        model.zero_grad()
        with kernel_for(be):
            h, v = model.forward_packed(layout, ids, lat, sig, backend=be)
        (h[layout.is_text_BS].pow(2).mean() + v.pow(2).mean()).backward()
        grads[be] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["sdpa"].keys() == grads[backend].keys()
    for n, g in grads["sdpa"].items():
        torch.testing.assert_close(grads[backend][n], g, atol=ATOL64, rtol=0, msg=lambda m: f"{n}: {m}")


def test_default_and_auto_are_sdpa_on_cpu():
    model = make_model()
    layout = PackedLayout.build([[[Segment("text", 5), Segment("noise", 4)]]], pad_to=11)
    ids, lat, sig = packed_inputs(model, layout, 0)
    with torch.no_grad():
        a = model.forward_packed(layout, ids, lat, sig)
        b = model.forward_packed(layout, ids, lat, sig, backend="auto")
        c = model.forward_packed(PackedLayout.build([[[Segment("text", 5), Segment("noise", 4)]]], pad_to=11),
                                 ids, lat, sig, backend="sdpa")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[0], c[0])
    assert set(layout.attn_cache) == {"sdpa"}  # built once, reused by the second forward


# ---------------------------------------------------------------------------------------- the pieces

def test_flex_bucket():
    buckets = [A.flex_bucket(s) for s in range(1, 70_000, 7)]
    for s, b in zip(range(1, 70_000, 7), buckets):
        assert b >= s and b % 128 == 0 and (s <= 1024 or b - s <= s / 8), (s, b)
    assert buckets == sorted(buckets)
    for lo in (1024, 2048, 4096, 8192, 16384, 32768):  # at most 8 buckets per octave
        assert len({A.flex_bucket(s) for s in range(lo + 1, 2 * lo + 1)}) <= 8
    assert {A.flex_bucket(12_288 + t) for t in range(100, 701)} == {13_312}  # 1024 px, W = 3: one bucket


def test_resolve_attention_backend(caplog, monkeypatch):
    monkeypatch.setattr(A, "_logged", set())
    with caplog.at_level(logging.INFO, logger="unigrpo.model.attention"):
        assert A.resolve_attention_backend("auto", "cpu") == "sdpa"
        assert A.resolve_attention_backend("auto", "cpu") == "sdpa"
    assert len([r for r in caplog.records if "-> sdpa" in r.getMessage()]) == 1  # logged once
    assert A.resolve_attention_backend("auto", torch.device("cuda")) == "flex"
    for name in ("sdpa", "split", "flex"):
        assert A.resolve_attention_backend(name, "cpu") == name
    assert A.resolve_attention_backend(" Split ", "cpu") == "split"
    with pytest.raises(ValueError, match=r"unknown attention backend 'xformers'.*sdpa, flex, split, flash"):
        A.resolve_attention_backend("xformers", "cpu")
    if A.flash_available():
        with pytest.raises(ValueError, match="CUDA only"):
            A.resolve_attention_backend("flash", "cpu")
    else:
        with pytest.raises(ValueError, match="needs flash-attn"):
            A.resolve_attention_backend("flash", "cuda")
    with pytest.raises(ValueError, match="unknown attention backend 'auto'"):
        A.packed_attention_inputs(PackedLayout.build([[[Segment("text", 3)]]]), "auto")


def test_backend_input_errors():
    layout = PackedLayout.build([[[Segment("text", 3), Segment("noise", 4)]]])
    q, k, v = qkv(layout, torch.float64, 0, grad=False)
    for backend, needs in (("flex", "block_mask"), ("split", "plan"), ("flash", "plan")):
        with pytest.raises(ValueError, match=needs):
            A.attend(q, k, v, backend=backend)
    other = A.packed_attention_inputs(PackedLayout.build([[[Segment("text", 5)]]]), "split")
    with pytest.raises(ValueError, match=r"plan is for \[B, S\] = \(1, 5\)"):
        A.attend(q, k, v, backend="split", **other)


@pytest.mark.skipif(A.flash_available(), reason="flash-attn is importable here")
def test_flash_without_flash_attn_says_how_to_get_it():
    layout = PackedLayout.build([[[Segment("text", 3)]]])
    q, k, v = qkv(layout, torch.float64, 0, grad=False)
    with pytest.raises(RuntimeError, match="pip install flash-attn"):
        A.attend(q, k, v, backend="flash", **A.packed_attention_inputs(layout, "flash"))


# ------------------------------------------------------------------------------------------ GPU only

def _gpu_layout():
    """Two rows: a trajectory (text, W = 3 noise blocks) and two packed documents with a clean block."""
    return PackedLayout.build([[[Segment("text", 200), Segment("noise", 256), Segment("noise", 256),
                                 Segment("noise", 256)]],
                               [[Segment("text", 77), Segment("noise", 256)],
                                [Segment("text", 31), Segment("full", 256), Segment("text", 40),
                                 Segment("noise", 256)]]], device="cuda")


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@NEEDS_GPU
@pytest.mark.parametrize("backend", ["flex", "split", "flash"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_backends_forward_backward(backend, dtype):
    """BAGEL-7B heads (28 / 4 KV, hd 128). Reference: float64 SDPA on the same (rounded) inputs; criterion: the
    GPU row of the table (‖err‖/‖ref‖ ≤ 2× SDPA's own in `dtype` + floor, and ≤ the cap)."""
    if backend == "flash" and (not A.flash_available() or dtype != torch.bfloat16):
        pytest.skip("flash-attn not importable" if not A.flash_available() else "flash-attn takes fp16/bf16 only")
    layout = _gpu_layout()
    q, k, v = qkv(layout, dtype, 0, heads=28, kv_heads=4, hd=128, device="cuda")
    g = torch.randn(q.shape, device="cuda").to(dtype)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_grads = run(layout, "sdpa", q64, k64, v64, g.double())
    base, base_grads = run(layout, "sdpa", q, k, v, g)
    got, got_grads = run(layout, backend, q, k, v, g, real_flash=True)
    floor, cap = GPU_REL[dtype]
    for name, a, b, want in zip(["out", "dq", "dk", "dv"], [got, *got_grads], [base, *base_grads], [ref, *ref_grads]):
        err, err_sdpa = _rel(a, want), _rel(b, want)
        assert err <= min(2 * err_sdpa + floor, cap), f"{backend} {name}: rel err {err:.2e}, sdpa's {err_sdpa:.2e}"


@NEEDS_GPU
def test_gpu_flex_does_not_recompile_within_a_bucket():
    if not hasattr(torch.compiler, "set_stance"):
        pytest.skip("torch.compiler.set_stance needs torch >= 2.6")
    a = PackedLayout.build([[[Segment("text", 300), Segment("noise", 1024), Segment("noise", 1024)]]] * 2,
                           device="cuda")
    b = PackedLayout.build([[[Segment("text", 420), Segment("noise", 1024), Segment("noise", 1024)]]] * 2,
                           device="cuda")
    assert A.flex_bucket(a.shape[1]) == A.flex_bucket(b.shape[1])
    for grad in (False, True):
        q, k, v = qkv(a, torch.bfloat16, 0, heads=8, kv_heads=2, hd=64, device="cuda", grad=grad)
        out = A.attend(q, k, v, backend="flex", **A.packed_attention_inputs(a, "flex"))
        if grad:
            out.sum().backward()
        q, k, v = qkv(b, torch.bfloat16, 1, heads=8, kv_heads=2, hd=64, device="cuda", grad=grad)
        with torch.compiler.set_stance("fail_on_recompile"):
            out = A.attend(q, k, v, backend="flex", **A.packed_attention_inputs(b, "flex"))
            if grad:
                out.sum().backward()


@NEEDS_GPU
@pytest.mark.skipif(not A.flash_available(), reason="flash-attn is not importable (optional extra)")
def test_gpu_flash_kernel_equals_its_torch_stand_in():
    layout = _gpu_layout()
    q, k, v = qkv(layout, torch.bfloat16, 2, heads=28, kv_heads=4, hd=128, device="cuda")
    g = torch.randn_like(q)
    real = run(layout, "flash", q, k, v, g, real_flash=True)
    stand_in = run(layout, "flash", q, k, v, g)
    for a, b in zip([real[0], *real[1]], [stand_in[0], *stand_in[1]]):
        assert_close(a.float(), b.float(), torch.bfloat16, "flash kernel vs stand-in")
