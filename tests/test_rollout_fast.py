"""The fast rollout path (unigrpo/rollout/graphs.py) against the eager loops it replaced.

- CPU: the static-shape, sync-free loops (device tables + ode_loop / sde_loop, reached through `denoise` and
  `rollout`) equal the former eager loops bit-for-bit on the tiny preset: ODE with and without CFG, and the
  SDE-window rollout ("sde", "cps", and with CFG). The former loops are kept below, verbatim but for names,
  as the reference (`_eager_denoise`, `_eager_rollout`).
- CPU: the pure-image route of the model (UnifiedModel._image_layers: no torch.nonzero) equals the general
  route (`_layers`), for image_velocity and append_image, in float64 and float32.
- GPU only: the CUDA-graph path equals the eager path bit-for-bit (denoise with and without CFG, the
  rollout), and a captured loop runs with no host sync (torch.cuda.set_sync_debug_mode("error")).

Tolerances: none. Every comparison is torch.equal — the paths run the same kernels on the same shapes and
values, so any difference at all is a bug (a changed op order, a different σ rounding, a reordered RNG).
"""
import numpy as np
import pytest
import torch

from unigrpo.model import UnifiedModel, preset
from unigrpo.model.tokenizer import ByteTokenizer
from unigrpo.rollout.generate import denoise, generate_reasoning, unconditional_cache
from unigrpo.rollout.graphs import (DenoiseGraph, make_velocity, ode_loop, ode_tables, sde_loop, sde_tables,
                                    velocity_fn)
from unigrpo.rollout.rollout import RolloutConfig, rollout
from unigrpo_kernels import sde_step, sigma_schedule, step_coeffs, step_coeffs_batch

PROMPTS = ["a red circle", "two blue squares"]
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def tiny_model(device="cpu", dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    m = UnifiedModel(preset("tiny", **kw)).to(device=device, dtype=dtype).eval()
    torch.nn.init.normal_(m.image_out.weight, std=0.05)  # zero-init would make every velocity 0
    return m


def text_cache(model, rows=3, n=7, seed=1, room=0):
    """A cache holding n random text tokens per row (row 0 left-padded by 2), with `room` free columns."""
    g = torch.Generator().manual_seed(seed)
    dev = model.embed.weight.device
    cache = model.new_cache(rows, n + room)
    ids = torch.randint(0, 256, (rows, n), generator=g).to(dev)
    valid = torch.ones(rows, n, dtype=torch.bool, device=dev)
    valid[0, :2] = False  # a left-padded row
    model.append_text(cache, ids, valid)
    return cache


# ------------------------------------------------------------------ the former eager loops (the reference)

@torch.no_grad()
def _eager_denoise(model, cache, *, num_steps, shift=3.0, cfg_scale=1.0, uncond_cache=None, noise_BChw):
    B = cache.valid.shape[0]
    dev, dtype = model.embed.weight.device, model.embed.weight.dtype
    x = noise_BChw.float()
    sigmas = sigma_schedule(num_steps, shift).tolist()
    for k in range(num_steps):
        s = torch.full((B,), sigmas[k], device=dev, dtype=torch.float32)
        v = model.image_velocity(cache, x.to(dtype), s).float()
        if cfg_scale != 1.0:
            vu = model.image_velocity(uncond_cache, x.to(dtype), s).float()
            v = vu + cfg_scale * (v - vu)
        x = x - (sigmas[k] - sigmas[k + 1]) * v
    return x


@torch.no_grad()
def _eager_rollout(model, tokenizer, prompt_texts, cfg, *, generator, windows, backend="torch"):
    G, W, N = cfg.group_size, cfg.window_size, cfg.steps
    texts = [p for p in prompt_texts for _ in range(G)]
    R = len(texts)
    reasoning = generate_reasoning(model, tokenizer, texts, temperature=cfg.temperature,
                                   max_new_tokens=cfg.max_new_tokens or None, generator=generator)
    cache = reasoning.cache
    uncond = unconditional_cache(model, tokenizer, R) if cfg.cfg_scale != 1.0 else None
    mcfg = model.cfg
    dev, dtype = model.embed.weight.device, model.embed.weight.dtype
    k0 = torch.as_tensor(np.asarray(windows), dtype=torch.long).repeat_interleave(G).to(dev)
    shape = (R, mcfg.latent_channels, mcfg.latent_size, mcfg.latent_size)
    sigmas = sigma_schedule(N, cfg.shift).to(dev)
    x = torch.randn(shape, generator=generator, device=dev)
    store = {name: torch.zeros((R, W) + shape[1:], device=dev) for name in ("x", "x_next", "noise")}
    logp_RW = torch.zeros(R, W, device=dev)
    rows = torch.arange(R, device=dev)
    for k in range(N):
        sig = torch.full((R,), float(sigmas[k]), device=dev)
        v = model.image_velocity(cache, x.to(dtype), sig).float()
        if uncond is not None:
            vu = model.image_velocity(uncond, x.to(dtype), sig).float()
            v = vu + cfg.cfg_scale * (v - vu)
        in_window = (k >= k0) & (k < k0 + W)
        eta_R = torch.where(in_window, torch.tensor(cfg.eta, dtype=torch.float64, device=dev),
                            torch.tensor(0.0, dtype=torch.float64, device=dev))
        co = step_coeffs_batch(sigmas, torch.full((R,), k, device=dev), eta_R, cfg.sde_kind)
        noise = torch.randn(shape, generator=generator, device=dev)
        x_next, logp = sde_step(x, v, a_B=co["a"].float(), b_B=co["b"].float(), std_B=co["std"].float(),
                                noise_BD=noise, backend=backend)
        x_next = x_next.view(shape)
        if bool(in_window.any()):
            r = rows[in_window]
            j = (k - k0)[in_window]
            store["x"][r, j] = x[r]
            store["x_next"][r, j] = x_next[r]
            store["noise"][r, j] = noise[r]
            logp_RW[r, j] = logp[r].float()
        x = x_next
    return dict(k0=k0, x_RW=store["x"], x_next_RW=store["x_next"], noise_RW=store["noise"], logp_RW=logp_RW,
                latents=x, tokens_BT=reasoning.tokens_BT, logp_BT=reasoning.logp_BT)


def assert_identical(got: dict, want: dict):
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape and g.dtype == w.dtype, f"{name}: {g.shape}/{g.dtype} vs {w.shape}/{w.dtype}"
        # NaN == NaN here (log-probs of ODE rows are never stored, but be exact about it anyway)
        same = (g == w) | (g.isnan() & w.isnan()) if g.is_floating_point() else g == w
        if not bool(same.all()):
            diff = (g.double() - w.double()).abs().nan_to_num(0.0)
            pytest.fail(f"{name}: {int((~same).sum())} of {same.numel()} elements differ, "
                        f"largest |Δ| {float(diff.max()):.3e} at {np.unravel_index(int(diff.argmax()), diff.shape)}")


def _rollout_outputs(traj):
    return dict(k0=traj.window_k0, x_RW=traj.x_RW, x_next_RW=traj.x_next_RW, noise_RW=traj.noise_RW,
                logp_RW=traj.logp_RW, latents=traj.latents, tokens_BT=traj.reasoning.tokens_BT,
                logp_BT=traj.reasoning.logp_BT)


# ------------------------------------------------------------------------------------------ the model

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("append", [False, True])
def test_pure_image_route_equals_general_route(dtype, append):
    model = tiny_model(dtype=dtype, hidden=48, heads=4, kv_heads=2, intermediate=96, layers=2)
    g = torch.Generator().manual_seed(3)
    lat = torch.randn(3, 48, 8, 8, generator=g, dtype=torch.float64).to(dtype)
    sig = torch.rand(3, generator=g, dtype=torch.float64).to(dtype)
    with torch.no_grad():
        c_fast, c_gen = text_cache(model, room=16), text_cache(model, room=16)
        v_fast = model._image_block(c_fast, lat, sig, append=append)  # what image_velocity/append_image run
        v_gen = model._image_block(c_gen, lat, sig, append=append, static_route=False)
    assert torch.equal(v_fast, v_gen)
    if append:  # and the cache they wrote
        assert c_fast.length == c_gen.length and torch.equal(c_fast.next_pos, c_gen.next_pos)
        assert all(torch.equal(a, b) for a, b in zip(c_fast.k + c_fast.v, c_gen.k + c_gen.v))


# ------------------------------------------------------------------------------------------ the tables

def test_sde_tables_hold_the_step_coefficients():
    N, W, eta = 7, 3, 0.8
    k0 = [0, 0, 2, 2, 1]
    t = sde_tables(sigma_schedule(N, 3.0), k0, window=W, eta=eta)
    sig = sigma_schedule(N, 3.0)
    for k in range(N):
        for r, start in enumerate(k0):
            c = step_coeffs(sig, k, eta if start <= k < start + W else 0.0)
            got = (t.sigma_NR[k, r], t.a_NR[k, r], t.b_NR[k, r], t.std_NR[k, r])
            want = torch.tensor([c.sigma, c.a, c.b, c.std], dtype=torch.float64).float()
            assert torch.equal(torch.stack(got), want), (k, r)
        rows = [r for r, s in enumerate(k0) if s <= k < s + W]
        if rows:
            assert t.stores[k][0].tolist() == rows and t.stores[k][1].tolist() == [k - k0[r] for r in rows]
        else:
            assert t.stores[k] is None
    o = ode_tables(N, 3.0, 4, "cpu")
    assert o.sigma_NR.shape == (N, 4) and torch.equal(o.h_N, (sig[:-1] - sig[1:]).float())


# ---------------------------------------------------------------------- the loops against the eager ones

@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_denoise_equals_the_eager_loop(cfg_scale):
    model, tok = tiny_model(), ByteTokenizer()
    with torch.no_grad():
        cache = text_cache(model)
        uncond = unconditional_cache(model, tok, 3) if cfg_scale != 1.0 else None
    noise = torch.randn(3, 48, 8, 8, generator=torch.Generator().manual_seed(5))
    want = _eager_denoise(model, cache, num_steps=6, cfg_scale=cfg_scale, uncond_cache=uncond, noise_BChw=noise)
    for graph in (False, True):  # on CPU cuda_graph=True runs the same eager evaluation
        got = denoise(model, cache, num_steps=6, cfg_scale=cfg_scale, uncond_cache=uncond, noise_BChw=noise,
                      cuda_graph=graph)
        assert torch.equal(got, want)


@pytest.mark.parametrize("kind,cfg_scale", [("sde", 1.0), ("cps", 1.0), ("sde", 2.0)])
def test_rollout_equals_the_eager_loop(kind, cfg_scale):
    model, tok = tiny_model(), ByteTokenizer()
    cfg = RolloutConfig(group_size=3, steps=6, window_size=2, window_hi=4, max_new_tokens=8, eta=0.7,
                        sde_kind=kind, cfg_scale=cfg_scale)
    windows = np.array([2, 0])
    want = _eager_rollout(model, tok, PROMPTS, cfg, generator=torch.Generator().manual_seed(0), windows=windows)
    traj = rollout(model, tok, PROMPTS, cfg, generator=torch.Generator().manual_seed(0), windows=windows,
                   backend="torch")
    assert_identical(_rollout_outputs(traj), want)
    assert bool(torch.isfinite(traj.logp_RW).all())


def test_graph_pieces_refuse_or_skip_cpu():
    model = tiny_model(hidden=48, heads=4, kv_heads=2, intermediate=96, layers=1)
    with torch.no_grad():
        cache = text_cache(model)
    velocity = make_velocity(model, cache, cuda_graph=True)
    assert not isinstance(velocity, DenoiseGraph)  # CPU: the eager evaluation
    with pytest.raises(ValueError, match="CUDA device"):
        DenoiseGraph(velocity, "cpu")
    with pytest.raises(ValueError, match="uncond_cache"):
        velocity_fn(model, cache, cfg_scale=3.0)


# ------------------------------------------------------------------------------------------- GPU only

@cuda_only
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_denoise_equals_eager(cfg_scale, dtype):
    model, tok = tiny_model("cuda", dtype), ByteTokenizer()
    with torch.no_grad():
        cache = text_cache(model)
        uncond = unconditional_cache(model, tok, 3) if cfg_scale != 1.0 else None
    noise = torch.randn(3, 48, 8, 8, generator=torch.Generator("cuda").manual_seed(5), device="cuda")
    kw = dict(num_steps=8, cfg_scale=cfg_scale, uncond_cache=uncond, noise_BChw=noise)
    want = denoise(model, cache, cuda_graph=False, **kw)
    got = denoise(model, cache, cuda_graph=True, **kw)
    assert torch.equal(got, want)
    assert torch.equal(want, _eager_denoise(model, cache, **kw))

    # a captured loop makes no host sync: capture on a first run, then replay under the sync checker
    velocity = make_velocity(model, cache, uncond_cache=uncond, cfg_scale=cfg_scale, cuda_graph=True)
    assert isinstance(velocity, DenoiseGraph)
    tables = ode_tables(8, 3.0, 3, "cuda")
    first = ode_loop(velocity, noise, tables)
    assert velocity.captured
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = ode_loop(velocity, noise, tables)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(first, want) and torch.equal(again, want)


@cuda_only
@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_cuda_graph_rollout_equals_eager(cfg_scale):
    model, tok = tiny_model("cuda"), ByteTokenizer()
    outs = []
    for graph in (False, True):
        cfg = RolloutConfig(group_size=3, steps=6, window_size=2, window_hi=4, max_new_tokens=8, eta=0.7,
                            cfg_scale=cfg_scale, cuda_graph=graph)
        traj = rollout(model, tok, PROMPTS, cfg, generator=torch.Generator("cuda").manual_seed(0),
                       windows=np.array([1, 0]))
        outs.append(_rollout_outputs(traj))
    assert_identical(outs[1], outs[0])

    # the window loop alone, replayed under the sync checker
    with torch.no_grad():
        cache = text_cache(model, rows=6)
    tables = sde_tables(sigma_schedule(6, 3.0).cuda(), [1, 1, 1, 0, 0, 0], window=2, eta=0.7)
    velocity = make_velocity(model, cache, cuda_graph=True)
    x = torch.randn(6, 48, 8, 8, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    first = sde_loop(velocity, x, tables, generator=torch.Generator("cuda").manual_seed(2))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = sde_loop(velocity, x, tables, generator=torch.Generator("cuda").manual_seed(2))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert velocity.captured
    assert_identical(vars(again), vars(first))
