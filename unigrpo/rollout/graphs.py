"""The fast denoising path: static shapes, per-step tables on the device, no host syncs in the loop, and a
CUDA graph of the model evaluation (the pattern of gpt-fast's generate.py: capture the fixed-shape decode step
once, replay it every step).

Pieces, used by both generate.denoise (evaluation: ODE, optional CFG) and rollout.rollout (training: one
SDE window per group):
- `ode_tables` / `sde_tables`: everything a loop needs per step k, computed once before the loop on the
  latents' device — σ_k per row (the model's time input), h_k for the Euler step, and for rollouts a, b,
  std per row and the window stores' (row, slot) index tensors.
- `velocity_fn`: the eager evaluation v(x, σ) (with CFG, v_u + w·(v_c − v_u): two evaluations per step).
- `DenoiseGraph`: the same evaluation captured once in a CUDA graph and replayed per step.
- `ode_loop` / `sde_loop`: the loops. Per step: the evaluation, then the step (Euler, or `sde_step` with a
  fresh noise draw and the window stores).

Decisions:
- Bit-identical to the former eager loops (tests/test_rollout_fast.py keeps them as the reference): the
  tables hold exactly the values those loops computed per step (σ as float32 from the float64 schedule; h_k
  rounded to float32 like the Python scalar it replaces; a/b/std from `step_coeffs_batch` called per step
  with the same [R] shapes, so even the CPU's vectorised-vs-tail sin of "cps" rounds the same), the steps
  are the same ops, and the random stream is drawn in the same order (noise stays outside the graph).
- No host syncs inside the loops: σ and the coefficients are rows of device tables; which rows are inside
  their SDE window at step k is known on the host (window starts are host integers), so the stores use
  index tensors prepared before the loop — no boolean masks (torch.nonzero), no .item(), no `.any()`.
- What the graph captures: only the evaluation (and the CFG combination). The step runs eagerly after each
  replay: its noise comes from the caller's torch.Generator, which stays outside the graph so the random
  stream is the eager one; the step is a few elementwise launches against ~20 launches per layer.
- Lazy capture: the first call runs the evaluation eagerly on a side stream — the warm-up the CUDA-graph
  docs ask for (cuBLAS / attention lazy init happens outside capture) — returns that real output for step 0,
  then captures. Later calls copy_ x and σ into the static input buffers and replay. Capture therefore costs
  one evaluation's launch time on the host and no extra GPU work (plus one synchronize and empty_cache,
  done by torch.cuda.graph on entry, once per loop).
- One graph per loop: it is specific to the batch R, the cache objects and their length (reasoning lengths
  differ between rollouts), and reads the cache tensors in place — they must not change while the graph
  lives (image_velocity never writes the cache). The graph and its memory pool are freed with the loop.
- When the graph is not used: a device other than CUDA, `cuda_graph=False`, or an FSDP-wrapped model (its
  hooks run inside every evaluation; capturing them is untested). If capture raises, a warning is logged
  and the loop continues eagerly — same numbers, only slower.
- Requires the model's image path to be free of data-dependent control flow: UnifiedModel._image_layers
  routes a pure image block without torch.nonzero (unigrpo/model/unified.py).

Legend: R rows, N steps, W window steps, C/h/w latent dims.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from unigrpo_kernels import ode_step, sde_step, sigma_schedule, step_coeffs_batch

logger = logging.getLogger(__name__)

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(x fp32 [R, C, h, w], σ fp32 [R]) → v fp32 [R, C, h, w]"""

_logged: set[str] = set()


def _log_once(msg: str, level: int = logging.INFO) -> None:
    if msg not in _logged:
        _logged.add(msg)
        logger.log(level, msg)


# ------------------------------------------------------------------------------------------------ tables

@dataclass
class OdeTables:
    """Per-step inputs of an ODE loop, on the latents' device."""

    sigma_NR: torch.Tensor  # fp32 [N, R]: σ_k per row (the model's time input)
    h_N: torch.Tensor  # fp32 [N]: h_k = σ_k − σ_{k+1}

    @property
    def steps(self) -> int:
        return self.h_N.shape[0]


def ode_tables(num_steps: int, shift: float, rows: int, device) -> OdeTables:
    """The schedule of an N-step Euler loop for R rows (ALGORITHM.md §2)."""
    sig64 = sigma_schedule(num_steps, shift)  # float64 [N+1] on the host
    sigma_NR = sig64[:-1].float()[:, None].expand(num_steps, rows).contiguous()
    h_N = (sig64[:-1] - sig64[1:]).float()
    return OdeTables(sigma_NR.to(device), h_N.to(device))


@dataclass
class SdeTables:
    """Per-step inputs of a rollout loop with one SDE window per row (ALGORITHM.md §3–§4), on the device."""

    sigma_NR: torch.Tensor  # fp32 [N, R]: σ_k per row
    a_NR: torch.Tensor  # fp32 [N, R]: μ = a·x + b·v
    b_NR: torch.Tensor  # fp32 [N, R]
    std_NR: torch.Tensor  # fp32 [N, R]: 0 outside the window (the ODE step)
    window: int  # W
    stores: list  # per step k: None, or (rows long [n], slots long [n]) of the rows inside their window

    @property
    def steps(self) -> int:
        return self.sigma_NR.shape[0]


def sde_tables(sigmas_N1: torch.Tensor, k0_R, *, window: int, eta: float, kind: str = "sde") -> SdeTables:
    """Tables for rows whose SDE window starts at k0_R (host ints, one per row; steps k0 … k0+W−1 take η,
    the others η = 0). sigmas_N1: float64 [N+1] on the device the loop runs on."""
    dev = sigmas_N1.device
    N = sigmas_N1.numel() - 1
    k0_host = np.asarray(k0_R, dtype=np.int64).reshape(-1)
    R = k0_host.size
    k0 = torch.as_tensor(k0_host, dtype=torch.long).to(dev)
    eta_t = torch.tensor(eta, dtype=torch.float64, device=dev)
    zero_t = torch.tensor(0.0, dtype=torch.float64, device=dev)
    a, b, std, stores = [], [], [], []
    for k in range(N):
        in_window = (k >= k0) & (k < k0 + window)
        co = step_coeffs_batch(sigmas_N1, torch.full((R,), k, device=dev), torch.where(in_window, eta_t, zero_t),
                               kind)
        a.append(co["a"].float())
        b.append(co["b"].float())
        std.append(co["std"].float())
        rows = np.nonzero((k >= k0_host) & (k < k0_host + window))[0]
        stores.append(None if rows.size == 0 else (torch.as_tensor(rows, dtype=torch.long).to(dev),
                                                   torch.as_tensor(k - k0_host[rows], dtype=torch.long).to(dev)))
    sigma_NR = sigmas_N1[:-1].float()[:, None].expand(N, R).contiguous()
    return SdeTables(sigma_NR, torch.stack(a), torch.stack(b), torch.stack(std), window, stores)


# --------------------------------------------------------------------------------------------- velocity

def velocity_fn(model, cache, *, uncond_cache=None, cfg_scale: float = 1.0) -> Velocity:
    """The eager evaluation: v = v_θ(x, σ | cache), or with cfg_scale ≠ 1 v_u + w·(v_c − v_u) against
    `uncond_cache` (two evaluations). The model runs in its own dtype; x and v are float32."""
    guided = cfg_scale != 1.0
    if guided and uncond_cache is None:
        raise ValueError("cfg_scale != 1 needs an uncond_cache (see generate.unconditional_cache)")
    dtype = model.embed.weight.dtype

    def evaluate(x_BChw, sigma_B):
        v = model.image_velocity(cache, x_BChw.to(dtype), sigma_B).float()
        if guided:
            vu = model.image_velocity(uncond_cache, x_BChw.to(dtype), sigma_B).float()
            v = vu + cfg_scale * (v - vu)
        return v

    return evaluate


class DenoiseGraph:
    """`evaluate` (a Velocity) captured in a CUDA graph for fixed shapes, called like it: fixed R, latent shape
    and cache length for the object's lifetime. The first call runs eagerly on a side stream (warm-up; its
    output is that step's real result) and captures; later calls copy_ their inputs into the static buffers
    and replay. The returned tensor is the graph's static output: it is overwritten by the next call.
    `captured` says whether replays are in use (False after a failed capture: eager from then on)."""

    def __init__(self, evaluate: Velocity, device):
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"DenoiseGraph needs a CUDA device, got {self.device}")
        self._eval = evaluate
        self.graph: torch.cuda.CUDAGraph | None = None
        self.captured = False
        self._x = self._sigma = self._v = None

    @torch.no_grad()
    def __call__(self, x_BChw: torch.Tensor, sigma_B: torch.Tensor) -> torch.Tensor:
        if self.graph is not None:
            self._x.copy_(x_BChw)
            self._sigma.copy_(sigma_B)
            self.graph.replay()
            return self._v
        if self._x is not None:  # capture failed: eager
            return self._eval(x_BChw, sigma_B)
        return self._first_call(x_BChw, sigma_B)

    def _first_call(self, x_BChw, sigma_B):
        main = torch.cuda.current_stream(self.device)
        self._x, self._sigma = x_BChw.clone(), sigma_B.clone()  # the static inputs the graph reads
        side = _side_stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            v0 = self._eval(self._x, self._sigma)
        main.wait_stream(side)
        v0.record_stream(main)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._v = self._eval(self._x, self._sigma)
        except Exception as err:  # noqa: BLE001 — any capture failure: same numbers eagerly
            self._v = None
            logger.warning("CUDA graph capture of the denoising step failed (%s: %s); running eagerly",
                           type(err).__name__, err)
            return v0
        self.graph, self.captured = graph, True
        return v0


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One warm-up stream per device: blocks the caching allocator keeps for a stream serve only that stream,
    so a fresh stream per capture would spread the cache over PyTorch's stream pool."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def _fsdp_wrapped(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover — torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def make_velocity(model, cache, *, uncond_cache=None, cfg_scale: float = 1.0, cuda_graph: bool = True):
    """The evaluation a denoising loop calls: a DenoiseGraph when `cuda_graph` and the model is on CUDA and
    not FSDP-wrapped, else the eager `velocity_fn` (the decision is logged once)."""
    evaluate = velocity_fn(model, cache, uncond_cache=uncond_cache, cfg_scale=cfg_scale)
    dev = model.embed.weight.device
    if not cuda_graph or dev.type != "cuda":
        return evaluate
    if _fsdp_wrapped(model):
        _log_once("denoising: the model is FSDP-wrapped; the CUDA graph is not used (eager evaluation)")
        return evaluate
    _log_once("denoising: model evaluations replayed from a CUDA graph (rollout.cuda_graph)")
    return DenoiseGraph(evaluate, dev)


# ------------------------------------------------------------------------------------------------ loops

def ode_loop(velocity: Velocity, x_BChw: torch.Tensor, tables: OdeTables) -> torch.Tensor:
    """N Euler steps (ode_step, §2) from x (fp32 [R, C, h, w]); returns the final latent. No host syncs: h is a
    0-dim tensor on x's device."""
    x = x_BChw
    for k in range(tables.steps):
        x = ode_step(x, velocity(x, tables.sigma_NR[k]), tables.h_N[k])
    return x


@dataclass
class WindowSamples:
    """What a rollout loop returns (rollout.Trajectories stores it)."""

    x_RW: torch.Tensor  # fp32 [R, W, C, h, w]: window inputs x_j
    x_next_RW: torch.Tensor  # fp32 [R, W, C, h, w]: window outputs x'_j
    noise_RW: torch.Tensor  # fp32 [R, W, C, h, w]: ξ_j
    logp_RW: torch.Tensor  # fp32 [R, W]: log p_old(x'_j | x_j)
    latents: torch.Tensor  # fp32 [R, C, h, w]: the final latent


def sde_loop(velocity: Velocity, x_BChw: torch.Tensor, tables: SdeTables, *, generator: torch.Generator | None,
             backend: str = "auto") -> WindowSamples:
    """The hybrid rollout loop: every step is one batched `sde_step` with per-row coefficients (η = 0 rows
    take the ODE step), its noise ξ drawn from `generator` at every step; rows inside their window store
    (x, x', ξ, log p). No host syncs."""
    x = x_BChw
    shape, dev, W = x.shape, x.device, tables.window
    store = {name: torch.zeros((shape[0], W) + shape[1:], device=dev) for name in ("x", "x_next", "noise")}
    logp_RW = torch.zeros(shape[0], W, device=dev)
    for k in range(tables.steps):
        v = velocity(x, tables.sigma_NR[k])
        noise = torch.randn(shape, generator=generator, device=dev)
        x_next, logp = sde_step(x, v, a_B=tables.a_NR[k], b_B=tables.b_NR[k], std_B=tables.std_NR[k],
                                noise_BD=noise, backend=backend)
        x_next = x_next.view(shape)
        if tables.stores[k] is not None:
            r, j = tables.stores[k]
            store["x"][r, j] = x[r]
            store["x_next"][r, j] = x_next[r]
            store["noise"][r, j] = noise[r]
            logp_RW[r, j] = logp[r].float()
        x = x_next
    return WindowSamples(store["x"], store["x_next"], store["noise"], logp_RW, x)
