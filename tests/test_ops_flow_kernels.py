"""The fused flow backends (triton, cuda) against the float64 reference (ALGORITHM.md §3, §7, §8).

On a machine without a GPU the Triton kernels run in the interpreter (conftest.py sets TRITON_INTERPRET=1)
at small shapes; the cuda backend and the large shapes run only where a GPU is (skipped with a reason
elsewhere). Every kernel output is allocated poisoned (NaN) so an element a kernel forgets to write fails.

Shape legend: B rows (samples × window steps), D latent elements per row, N denoising steps.

Tolerance rule, one for every output: a fused backend's error against the float64 reference may be at most
    2 × (the error of the torch backend doing the same in float32 / the same input dtype) + floor
with floor = 1e-5·(1 + |ref|) for per-row and scalar outputs, and for elementwise outputs 2 ulp of the
output dtype plus 1e-6 of the largest element (terms of dL/dv can cancel). Why: both compute in fp32; they differ only in summation order (blocked partials vs torch's
pairwise sums over D ≤ 2,500, ≲ 1e-6 relative) and FMA contraction, so "no worse than PyTorch, within a
few ulp" is the claim that can be made and checked. bf16/fp16 inputs are compared against the float64
reference on the SAME quantised inputs, so only kernel arithmetic is measured, not input rounding.
Clip decisions are discontinuous: random cases keep every ratio ≥ 1e-4 away from 1 ± ε, and the boundary
itself is tested exactly (v = v_old gives r̂ = 1 bit-exactly in every backend).
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from unigrpo_kernels import flow as FK
from unigrpo_kernels.dispatch import available_backends
from unigrpo_kernels.reference import flow as F

HAS_GPU = torch.cuda.is_available()
DEV = "cuda" if HAS_GPU else "cpu"
F64 = torch.float64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _backends():
    out = []
    for name in ("triton", "cuda"):
        if name in available_backends(DEV, op="flow_grpo_loss"):
            out.append(name)
        else:
            reason = ("the cuda backend needs a GPU and the built library" if name == "cuda"
                      else "triton is not installed (or TRITON_INTERPRET is not set on CPU)")
            out.append(pytest.param(name, marks=pytest.mark.skip(reason=reason)))
    return out


BACKENDS = _backends()
MAX_D = 4000 if HAS_GPU else 1200
# the poisoning fixture patches allocation once per test; that is meant to hold for every example
SETTINGS = settings(max_examples=25 if HAS_GPU else 12, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def poisoned(monkeypatch):
    """Every floating tensor allocated with torch.empty / empty_like during the test starts as NaN."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kw):
        t = real_empty(*args, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def empty_like(*args, **kw):
        t = real_empty_like(*args, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)


def _check(name, got, ref64, torch32, floor_rel=1e-5, elementwise_dtype=None):
    """|got − ref64| ≤ 2·|torch32 − ref64| + floor, elementwise; NaNs must match."""
    got, ref64, torch32 = got.double().cpu(), ref64.double().cpu(), torch32.double().cpu()
    assert torch.equal(torch.isnan(got), torch.isnan(ref64)), f"{name}: NaN pattern differs from the reference"
    ok = ~torch.isnan(ref64)
    g, r, t = got[ok], ref64[ok], torch32[ok]
    if elementwise_dtype is not None:
        # 2 ulp of the output dtype, plus 1e-6 of the largest element for cancellation between terms
        floor = 2 * torch.finfo(elementwise_dtype).eps * r.abs() + 1e-6 * (r.abs().max() if r.numel() else 0)
    else:
        floor = floor_rel * (1 + r.abs())
    err, allowed = (g - r).abs(), 2 * (t - r).abs() + floor
    bad = err > allowed
    if bad.any():
        i = int(torch.nonzero(bad.flatten())[0])
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.numel()} elements out of tolerance; first at flat "
                             f"index {i}: got {g.flatten()[i].item():.9g}, ref {r.flatten()[i].item():.9g}, "
                             f"allowed error {allowed.flatten()[i].item():.3g}")


# ------------------------------------------------------------------------------------------- sde_step

@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(B=st.integers(1, 5), D=st.integers(1, MAX_D), vdt=st.sampled_from(list(DTYPES)),
       N=st.integers(1, 12), data=st.data(), eta=st.sampled_from([0.0, 0.3, 0.8, 1.0]),
       kind=st.sampled_from(["sde", "cps"]), want_mean=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_sde_step_matches_reference(poisoned, backend, B, D, vdt, N, data, eta, kind, want_mean, seed):
    k_B = torch.tensor(data.draw(st.lists(st.integers(0, N - 1), min_size=B, max_size=B)))
    if data.draw(st.booleans()):
        k_B[0] = 0                                     # the first step, σ = 1 (the σ̃ rule of §3)
    co = F.step_coeffs_batch(F.sigma_schedule(N), k_B, eta, kind)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g) * 2
    v = (torch.randn(B, D, generator=g) * 2).to(DTYPES[vdt])
    xi = torch.randn(B, D, generator=g)
    a, b, s = co["a"].float(), co["b"].float(), co["std"].float()
    out = FK.sde_step(x.to(DEV), v.to(DEV), a_B=a.to(DEV), b_B=b.to(DEV), std_B=s.to(DEV), noise_BD=xi.to(DEV),
                      return_mean=want_mean, backend=backend)
    ref = F.sde_step(x.double(), v.double(), a_B=a.double(), b_B=b.double(), std_B=s.double(), noise_BD=xi.double(),
                     return_mean=True)
    t32 = F.sde_step(x, v, a_B=a, b_B=b, std_B=s, noise_BD=xi, return_mean=True)
    assert len(out) == (3 if want_mean else 2)
    assert out[0].dtype == torch.float32 and out[0].shape == (B, D) and out[1].shape == (B,)
    _check("x_next", out[0], ref[0], t32[0], elementwise_dtype=torch.float32)
    _check("logp", out[1], ref[1], t32[1])
    if want_mean:
        _check("mean", out[2], ref[2], t32[2], elementwise_dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sde_step_nd_inputs_and_scalars(poisoned, backend):
    """[B, C, h, w] latents and Python-number coefficients go through like the reference."""
    g = torch.Generator().manual_seed(1)
    x, v, xi = (torch.randn(3, 4, 5, 7, generator=g) for _ in range(3))
    out = FK.sde_step(x.to(DEV), v.to(DEV), a_B=0.9, b_B=-0.1, std_B=0.2, noise_BD=xi.to(DEV), backend=backend)
    ref = F.sde_step(x.double(), v.double(), a_B=0.9, b_B=-0.1, std_B=0.2, noise_BD=xi.double())
    t32 = F.sde_step(x, v, a_B=0.9, b_B=-0.1, std_B=0.2, noise_BD=xi)
    assert out[0].shape == x.shape
    _check("x_next", out[0], ref[0], t32[0], elementwise_dtype=torch.float32)
    _check("logp", out[1], ref[1], t32[1])


# -------------------------------------------------------------------------------------- flow loss

def _loss_inputs(B, D, vdt, seed, drift, adv_sign):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(B, D, generator=g).to(DTYPES[vdt])
    v_old = (v.double() + drift * torch.randn(B, D, generator=g, dtype=F64)).to(DTYPES[vdt])
    v_ref = (v.double() + 0.3 * torch.randn(B, D, generator=g, dtype=F64)).to(DTYPES[vdt])
    xi = torch.randn(B, D, generator=g)
    adv = torch.randn(B, generator=g).abs() + 0.1
    if adv_sign == "neg":
        adv = -adv
    elif adv_sign == "mixed":
        adv = adv * torch.where(torch.rand(B, generator=g) < 0.5, -1.0, 1.0)
    b = -(torch.rand(B, generator=g) * 0.3 + 0.01)           # b < 0 in a real schedule (§3)
    s = torch.rand(B, generator=g) * 0.3 + 0.05
    h = torch.rand(B, generator=g) * 0.2 + 0.01
    return dict(v=v, v_old=v_old, v_ref=v_ref, xi=xi, adv=adv, b=b, s=s, h=h)


def _run_loss(t, backend, device, dtype, **opts):
    """(loss, metrics, dL/dv) with every tensor cast to `dtype` (None keeps the input dtypes)."""
    cast = (lambda x: x.to(device=device, dtype=dtype)) if dtype is not None else (lambda x: x.to(device))
    v = cast(t["v"]).clone().requires_grad_(True)
    fn = F.flow_grpo_loss if backend == "reference" else lambda **kw: FK.flow_grpo_loss(**kw, backend=backend)
    rows_dt = dtype or torch.float32
    loss, m = fn(v_BD=v, xi_BD=cast(t["xi"]), v_old_BD=cast(t["v_old"]), v_ref_BD=cast(t["v_ref"]),
                 adv_B=t["adv"].to(device, rows_dt), b_B=t["b"].to(device, rows_dt), std_B=t["s"].to(device, rows_dt),
                 h_B=t["h"].to(device, rows_dt), **opts)
    loss.backward()
    return loss.detach(), m, v.grad


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(B=st.integers(1, 6), D=st.integers(1, MAX_D), vdt=st.sampled_from(list(DTYPES)), seed=st.integers(0, 2**31 - 1),
       drift=st.sampled_from([1e-3, 3e-2, 0.3]), adv_sign=st.sampled_from(["pos", "neg", "mixed"]),
       clip_eps=st.sampled_from([1e-6, 1e-3, 0.05, 0.3]), beta=st.sampled_from([0.0, 1.5e-5, 0.5]),
       reg=st.sampled_from(["mse", "latent_kl", "none"]), ratio_norm=st.booleans(), grad_reweight=st.booleans(),
       flow_weight=st.sampled_from([1.0, 0.0, 0.37, 2.5]))
def test_flow_loss_matches_reference(poisoned, backend, B, D, vdt, seed, drift, adv_sign, clip_eps, beta, reg,
                                     ratio_norm, grad_reweight, flow_weight):
    t = _loss_inputs(B, D, vdt, seed, drift, adv_sign)
    opts = dict(clip_eps=clip_eps, beta=beta, reg=reg, ratio_norm=ratio_norm, grad_reweight=grad_reweight,
                flow_weight=flow_weight)
    ref_loss, ref_m, ref_g = _run_loss(t, "reference", "cpu", F64, **opts)
    # keep clip decisions away from the kink (tested exactly below): every ratio ≥ 1e-4 from 1 ± ε
    lr = F.flow_log_ratio(v_BD=t["v"].double(), xi_BD=t["xi"].double(), v_old_BD=t["v_old"].double(),
                          b_B=t["b"].double(), std_B=t["s"].double(), ratio_norm=ratio_norm)
    r = torch.exp(lr)
    assume(bool(((r - (1 + clip_eps)).abs() > 1e-4).all() and ((r - (1 - clip_eps)).abs() > 1e-4).all()))
    t32_loss, t32_m, t32_g = _run_loss(t, "reference", "cpu", None, **opts)
    loss, m, grad = _run_loss(t, backend, DEV, None, **opts)
    assert loss.dtype == torch.float32 and grad.dtype == DTYPES[vdt] and set(m) == set(ref_m)
    _check("loss", loss, ref_loss, t32_loss)
    for key in ref_m:
        _check(key, m[key], ref_m[key], t32_m[key])
    _check("dL/dv", grad, ref_g, t32_g, elementwise_dtype=DTYPES[vdt])
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=10 if HAS_GPU else 6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 6), D=st.integers(1, 300), seed=st.integers(0, 2**31 - 1),
       drift=st.sampled_from([3e-2, 0.3]), adv_sign=st.sampled_from(["pos", "neg", "mixed"]),
       clip_lo=st.sampled_from([None, 0.0, 1e-3, 0.2]), clip_hi=st.sampled_from([None, 1e-4, 0.28]),
       reg=st.sampled_from(["latent_kl", "mse"]), latent_kl_norm=st.sampled_from(["project", "flow_grpo"]),
       ratio_norm=st.booleans())
def test_flow_loss_asymmetric_clip_and_kl_norm_match_reference(poisoned, backend, B, D, seed, drift, adv_sign, clip_lo,
                                                              clip_hi, reg, latent_kl_norm, ratio_norm):
    """Issue 20's options through the fused finalize (lo = 1 − ε_lo, hi = 1 + ε_hi; reg code 3 = latent_kl
    with the flow_grpo norm), fp32 streams, the same tolerance rule as above."""
    t = _loss_inputs(B, D, "fp32", seed, drift, adv_sign)
    opts = dict(clip_eps=0.05, clip_eps_lo=clip_lo, clip_eps_hi=clip_hi, beta=0.5, reg=reg,
                latent_kl_norm=latent_kl_norm, ratio_norm=ratio_norm)
    lo, hi = F.flow_clip_eps(0.05, clip_lo, clip_hi)
    lr = F.flow_log_ratio(v_BD=t["v"].double(), xi_BD=t["xi"].double(), v_old_BD=t["v_old"].double(),
                          b_B=t["b"].double(), std_B=t["s"].double(), ratio_norm=ratio_norm)
    r = torch.exp(lr)
    assume(bool(((r - (1 + hi)).abs() > 1e-4).all() and ((r - (1 - lo)).abs() > 1e-4).all()))
    ref_loss, ref_m, ref_g = _run_loss(t, "reference", "cpu", F64, **opts)
    t32_loss, t32_m, t32_g = _run_loss(t, "reference", "cpu", None, **opts)
    loss, m, grad = _run_loss(t, backend, DEV, None, **opts)
    _check("loss", loss, ref_loss, t32_loss)
    for key in ref_m:
        _check(key, m[key], ref_m[key], t32_m[key])
    _check("dL/dv", grad, ref_g, t32_g, elementwise_dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip_eps", [0.0, 1e-6])
@pytest.mark.parametrize("adv_sign", ["pos", "neg"])
@pytest.mark.parametrize("ratio_norm", [True, False])
def test_flow_loss_on_policy_boundary_is_exact(poisoned, backend, clip_eps, adv_sign, ratio_norm):
    """θ = old (v_old = v bit for bit): r̂ = 1 exactly, on the clip boundary when ε = 0; every backend then
    takes the same branch and gives the reference's gradient."""
    t = _loss_inputs(4, 333, "fp32", 7, 0.1, adv_sign)
    t["v_old"] = t["v"].clone()
    opts = dict(clip_eps=clip_eps, beta=1.5e-5, reg="mse", ratio_norm=ratio_norm, grad_reweight=False)
    ref_loss, ref_m, ref_g = _run_loss(t, "reference", "cpu", F64, **opts)
    loss, m, grad = _run_loss(t, backend, DEV, None, **opts)
    t32 = _run_loss(t, "reference", "cpu", None, **opts)
    assert m["flow/ratio_mean"].item() == 1.0 and m["flow/clip_frac"].item() == 0.0
    _check("loss", loss, ref_loss, t32[0])
    _check("dL/dv", grad, ref_g, t32[2], elementwise_dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flow_loss_backward_skips_v_ref_without_regulariser(poisoned, backend):
    """reg="none": the backward must not read v_ref (NaN there leaves the gradient finite)."""
    t = _loss_inputs(3, 129, "fp32", 3, 0.01, "mixed")
    t["v_ref"] = torch.full_like(t["v_ref"], float("nan"))
    loss, m, grad = _run_loss(t, backend, DEV, None, clip_eps=0.2, beta=0.5, reg="none", ratio_norm=True,
                              grad_reweight=False)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert math.isnan(m["flow/velocity_mse"].item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_stream_dtypes_and_float64_refusal(backend):
    t = _loss_inputs(2, 50, "bf16", 5, 0.05, "pos")
    t["v_old"] = t["v_old"].float()                       # differing dtypes are read as fp32
    loss, _, grad = _run_loss(t, backend, DEV, None, clip_eps=0.2, beta=0.1, reg="mse", ratio_norm=True,
                              grad_reweight=False)
    assert grad.dtype == torch.bfloat16 and torch.isfinite(loss)
    with pytest.raises(ValueError, match=f"backend '{backend}' computes in float32 but v_BD is float64"):
        _run_loss(t, backend, DEV, F64, clip_eps=0.2, beta=0.1, reg="mse", ratio_norm=True, grad_reweight=False)
    with pytest.raises(ValueError, match=r"xi_BD must have the shape of v_BD"):
        FK.flow_grpo_loss(v_BD=torch.zeros(2, 5, device=DEV), xi_BD=torch.zeros(2, 4, device=DEV),
                          v_old_BD=torch.zeros(2, 5, device=DEV), v_ref_BD=torch.zeros(2, 5, device=DEV),
                          adv_B=1.0, b_B=1.0, std_B=1.0, h_B=1.0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    t = _loss_inputs(3, 777, "bf16", 11, 0.05, "mixed")
    opts = dict(clip_eps=0.3, beta=0.1, reg="mse", ratio_norm=False, grad_reweight=True)
    a, b = _run_loss(t, backend, DEV, None, **opts), _run_loss(t, backend, DEV, None, **opts)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])


# ----------------------------------------------------------------------------- torch.library / compile

@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ops_pass_opcheck(backend):
    g = torch.Generator().manual_seed(0)
    v, xi, vo, vr = (torch.randn(3, 40, generator=g).to(DEV) for _ in range(4))
    torch.library.opcheck(torch.ops.unigrpo_kernels.flow_sums.default,
                          (v.requires_grad_(), xi, vo, vr, True, True, backend))
    torch.library.opcheck(torch.ops.unigrpo_kernels.flow_sums_bwd.default,
                          (torch.randn(3, 3).to(DEV), v.detach(), xi, vo, vr, True, False, backend))
    coef = torch.rand(3).to(DEV)
    torch.library.opcheck(torch.ops.unigrpo_kernels.sde_step_fwd.default,
                          (v.detach(), vo, xi, coef, coef, coef, True, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_traces_under_torch_compile(backend):
    """fullgraph tracing through the custom ops (aot_eager: no C++ toolchain needed on CPU)."""
    t = _loss_inputs(2, 64, "fp32", 2, 0.05, "pos")

    def step(v):
        loss, _ = FK.flow_grpo_loss(v_BD=v, xi_BD=t["xi"].to(DEV), v_old_BD=t["v_old"].to(DEV),
                                    v_ref_BD=t["v_ref"].to(DEV), adv_B=t["adv"].to(DEV), b_B=t["b"].to(DEV),
                                    std_B=t["s"].to(DEV), h_B=t["h"].to(DEV), clip_eps=0.2, beta=0.1,
                                    backend=backend)
        return loss

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    v1 = t["v"].to(DEV).clone().requires_grad_(True)
    v2 = t["v"].to(DEV).clone().requires_grad_(True)
    l1, l2 = step(v1), compiled(v2)
    l1.backward()
    l2.backward()
    assert torch.equal(l1.detach(), l2.detach()) and torch.equal(v1.grad, v2.grad)


# ------------------------------------------------------------------------------------------- GPU only

@pytest.mark.skipif(not HAS_GPU, reason="the paper's shape needs a GPU (the interpreter would take hours)")
@pytest.mark.parametrize("backend", BACKENDS)
def test_paper_shape_on_gpu(backend):
    t = _loss_inputs(72, 262_144, "bf16", 0, 0.01, "mixed")
    opts = dict(clip_eps=1e-6, beta=1.5e-5, reg="mse", ratio_norm=True, grad_reweight=False)
    ref = _run_loss(t, "reference", "cpu", F64, **opts)
    t32 = _run_loss(t, "reference", DEV, None, **opts)
    got = _run_loss(t, backend, DEV, None, **opts)
    _check("loss", got[0], ref[0], t32[0])
    _check("dL/dv", got[2], ref[2], t32[2], elementwise_dtype=torch.bfloat16)


# --------------------------------------------------------------------------- GPU compilation, on any machine

_AOT_SCRIPT = r'''
import collections, json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from unigrpo_kernels.triton import flow as K
arch = int(sys.argv[1])
P, V = "*fp32", "*bf16"
cases = {
    "sde_step_fwd": (K._sde_step_fwd_kernel, dict(x_ptr=P, v_ptr=V, xi_ptr=P, a_ptr=P, b_ptr=P, s_ptr=P, xn_ptr=P,
                     mean_ptr=P, part_ptr=P, D="i32", chunks="i32"), dict(WANT_MEAN=True, BLOCK=2048, ITERS=4), 8),
    "flow_sums_fwd": (K._flow_sums_fwd_kernel, dict(v_ptr=V, xi_ptr=P, vo_ptr=V, vr_ptr=V, part_ptr=P, D="i32",
                      chunks="i32"), dict(BLOCK=2048, ITERS=4), 8),
    "flow_sums_bwd": (K._flow_sums_bwd_kernel, dict(g_ptr=P, v_ptr=V, xi_ptr=P, vo_ptr=V, vr_ptr=V, dv_ptr=V, D="i32"),
                      dict(USE_OLD=True, USE_REF=True, BLOCK=2048, ITERS=4), 8),
    "flow_loss_finalize": (K._flow_loss_finalize_kernel, dict(part_ptr=P, chunks="i32", adv_ptr=P, b_ptr=P, s_ptr=P,
                           h_ptr=P, loss_ptr=P, metrics_ptr=P, coef_ptr=P, B="i32", D="fp32", lo="fp32", hi="fp32",
                           beta="fp32", fw="fp32"), dict(RATIO_NORM=False, REWEIGHT=True, REG=1, BLOCK_B=128, BLOCK_C=64,
                           ROW_BLOCKS=2, CHUNK_BLOCKS=2), 4),
}
out = {}
for name, (fn, sig, consts, warps) in cases.items():
    sig = {**sig, **{c: "constexpr" for c in consts}}
    # the JIT specialises 16-divisible pointers and sizes the same way at launch (the paper's D = 262,144)
    attrs = {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(sig.items()) if t.startswith("*") or n == "D"}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    out[name] = dict(collections.Counter(re.findall(r"ld\.global[.\w]*", k.asm["ptx"])))
print(json.dumps(out))
'''


@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile_for_gpu_with_vector_loads(arch):
    """Compile every flow kernel to PTX for sm_80 / sm_90 (no GPU needed) and check the streams are read with
    128-bit loads: GPU-only compile errors and a lost vectorisation both fail here, in CI."""
    import json
    import os
    import subprocess
    import sys
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, str(arch)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    loads = json.loads(res.stdout.strip().splitlines()[-1])
    for name in ("sde_step_fwd", "flow_sums_fwd", "flow_sums_bwd"):
        # 128-bit stream loads; the only scalar loads left are the per-row coefficients (b32)
        assert "ld.global.v4.b32" in loads[name] and set(loads[name]) <= {"ld.global.v4.b32", "ld.global.b32"}, \
            f"{name}: stream loads are not 128-bit on sm_{arch}: {loads[name]}"


@pytest.mark.skipif("triton" not in available_backends(DEV, op="flow_grpo_loss"), reason="needs triton")
def test_sums_only_backend_uses_the_triton_finalize(monkeypatch):
    """The cuda backend provides only [B, 3] row sums and the backward; its loss goes through the Triton
    finalize kernel as [B, 1, 3] partials. Stand-in: a backend whose sums and backward are the torch reference."""
    import types
    fake = types.SimpleNamespace(
        flow_sums_fwd=lambda v, xi, vo, vr: F.flow_row_sums(v.float(), xi, vo.float(), vr.float()).contiguous(),
        flow_sums_bwd=lambda g, v, xi, vo, vr, use_old, use_ref: (
            g[:, :1] * xi + 2 * g[:, 1:2] * (v - vo) * use_old + 2 * g[:, 2:] * (v - vr) * use_ref).to(v.dtype))
    real_impl = FK._impl
    monkeypatch.setattr(FK, "_impl", lambda be: fake if be == "fake" else real_impl(be))
    t = _loss_inputs(4, 257, "fp32", 9, 0.05, "mixed")
    opts = dict(clip_eps=0.2, beta=0.3, reg="latent_kl", ratio_norm=False, grad_reweight=True)
    v = t["v"].to(DEV).clone().requires_grad_(True)
    loss, metrics, _ = FK._flow_loss_op(v, t["xi"].to(DEV), t["v_old"].to(DEV), t["v_ref"].to(DEV),
                                        t["adv"].to(DEV), t["b"].to(DEV), t["s"].to(DEV), t["h"].to(DEV), 0.8, 1.2,
                                        0.3, F.REGS.index("latent_kl"), False, True, 1.0, "fake")
    loss.backward()
    ref_loss, ref_m, ref_g = _run_loss(t, "reference", "cpu", F64, **opts)
    t32 = _run_loss(t, "reference", "cpu", None, **opts)
    _check("loss", loss.detach(), ref_loss, t32[0])
    _check("flow/ratio_mean", metrics[F.FLOW_METRICS.index("flow/ratio_mean")], ref_m["flow/ratio_mean"],
           t32[1]["flow/ratio_mean"])
    _check("dL/dv", v.grad, ref_g, t32[2], elementwise_dtype=torch.float32)
