"""The fused token log-prob kernels (kernels/triton/token.py) and the dispatching text ops (kernels/text.py)
against the float64 reference on materialised logits (kernels/reference/text.py), ALGORITHM.md §6.

On a machine without a GPU the Triton kernels run in the interpreter (conftest.py sets TRITON_INTERPRET=1)
at small, odd shapes that still cross every tile, vocabulary-split, vocabulary-block and token-chunk
boundary of the interpreter config (16×64 tiles, 64-wide H steps, 128-column splits and blocks, 32-token
chunks). Larger shapes run only where a GPU is. Every buffer the kernels allocate is poisoned (NaN) first,
so an element a kernel forgets to write fails.

Shape legend: T tokens, H hidden, V vocabulary, B sequences, L padded length.

Tolerances, one rule for every output: |kernel − ref64| ≤ k·|torch − ref64| + floor, elementwise, where ref64
is the reference in float64 on the SAME (already rounded) inputs and `torch` is the reference run by PyTorch
in the input precision (fp32: the reference on fp32 tensors; bf16: a bf16 lm_head matmul, fp32 softmax):
| dtype | output        | k | floor                                  | why                                          |
|-------|---------------|---|----------------------------------------|----------------------------------------------|
| fp32  | logp, entropy | 2 | 2e-6·(1 + max|z|)                      | both accumulate fp32 over H and differ only  |
|       |               |   |                                        | in summation order; logits round at eps·|z| |
| fp32  | dH, dW        | 2 | 4 ulp·(|ref| + (4 + max|z|)·S)         | V (resp. T) signed terms cancel: the bound   |
|       |               |   | S = Σ_v a·|W| (dW: Σ_t a·|h|), a = the | scales with the absolute terms, and p has    |
|       |               |   | absolute terms of dlogits, log p taken | the logits' eps·|z| absolute error; log p =  |
|       |               |   | as z − lse (|z| + |lse|)               | z − lse keeps eps·|lse| where log p + H ≈ 0  |
| bf16  | logp, entropy | 1 | 2e-6·(1 + max|z|)                      | fp32 logits vs torch's bf16 logits: the      |
|       |               |   |                                        | kernel is far better; floor = fp32 rounding  |
| bf16  | dH, dW        | 1 | 2 ulp(bf16)·|ref| + 2e-3·S             | both round dlogits (2⁻⁹ per term: 2e-3·S)   |
|       |               |   |                                        | and the output to bf16; the kernel keeps     |
|       |               |   |                                        | logits and sums in fp32                      |
| all   | dH, dW        |   | + 4 × the smallest normal fp32         | subnormal gradients (p < e^-87) are flushed  |
|       |               |   |                                        | to zero differently by each backend          |
| fp32  | loss, metrics | 2 | 1e-5·(1 + |ref|)                       | O(1) scalars from fp32 log-probs             |
| fp32  | loss dH, dW   | 2 | 1e-5·max|ref|                          | per-token upstream grads of both signs       |
Clip decisions are discontinuous: random loss cases keep every ratio ≥ 1e-4 away from 1 ± ε, and the
boundary itself is tested exactly (old = the kernel's own log-prob gives ρ = 1 bit-exactly).
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings, strategies as st

from unigrpo_kernels import text as TK
from unigrpo_kernels.dispatch import available_backends, resolve_backend
from unigrpo_kernels.reference import text as R

HAS_GPU = torch.cuda.is_available()
DEV = "cuda" if HAS_GPU else "cpu"
F64 = torch.float64
HAS_TRITON = "triton" in available_backends(DEV, op="token_logprobs")
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (or TRITON_INTERPRET unset on CPU)")
# the poisoning fixture patches allocation once per test; that is meant to hold for every example
SETTINGS = settings(max_examples=30 if HAS_GPU else 12, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
KINDS = ("normal", "peaked", "negative", "large")
# (T, H, V) the fp32 property test draws on a GPU. Each distinct integer argument pattern (== 1, % 16 == 0) is
# one more Triton compile of the 128×128 kernels (seconds each), so random T, H, V would compile dozens of
# variants; this short list (the @example shapes, plus one past the GPU's 4096-column split and vocabulary
# block) keeps the count small (tests/test_gpu_preempt.py counts it). The CPU interpreter compiles nothing
# and draws T, H, V freely.
GPU_SHAPES = ((7, 33, 131), (37, 65, 259), (33, 64, 129), (1, 1, 2), (300, 200, 4396))
SHAPE = (st.sampled_from(GPU_SHAPES) if HAS_GPU
         else st.tuples(st.integers(1, 40), st.integers(1, 70), st.integers(2, 300)))
TINY = 4 * torch.finfo(torch.float32).tiny   # gradients of p < e^-87 are subnormal: flushed differently per backend


@pytest.fixture
def poisoned(monkeypatch):
    """Every floating tensor allocated with torch.empty / empty_like during the test starts as NaN. Returns the
    list of allocation sizes (numel), so a test can check that no [T, V]-sized buffer ever exists."""
    real_empty, real_empty_like = torch.empty, torch.empty_like
    sizes: list[int] = []

    def _poison(t):
        sizes.append(t.numel())
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(real_empty_like(*a, **k)))
    return sizes


def _problem(T, H, V, kind, seed, dtype=torch.float32, device="cpu"):
    """hidden [T, H], weight [V, H] (rounded to `dtype`) and targets [T] for one logit regime, drawn on the CPU
    (same values on every machine) and moved to `device`."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, H, generator=g)
    w = torch.randn(V, H, generator=g) / math.sqrt(H)
    tgt = torch.randint(0, V, (T,), generator=g)
    if kind == "peaked":            # each token points hard at one column: p ≈ 1 there, entropy ≈ 0
        k = torch.randint(0, V, (T,), generator=g)
        h = 6 * math.sqrt(H) * w[k] / w[k].norm(dim=1, keepdim=True).clamp(min=1e-6) + 0.1 * h
        tgt = torch.where(torch.rand(T, generator=g) < 0.5, k, tgt)
    elif kind == "negative":        # every logit < 0
        h, w = h.abs() + 0.1, -(w.abs() + 0.01)
    elif kind == "large":           # |z| in the hundreds
        h = h * 40
    return h.to(dtype).to(device), w.to(dtype).to(device), tgt.to(device)


def _run(fn, h, w, tgt, tau, grads, g_T, e_T, bias=None):
    """Forward + backward of Σ g·logp (+ Σ e·entropy) → (logp, entropy, dH, dW), plus dbias with a bias."""
    h = h.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    b = None if bias is None else bias.clone().requires_grad_(True)
    want_ent = grads != "logp"
    out = fn(h, w, tgt, temperature=tau, return_entropy=want_ent, **({} if b is None else {"bias_V": b}))
    lp, ent = out if want_ent else (out, None)
    g_T, e_T = g_T.to(lp.dtype), e_T.to(lp.dtype)
    obj = (lp * g_T).sum() if grads != "entropy" else 0
    obj = obj + (ent * e_T).sum() if want_ent else obj
    obj.backward()
    out = (lp.detach(), None if ent is None else ent.detach(), h.grad, w.grad)
    return out if b is None else out + (b.grad,)


def _triton(h, w, tgt, **kw):
    return TK.token_logprobs(h, w, tgt, backend="triton", **kw)


def _check(name, got, ref64, base, floor, k=2.0):
    """|got − ref64| ≤ k·|base − ref64| + floor elementwise; a failure says where and by how much."""
    got, ref64, base = got.double().cpu(), ref64.double().cpu(), base.double().cpu()
    floor = torch.as_tensor(floor).double().cpu().expand_as(ref64)
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values at {torch.nonzero(~torch.isfinite(got))[:5].tolist()}"
    err, allowed = (got - ref64).abs(), k * (base - ref64).abs() + floor
    bad = err > allowed
    if bad.any():
        i = int(torch.nonzero(bad.flatten())[0])
        idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), ref64.shape))
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.numel()} elements out of tolerance; first at {idx}: "
                             f"got {got.flatten()[i].item():.9g}, ref {ref64.flatten()[i].item():.9g}, error "
                             f"{err.flatten()[i].item():.3g} > allowed {allowed.flatten()[i].item():.3g}")


def _grad_scales(h, w, tgt, tau, g_T, e_T, grads, bias=None):
    """(Σ_v a_tv·|W_v| [T, H], Σ_t a_tv·|h_t| [V, H], max|z|) in float64, with a_tv the size of the terms of
    dlogits_tv = (g·(onehot − p) − e·p·(log p + entropy))/τ taken apart, log p as z − lse:
    p·(|g| + |e|·(|z| + |lse| + entropy)) + onehot·|g|, over τ. A gradient element's rounding error scales with these, not with the (possibly
    cancelled) result. With a bias, z includes it and a fourth value Σ_t a_tv [V] (the scale of dbias) follows."""
    h64, w64 = h.double(), w.double()
    z = h64 @ w64.t() / tau if bias is None else (h64 @ w64.t() + bias.double()) / tau
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    lse = torch.logsumexp(z, -1)[:, None]
    ent = lse - (p * z).sum(-1)[:, None]
    g = g_T.double().abs()[:, None] if grads != "entropy" else torch.zeros_like(ent)
    e = e_T.double().abs()[:, None] if grads != "logp" else torch.zeros_like(ent)
    # log p is formed as z − lse in fp32: its error is eps·(|z| + |lse|) even where log p + entropy cancels
    a = (p * (g + e * (z.abs() + lse.abs() + ent.abs())) + torch.nn.functional.one_hot(tgt, w.shape[0]).double() * g) / tau
    out = a @ w64.abs(), a.t() @ h64.abs(), z.abs().max().item() if z.numel() else 0.0
    return out if bias is None else out + (a.sum(0),)


# ------------------------------------------------------------------------------ log-probs and gradients

@SETTINGS
@given(shape=SHAPE, tau=st.sampled_from([0.7, 1.0, 1.5]), kind=st.sampled_from(KINDS),
       grads=st.sampled_from(["logp", "both", "entropy"]), seed=st.integers(0, 2**31 - 1))
@example(shape=(7, 33, 131), tau=0.7, kind="normal", grads="both", seed=0)
@example(shape=(7, 33, 131), tau=1.5, kind="peaked", grads="both", seed=1)
@example(shape=(37, 65, 259), tau=1.0, kind="large", grads="both", seed=2)
@example(shape=(33, 64, 129), tau=0.7, kind="negative", grads="entropy", seed=3)
@example(shape=(1, 1, 2), tau=1.0, kind="peaked", grads="entropy", seed=8)   # log p + H cancels (found by a draw)
def test_token_logprobs_match_float64(poisoned, shape, tau, kind, grads, seed):
    T, H, V = shape
    h, w, tgt = _problem(T, H, V, kind, seed)
    gg = torch.Generator().manual_seed(seed + 1)
    g_T, e_T = torch.randn(T, generator=gg), torch.randn(T, generator=gg)
    ref = _run(R.token_logprobs, h.double(), w.double(), tgt, tau, grads, g_T, e_T)
    t32 = _run(R.token_logprobs, h, w, tgt, tau, grads, g_T, e_T)
    poisoned.clear()
    got = _run(_triton, h.to(DEV), w.to(DEV), tgt.to(DEV), tau, grads, g_T.to(DEV), e_T.to(DEV))
    if not HAS_GPU:   # never a [T, V] buffer: besides the [T, H] / [V, H] gradients (and dH's fp32
        # accumulator) and the forward's [4, S, T] partials, no allocation passes the Tc × Vb = 32 × 128 scratch
        S = -(-V // 128)
        assert all(n <= 32 * 128 for n in poisoned if n not in (T * H, V * H, 4 * S * T)), sorted(poisoned)[-3:]
    assert got[0].dtype == torch.float32 and got[2].dtype == h.dtype and got[3].dtype == w.dtype
    _check_fp32_outputs(got, ref, t32, grads, _grad_scales(h, w, tgt, tau, g_T, e_T, grads))


def _check_fp32_outputs(got, ref, t32, grads, scales):
    """The table's fp32 rule on (logp, entropy, dH, dW[, dbias]); scales = _grad_scales(...) (dbias: its floor
    is dW's with |h| = 1, i.e. Σ_t a_tv)."""
    sh, sw, zmax = scales[:3]
    eps = torch.finfo(torch.float32).eps
    _check("logp", got[0], ref[0], t32[0], 2e-6 * (1 + zmax))
    if grads != "logp":
        _check("entropy", got[1], ref[1], t32[1], 2e-6 * (1 + zmax))
    _check("dH", got[2], ref[2], t32[2], 4 * eps * (ref[2].abs() + (4 + zmax) * sh) + TINY)
    _check("dW", got[3], ref[3], t32[3], 4 * eps * (ref[3].abs() + (4 + zmax) * sw) + TINY)
    if len(scales) > 3:
        _check("dbias", got[4], ref[4], t32[4], 4 * eps * (ref[4].abs() + (4 + zmax) * scales[3]) + TINY)


def _check_bf16(T, H, V, kind, seed, device, tau=0.7):
    """bf16 hidden and weight: the kernel's error ≤ the error of PyTorch doing the same in bf16 (bf16 logits
    from a bf16 matmul, fp32 softmax, bf16 gradients) + the table's floor; dH, dW come back in bf16."""
    h, w, tgt = _problem(T, H, V, kind, seed, torch.bfloat16, device)
    gg = torch.Generator().manual_seed(seed + 1)
    g_T, e_T = torch.randn(T, generator=gg).to(device), torch.randn(T, generator=gg).to(device)

    def torch_bf16(h, w, tgt, temperature, return_entropy):
        z = (h @ w.t()).float() / temperature
        logp = torch.log_softmax(z, -1)
        return logp.gather(1, tgt[:, None])[:, 0], torch.logsumexp(z, -1) - (logp.exp() * z).sum(-1)

    ref = _run(R.token_logprobs, h.double(), w.double(), tgt, tau, "both", g_T, e_T)
    tb = _run(torch_bf16, h, w, tgt, tau, "both", g_T, e_T)
    got = _run(_triton, h, w, tgt, tau, "both", g_T, e_T)
    assert got[2].dtype == got[3].dtype == torch.bfloat16
    sh, sw, zmax = _grad_scales(h, w, tgt, tau, g_T, e_T, "both")
    ulp = torch.finfo(torch.bfloat16).eps
    _check("logp", got[0], ref[0], tb[0], 2e-6 * (1 + zmax), k=1)
    _check("entropy", got[1], ref[1], tb[1], 2e-6 * (1 + zmax), k=1)
    _check("dH", got[2], ref[2], tb[2], 2 * ulp * ref[2].abs() + 2e-3 * sh + TINY, k=1)
    _check("dW", got[3], ref[3], tb[3], 2 * ulp * ref[3].abs() + 2e-3 * sw + TINY, k=1)


@pytest.mark.parametrize("kind", ["normal", "large"])
def test_bf16_no_worse_than_torch_bf16(poisoned, kind):
    _check_bf16(37, 70, 259, kind, 11, DEV)


def test_batch_invariance(poisoned):
    """A token's log-prob, entropy and dH row are bitwise the same whatever else is in the batch (block sizes,
    splits and vocabulary blocks never depend on T). On the interpreter tl.dot is numpy's matmul (OpenBLAS),
    whose result for a row depends on the row's position inside the tile (measured: 4e-6 apart), so there the
    subsets keep their offsets modulo the 32-row tiles; on a GPU any subset must match."""
    T, H, V = 40, 45, 300
    h, w, tgt = _problem(T, H, V, "normal", 5)
    gg = torch.Generator().manual_seed(6)
    g_T, e_T = torch.randn(T, generator=gg), torch.randn(T, generator=gg)
    dev = lambda *xs: [x.to(DEV) for x in xs]  # noqa: E731
    full = _run(_triton, *dev(h, w, tgt), 1.0, "both", *dev(g_T, e_T))
    sels = [torch.arange(32, 40), torch.arange(0, 33), torch.arange(0, 7)]
    if HAS_GPU:
        sels += [torch.arange(20, 27), torch.tensor([39, 0, 17])]
    for sel in sels:
        part = _run(_triton, *dev(h[sel], w, tgt[sel]), 1.0, "both", *dev(g_T[sel], e_T[sel]))
        for name, a, b in (("logp", part[0], full[0][sel]), ("entropy", part[1], full[1][sel]),
                           ("dH", part[2], full[2][sel])):
            assert torch.equal(a, b), f"{name} changed with the batch at rows {sel.tolist()[:5]}…"


@settings(max_examples=8 if HAS_GPU else 6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=SHAPE, tau=st.sampled_from([0.7, 1.0]), kind=st.sampled_from(KINDS),
       grads=st.sampled_from(["logp", "both", "entropy"]), seed=st.integers(0, 2**31 - 1))
@example(shape=(37, 65, 259), tau=0.7, kind="normal", grads="both", seed=4)   # crosses splits, blocks, chunks
def test_token_logprobs_with_bias_match_float64(poisoned, shape, tau, kind, grads, seed):
    """The lm_head bias (issue 20) through the fused kernels: logp, entropy, dH, dW and dbias against the float64
    reference, by the table's fp32 rule; dbias is a sum over T of dlogits, so its floor is dW's with |h| = 1
    (Σ_t a_tv). The bias is O(1) (|z| grows by it) and drawn on the CPU."""
    T, H, V = shape
    h, w, tgt = _problem(T, H, V, kind, seed)
    gg = torch.Generator().manual_seed(seed + 2)
    bias = torch.randn(V, generator=gg)
    g_T, e_T = torch.randn(T, generator=gg), torch.randn(T, generator=gg)
    ref = _run(R.token_logprobs, h.double(), w.double(), tgt, tau, grads, g_T, e_T, bias.double())
    t32 = _run(R.token_logprobs, h, w, tgt, tau, grads, g_T, e_T, bias)
    got = _run(_triton, h.to(DEV), w.to(DEV), tgt.to(DEV), tau, grads, g_T.to(DEV), e_T.to(DEV), bias.to(DEV))
    assert got[4].dtype == torch.float32 and got[4].shape == (V,)
    _check_fp32_outputs(got, ref, t32, grads, _grad_scales(h, w, tgt, tau, g_T, e_T, grads, bias))


def test_grad_of_hidden_only_and_no_grad(poisoned):
    """A frozen lm_head gets no dW (the dW GEMMs are skipped); under no_grad nothing is saved."""
    h, w, tgt = _problem(9, 20, 70, "normal", 8, device=DEV)
    hh = h.clone().requires_grad_(True)
    TK.token_logprobs(hh, w, tgt, backend="triton").sum().backward()
    hr = h.double().requires_grad_(True)
    R.token_logprobs(hr, w.double(), tgt).sum().backward()
    torch.testing.assert_close(hh.grad.double(), hr.grad, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        lp = TK.token_logprobs(h.requires_grad_(True), w, tgt, backend="triton")
    assert lp.grad_fn is None


# ----------------------------------------------------------------------------------------- the loss

def _loss_case(seed, H=24, V=150, L=9, lengths=(5, 0, 9, 3), kl=False, device=DEV):
    """Tokens of B rows packed [T] with their (row, position) slots; row 1 fully masked; garbage (+inf) in
    the padding of old/ref log-probs. Drawn on the CPU, every tensor moved to `device`."""
    B = len(lengths)
    T = sum(lengths)
    h, w, tgt = _problem(T, H, V, "normal", seed)
    g = torch.Generator().manual_seed(seed + 100)
    slot = torch.cat([b * L + torch.arange(n) for b, n in enumerate(lengths)])
    mask = torch.zeros(B * L, dtype=torch.bool)
    mask[slot] = True
    lp = R.token_logprobs(h.double(), w.double(), tgt)
    old = torch.full((B * L,), float("inf"), dtype=F64)
    old[slot] = lp + 0.3 * torch.randn(T, generator=g, dtype=F64)
    ref_lp = torch.full((B * L,), float("inf"), dtype=F64)
    ref_lp[slot] = lp + 0.2 * torch.randn(T, generator=g, dtype=F64)
    adv = torch.randn(B, generator=g)
    case = dict(h=h, w=w, tgt=tgt, slot=slot, mask=mask.view(B, L), old=old.float().view(B, L),
                ref=ref_lp.float().view(B, L) if kl else None, adv=adv)
    return dict({k: None if v is None else v.to(device) for k, v in case.items()}, B=B, L=L)


def _loss_run(c, backend, dtype, bias=None, **opts):
    """(loss, metrics, dH, dW[, dbias]): the fused op, or (backend=None) the reference composed by hand in
    `dtype`; with `bias` [V] the lm_head has that bias."""
    h = c["h"].to(dtype).clone().requires_grad_(True)
    w = c["w"].to(dtype).clone().requires_grad_(True)
    b = None if bias is None else bias.to(dtype).clone().requires_grad_(True)
    cast = (lambda x: None if x is None else x.to(dtype))
    args = dict(old_logp_BL=cast(c["old"]), adv_B=c["adv"].to(dtype), mask_BL=c["mask"],
                ref_logp_BL=cast(c["ref"]), **opts)
    if backend is None:
        lp = R.token_logprobs(h, w, c["tgt"], temperature=opts.get("temperature", 1.0), bias_V=b)
        lp_BL = lp.new_zeros(c["B"] * c["L"]).index_copy(0, c["slot"], lp).view(c["B"], c["L"])
        args.pop("temperature", None)
        loss, m = R.text_grpo_loss(logp_BL=lp_BL, **args)
    else:
        loss, m = TK.linear_text_grpo_loss(h, w, c["tgt"], slot_T=c["slot"], backend=backend,
                                           **({} if b is None else {"bias_V": b}), **args)
    loss.backward()
    return (loss.detach(), m, h.grad, w.grad) + (() if b is None else (b.grad,))


@pytest.mark.parametrize("aggregation,kl", [("sequence", False), ("token", True), ("constant", False)])
def test_linear_text_grpo_loss_matches_float64(poisoned, aggregation, kl):
    c = _loss_case(21, kl=kl)
    opts = dict(temperature=0.7, eps_lo=0.2, eps_hi=0.28, aggregation=aggregation, kl_coef=0.05 if kl else 0.0,
                max_len=12 if aggregation == "constant" else None)
    ref = _loss_run(c, None, F64, **opts)
    # keep clip decisions away from the kink (tested exactly below)
    lp = R.token_logprobs(c["h"].double(), c["w"].double(), c["tgt"], temperature=0.7)
    r = torch.exp(lp - c["old"].double().flatten()[c["slot"]])
    assert ((r - 1.28).abs() > 1e-4).all() and ((r - 0.8).abs() > 1e-4).all()
    t32 = _loss_run(c, None, torch.float32, **opts)
    got = _loss_run(c, "triton", torch.float32, **opts)
    assert set(got[1]) == set(ref[1]) and got[0].dtype == torch.float32
    _check("loss", got[0], ref[0], t32[0], 1e-5 * (1 + ref[0].abs()))
    for key in ref[1]:
        _check(key, got[1][key], ref[1][key], t32[1][key], 1e-5 * (1 + ref[1][key].abs()))
    _check("dH", got[2], ref[2], t32[2], 1e-5 * ref[2].abs().max())
    _check("dW", got[3], ref[3], t32[3], 1e-5 * ref[3].abs().max())
    assert got[1]["text/clip_frac"] > 0                 # the case does exercise clipping


ISSUE20_OPTIONS = {
    "grpo": dict(kl_coef=0.05),
    "kl_bias_correction": dict(kl_coef=0.05, kl_bias_correction=True, aggregation="token"),
    "gspo_kl_bias_correction": dict(ratio_level="sequence", eps_lo=3e-4, eps_hi=4e-4, kl_coef=0.05,
                                    kl_bias_correction=True),
    "dapo_kl_bias_correction": dict(aggregation="global", global_tokens=40.0, kl_coef=0.05, kl_bias_correction=True),
}


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("name", list(ISSUE20_OPTIONS))
def test_linear_text_grpo_loss_issue20_options_match_float64(poisoned, name, with_bias):
    """The bias-corrected KL (with token ratios, GSPO's sequence ratio and its tiny clip range, the dapo
    normaliser), "text/kl_token_mean" and the lm_head bias through the fused op: loss, metrics, dH, dW (and
    dbias) against the float64 reference composed by hand, by the table's loss rule. No [T, V] buffer on the
    interpreter."""
    c = _loss_case(23, kl=True)
    opts = {"temperature": 0.7, "eps_lo": 0.2, "eps_hi": 0.28, **ISSUE20_OPTIONS[name]}
    bias = torch.randn(c["w"].shape[0], generator=torch.Generator().manual_seed(5)).to(DEV) if with_bias else None
    ref = _loss_run(c, None, F64, None if bias is None else bias.double(), **opts)
    # keep clip decisions ≥ 1e-4 from the kinks (the boundary is tested exactly below)
    lp = R.token_logprobs(c["h"].double(), c["w"].double(), c["tgt"], temperature=0.7,
                          bias_V=None if bias is None else bias.double())
    lr = lp - c["old"].double().flatten()[c["slot"]]
    if opts.get("ratio_level") == "sequence":
        row = c["slot"] // c["L"]
        lr = (torch.zeros(c["B"], dtype=F64).index_add(0, row, lr) / c["mask"].sum(1).clamp(min=1))[row]
    r = lr.exp()
    assert ((r - (1 + opts["eps_hi"])).abs() > 1e-4).all() and ((r - (1 - opts["eps_lo"])).abs() > 1e-4).all()
    t32 = _loss_run(c, None, torch.float32, bias, **opts)
    poisoned.clear()
    got = _loss_run(c, "triton", torch.float32, bias, **opts)
    if not HAS_GPU:
        T, H, V = c["h"].shape[0], c["h"].shape[1], c["w"].shape[0]
        assert max(n for n in poisoned if n not in (T * H, V * H)) < T * V, "a [T, V]-sized buffer was allocated"
    assert set(got[1]) == set(ref[1]) and "text/kl_token_mean" in got[1]
    _check("loss", got[0], ref[0], t32[0], 1e-5 * (1 + ref[0].abs()))
    for key in ref[1]:
        _check(key, got[1][key], ref[1][key], t32[1][key], 1e-5 * (1 + ref[1][key].abs()))
    for i, key in enumerate(("dH", "dW", "dbias")[:len(ref) - 2]):
        _check(key, got[2 + i], ref[2 + i], t32[2 + i], 1e-5 * ref[2 + i].abs().max())


@pytest.mark.parametrize("adv_sign", [1.0, -1.0])
def test_linear_loss_on_policy_boundary_is_exact(poisoned, adv_sign):
    """old = the kernel's own log-probs (bit for bit): ρ = 1 exactly, ON the clip boundary with ε = 0; the
    unclipped branch keeps its gradient (ties pass), exactly as the reference decides on the same log-probs."""
    c = _loss_case(31)
    c["adv"] = c["adv"].abs() * adv_sign + 0.1 * adv_sign
    with torch.no_grad():
        lp = TK.token_logprobs(c["h"], c["w"], c["tgt"], backend="triton")
    old = c["h"].new_zeros(c["B"] * c["L"]).index_copy(0, c["slot"], lp).view(c["B"], c["L"])
    h = c["h"].clone().requires_grad_(True)
    loss, m, lp_BL = TK.linear_text_grpo_loss(h, c["w"], c["tgt"], slot_T=c["slot"], old_logp_BL=old,
                                              adv_B=c["adv"], mask_BL=c["mask"], eps_lo=0.0, eps_hi=0.0,
                                              return_logp=True, backend="triton")
    loss.backward()
    assert torch.equal(lp_BL, old) and m["text/ratio_mean"] == 1 and m["text/clip_frac"] == 0
    # the reference's per-token gradient on the same log-probs, pushed through the float64 log-prob backward
    leaf = old.clone().requires_grad_(True)
    R.text_grpo_loss(logp_BL=leaf, old_logp_BL=old, adv_B=c["adv"], mask_BL=c["mask"], eps_lo=0.0,
                     eps_hi=0.0)[0].backward()
    g_T = leaf.grad.flatten()[c["slot"]]
    assert (g_T != 0).all()
    h64 = c["h"].double().requires_grad_(True)
    (R.token_logprobs(h64, c["w"].double(), c["tgt"]) * g_T.double()).sum().backward()
    h32 = c["h"].clone().requires_grad_(True)
    (R.token_logprobs(h32, c["w"], c["tgt"]) * g_T).sum().backward()
    _check("dH", h.grad, h64.grad, h32.grad, 1e-5 * h64.grad.abs().max())


def test_text_grpo_loss_backends_agree():
    """The triton backend of text_grpo_loss is the reference math: bitwise equal, same metric keys."""
    g = torch.Generator().manual_seed(3)
    lp = torch.randn(4, 6, generator=g) - 2
    old = lp + 0.3 * torch.randn(4, 6, generator=g)
    old[0] = lp[0]                                    # ρ = 1 exactly: on the boundary with ε = 0
    mask = torch.rand(4, 6, generator=g) > 0.3
    mask[2] = False
    adv = torch.randn(4, generator=g)
    lp, old, mask, adv = (x.to(DEV) for x in (lp, old, mask, adv))
    kw = dict(old_logp_BL=old, adv_B=adv, mask_BL=mask, eps_lo=0.0, eps_hi=0.0, ref_logp_BL=old, kl_coef=0.1)
    outs = []
    for be in ("torch", "triton"):
        x = lp.clone().requires_grad_(True)
        loss, m = TK.text_grpo_loss(logp_BL=x, backend=be, **kw)
        loss.backward()
        outs.append((loss, m, x.grad))
    assert set(outs[0][1]) == set(outs[1][1]) == set(R.text_grpo_loss(logp_BL=lp, **kw)[1])
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][2], outs[1][2])


# ---------------------------------------------------------------------------------- dispatch and compile

def test_dispatch_and_validation():
    h, w, tgt = _problem(5, 8, 20, "normal", 4)
    assert torch.equal(TK.token_logprobs(h, w, tgt, backend="torch"), R.token_logprobs(h, w, tgt))
    if not HAS_GPU:   # auto never picks the interpreter
        assert torch.equal(TK.token_logprobs(h, w, tgt), R.token_logprobs(h, w, tgt))
    h, w, tgt = (x.to(DEV) for x in (h, w, tgt))   # the triton backend runs on DEV only
    with pytest.raises(ValueError, match="float64"):
        TK.token_logprobs(h.double(), w.double(), tgt, backend="triton")
    with pytest.raises(ValueError, match="weight_VH"):
        TK.token_logprobs(h, w[:, :3], tgt, backend="triton")
    with pytest.raises(ValueError, match="temperature"):
        TK.token_logprobs(h, w, tgt, temperature=0.0, backend="triton")
    with pytest.raises(ValueError, match="slot_T"):
        TK.linear_text_grpo_loss(h, w, tgt, slot_T=None, old_logp_BL=torch.zeros(2, 3), adv_B=1.0,
                                 mask_BL=torch.ones(2, 3), backend="triton")
    empty = TK.token_logprobs(h[:0], w, tgt[:0], return_entropy=True, backend="triton")
    assert empty[0].shape == empty[1].shape == (0,)


def test_custom_op_opcheck_and_torch_compile():
    """The custom ops pass torch.library.opcheck (schema, fake tensors, autograd registration, AOT dispatch),
    and a function calling the op compiles with inductor and fullgraph=True (~10 s of C++ build on 2 cores)
    and matches eager, gradients included. The backend is resolved once before compiling, as the trainer
    does: resolve_backend's first-call logger.info is not traceable by dynamo."""
    h, w, tgt = _problem(7, 33, 131, "normal", 9, device=DEV)
    hr, wr = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.unigrpo_kernels.token_logprobs_fwd.default, (hr, wr, tgt, 0.7, True))
    _, ent, lse = torch.ops.unigrpo_kernels.token_logprobs_fwd(h, w, tgt, 0.7, True)
    g = torch.randn(7, generator=torch.Generator().manual_seed(0)).to(DEV)
    torch.library.opcheck(torch.ops.unigrpo_kernels.token_logprobs_bwd.default,
                          (g, g, h, w, tgt, lse, ent, 0.7, True, True))
    resolve_backend("triton", h.device, op="token_logprobs")

    def f(h, w):
        lp, e = TK.token_logprobs(h, w, tgt, temperature=0.7, return_entropy=True, backend="triton")
        return (lp * g).sum() + e.sum()

    outs = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        a, b = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = fn(a, b)
        y.backward()
        outs.append((y.detach(), a.grad, b.grad))
    for x, y in zip(*outs):   # inductor may reorder the final sums: a few fp32 ulps
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------- GPU only

@pytest.mark.skipif(not HAS_GPU, reason="large shapes and the compiled (non-interpreted) kernels need a GPU")
@pytest.mark.parametrize("T,H,V", [(1000, 1024, 32003), (4097, 512, 50257)])
def test_gpu_large_bf16(T, H, V):
    _check_bf16(T, H, V, "normal", 13, "cuda")


@pytest.mark.skipif(not HAS_GPU, reason="peak-memory accounting needs a GPU")
def test_gpu_memory_never_holds_logits():
    """Forward + backward at T=4096, H=1024, V=65536 in bf16: beyond the inputs and the gradients themselves,
    the peak extra memory stays under a quarter of one [T, V] fp32 logits buffer."""
    T, H, V = 4096, 1024, 65536
    h, w, tgt = _problem(T, H, V, "normal", 15, torch.bfloat16, "cuda")
    h.requires_grad_(True)
    w.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    lp, ent = TK.token_logprobs(h, w, tgt, return_entropy=True, backend="triton")
    (lp.sum() + ent.sum()).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - (T * H + V * H) * 2
    assert extra < T * V * 4 / 4, f"peak extra memory {extra / 2**20:.1f} MiB"


@pytest.mark.parametrize("opts", [dict(ratio_level="sequence", eps_lo=3e-4, eps_hi=4e-4),
                                  dict(ratio_level="sequence", eps_lo=0.2, eps_hi=0.28, aggregation="token"),
                                  dict(aggregation="global", global_tokens=40.0, eps_lo=0.2, eps_hi=0.28)],
                         ids=["gspo", "gspo-token", "dapo"])
def test_linear_text_grpo_loss_gspo_and_global_match_float64(poisoned, opts):
    """Issue 20's options through the fused Triton log-probs (interpreter on CPU), same tolerance rule as
    above; clip decisions (token or sequence ratios) kept 1e-4 from the bounds."""
    c = _loss_case(21)
    opts = dict(temperature=0.7, **opts)
    lp = R.token_logprobs(c["h"].double(), c["w"].double(), c["tgt"], temperature=0.7)
    lr = torch.zeros(c["B"] * c["L"], dtype=F64).index_copy(0, c["slot"], lp - c["old"].double().flatten()[c["slot"]])
    lr = lr.view(c["B"], c["L"])
    if opts.get("ratio_level") == "sequence":
        r = torch.exp(lr.sum(1) / c["mask"].sum(1).clamp(min=1))
    else:
        r = torch.exp(lr[c["mask"]])
    assert ((r - (1 + opts["eps_hi"])).abs() > 1e-4).all() and ((r - (1 - opts["eps_lo"])).abs() > 1e-4).all()
    ref = _loss_run(c, None, F64, **opts)
    t32 = _loss_run(c, None, torch.float32, **opts)
    got = _loss_run(c, "triton", torch.float32, **opts)
    _check("loss", got[0], ref[0], t32[0], 1e-5 * (1 + ref[0].abs()))
    for key in ref[1]:
        _check(key, got[1][key], ref[1][key], t32[1][key], 1e-5 * (1 + ref[1][key].abs()))
    _check("dH", got[2], ref[2], t32[2], 1e-5 * ref[2].abs().max())
    _check("dW", got[3], ref[3], t32[3], 1e-5 * ref[3].abs().max())
