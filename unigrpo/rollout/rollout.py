"""Training rollouts (ALGORITHM.md §4): G reasoning samples per prompt, then a hybrid denoising with one SDE
window of W consecutive steps per prompt group (all other steps ODE), no CFG by default.

The window start k0 is drawn once per group from {r0, …, r1 − W} with a numpy Generator owned by the trainer
(so it is a function of the run's seed and the step, and resumes exactly). Every row steps through the same
k at the same time; rows inside their window take the SDE step (η), the rest the ODE step — one batched
`sde_step` with per-row coefficients does both (an ODE row has η = 0, so s = 0 and x' = a·x + b·v = x − h·v).

Stored per trajectory and window step j (§4): x_j and x'_j (fp32), the step index, log p_old(x'_j | x_j)
and the noise ξ_j (μ_old = x'_j − s_j·ξ_j).

The denoising loop is graphs.sde_loop: per-step coefficients precomputed on the device, window stores by
index tensors prepared from the host-known window starts (no host syncs in the loop), and on CUDA the
step's model evaluation replayed from a CUDA graph (`cuda_graph`). One synchronize after the loop keeps
the "rollout_image" wall time honest.

Legend: R = B·G trajectories (rows), W window steps, C/h/w latent dims, T reasoning tokens.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch

from unigrpo.rollout.generate import (Reasoning, check_instructions, encode_instructions, generate_reasoning,
                                     next_round, round_capacity, unconditional_cache)
from unigrpo.rollout.graphs import make_velocity, sde_loop, sde_tables
from unigrpo_kernels import sigma_schedule


@dataclass
class RolloutConfig:
    group_size: int = 8
    """G: samples per prompt"""
    temperature: float = 1.0
    """reasoning sampling temperature τ"""
    max_new_tokens: int = 0
    """reasoning length cap (0 = the model's context limit)"""
    steps: int = 25
    """N: denoising steps of a training rollout"""
    shift: float = 3.0
    """timestep shift s"""
    window_size: int = 3
    """W: SDE steps per trajectory"""
    window_lo: int = 0
    """r0: first step a window may start at"""
    window_hi: int = 5
    """r1: windows lie inside [r0, r1]"""
    eta: float = 0.8
    """η: SDE noise level"""
    sde_kind: str = "sde"
    """"sde" (Flow-GRPO) or "cps" (coefficient-preserving)"""
    cfg_scale: float = 1.0
    """CFG in training rollouts (1 = none, the paper's choice; > 1 is an ablation: 2 evaluations per step)"""
    cuda_graph: bool = True
    """replay each denoising step's model evaluation(s) from a CUDA graph (CUDA only, not under FSDP; elsewhere
    the eager path runs). Same numbers either way (unigrpo/rollout/graphs.py)"""

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"rollout.group_size must be >= 2 (advantages compare samples of a group), "
                             f"got {self.group_size}")
        if self.steps < 1:
            raise ValueError(f"rollout.steps must be >= 1, got {self.steps}")
        if self.window_size < 1:
            raise ValueError(f"rollout.window_size must be >= 1, got {self.window_size}")
        if not 0 <= self.window_lo <= self.window_hi - self.window_size or self.window_hi > self.steps:
            raise ValueError(f"rollout window [window_lo={self.window_lo}, window_hi={self.window_hi}] must hold "
                             f"window_size={self.window_size} steps inside the {self.steps} denoising steps "
                             f"(0 <= lo <= hi - size, hi <= steps)")
        if not self.eta > 0:
            raise ValueError(f"rollout.eta must be > 0 for SDE steps, got {self.eta}")
        if self.sde_kind not in ("sde", "cps"):
            raise ValueError(f"rollout.sde_kind must be 'sde' or 'cps', got {self.sde_kind!r}")
        if self.sde_kind == "cps" and self.eta > 1:
            raise ValueError(f"rollout.eta must be <= 1 with sde_kind 'cps', got {self.eta}")
        if self.sde_kind == "cps" and self.window_hi >= self.steps:
            raise ValueError(f"with sde_kind 'cps' the window must end before the last step (its std is 0 "
                             f"there): window_hi={self.window_hi} must be < steps={self.steps}")
        if self.temperature <= 0:
            raise ValueError(f"rollout.temperature must be > 0 (log-probs of greedy decoding are undefined), "
                             f"got {self.temperature}")
        if self.max_new_tokens < 0 or self.cfg_scale < 0:
            raise ValueError("rollout.max_new_tokens and rollout.cfg_scale must be >= 0")


@dataclass
class Episode:
    """The rounds of multi-round trajectories (ALGORITHM.md §12). The Trajectories' W axis holds every
    round's window steps, round-major (round r: slots r·W … r·W + W − 1), and its reasoning tensors every
    round's tokens, round r in columns [columns[r], columns[r + 1]) (a prefix of them is real, per row)."""

    instruction_ids: list[list[list[int]]]  # [row][r − 1]: token ids of c^r, r = 2 … R
    columns: list[int]  # R + 1 column boundaries of reasoning.tokens_BT
    texts: list[list[str]]  # [row][r]: decoded reasoning o^r
    latents_RK: torch.Tensor  # fp32 [rows, R, C, h, w]: every round's final latent x^r (the last = traj.latents)
    window: int  # W: SDE steps per round

    @property
    def rounds(self) -> int:
        return len(self.columns) - 1

    def reasoning_lengths(self, mask_BT: torch.Tensor) -> torch.Tensor:
        """long [rows, R]: real reasoning tokens of each round."""
        return torch.stack([mask_BT[:, a:b].sum(1) for a, b in zip(self.columns, self.columns[1:])], 1)


@dataclass
class Trajectories:
    """R = B·G rollouts; rows of one prompt are adjacent (group g = rows g·G … g·G + G − 1)."""

    prompt_texts: list[str]  # per row
    reasoning: Reasoning  # tokens_BT, logp_BT, mask_BT, prompt_ids (cache dropped after the rollout)
    window_k0: torch.Tensor  # long [R]: first SDE step of each row (shared within a group)
    x_RW: torch.Tensor  # fp32 [R, W, C, h, w]: window inputs x_j
    x_next_RW: torch.Tensor  # fp32 [R, W, C, h, w]: window outputs x'_j
    noise_RW: torch.Tensor  # fp32 [R, W, C, h, w]: ξ_j
    logp_RW: torch.Tensor  # fp32 [R, W]: log p_old(x'_j | x_j), mean over D
    latents: torch.Tensor  # fp32 [R, C, h, w]: final clean latents
    group_size: int
    timing: dict  # seconds: "rollout_text", "rollout_image"
    episode: Episode | None = None  # multi-round trajectories (window_k0 is then long [R, rounds])

    @property
    def window_steps(self) -> torch.Tensor:
        """long [R, W]: the step index k of each window step (every round's, round-major, for episodes)"""
        W = self.x_RW.shape[1]
        if self.window_k0.dim() == 2:
            w = W // self.window_k0.shape[1]
            steps = self.window_k0[:, :, None] + torch.arange(w, device=self.window_k0.device)
            return steps.flatten(1)
        return self.window_k0[:, None] + torch.arange(W, device=self.window_k0.device)[None, :]


def draw_windows(rng: np.random.Generator, groups: int, cfg: RolloutConfig) -> np.ndarray:
    """k0 per group, uniform over {r0, …, r1 − W}."""
    return rng.integers(cfg.window_lo, cfg.window_hi - cfg.window_size + 1, size=groups)


@torch.no_grad()
def rollout(model, tokenizer, prompt_texts: list[str], cfg: RolloutConfig, *, generator: torch.Generator,
            window_rng: np.random.Generator | None = None, windows=None, backend: str = "auto",
            instructions: list[list[str]] | None = None) -> Trajectories:
    """Roll out len(prompt_texts) prompts × G samples. Returns the trajectories (images not yet decoded).
    The SDE window of each group: drawn from window_rng, or given as `windows` (k0 per prompt, ints).
    backend: the kernel backend of sde_step ("auto", "torch", "triton", "cuda").
    instructions: multi-round episodes (ALGORITHM.md §12): instructions[i] holds prompt i's R − 1 later
    instructions, and `windows` is then [prompts, R] (each round's k0)."""
    if (window_rng is None) == (windows is None):
        raise ValueError("rollout needs exactly one of window_rng and windows")
    if windows is not None and len(windows) != len(prompt_texts):
        raise ValueError(f"windows has {len(windows)} entries for {len(prompt_texts)} prompts")
    if instructions is not None:
        if windows is None:
            raise ValueError("a multi-round rollout takes its windows as `windows` [prompts, rounds]")
        return _rollout_episodes(model, tokenizer, prompt_texts, instructions, cfg, generator=generator,
                                 windows=windows, backend=backend)
    G, W, N = cfg.group_size, cfg.window_size, cfg.steps
    texts = [p for p in prompt_texts for _ in range(G)]
    R = len(texts)
    t0 = time.perf_counter()
    reasoning = generate_reasoning(model, tokenizer, texts, temperature=cfg.temperature,
                                   max_new_tokens=cfg.max_new_tokens or None, generator=generator)
    cache = reasoning.cache
    t1 = time.perf_counter()
    uncond = unconditional_cache(model, tokenizer, R) if cfg.cfg_scale != 1.0 else None
    mcfg = model.cfg
    dev = model.embed.weight.device
    if windows is None:
        windows = draw_windows(window_rng, len(prompt_texts), cfg)
    k0_host = np.asarray(windows, dtype=np.int64).repeat(G)
    k0 = torch.as_tensor(k0_host, dtype=torch.long).to(dev)
    shape = (R, mcfg.latent_channels, mcfg.latent_size, mcfg.latent_size)
    tables = sde_tables(sigma_schedule(N, cfg.shift).to(dev), k0_host, window=W, eta=cfg.eta, kind=cfg.sde_kind)
    x = torch.randn(shape, generator=generator, device=dev)
    velocity = make_velocity(model, cache, uncond_cache=uncond, cfg_scale=cfg.cfg_scale, cuda_graph=cfg.cuda_graph)
    out = sde_loop(velocity, x, tables, generator=generator, backend=backend)
    if dev.type == "cuda":  # the loop never waits for the GPU: make the phase's wall time honest
        torch.cuda.synchronize(dev)
    reasoning.cache = None  # the KV cache is large; training recomputes everything it needs
    timing = {"rollout_text": t1 - t0, "rollout_image": time.perf_counter() - t1}
    return Trajectories(texts, reasoning, k0, out.x_RW, out.x_next_RW, out.noise_RW, out.logp_RW, out.latents, G,
                        timing)


def _rollout_episodes(model, tokenizer, prompt_texts, instructions, cfg: RolloutConfig, *, generator, windows,
                      backend) -> Trajectories:
    """`rollout` of R-round episodes: per round its reasoning, then its hybrid denoising with the round's
    own window; x̄^r and the next instruction join the cache between rounds (ALGORITHM.md §12)."""
    G, W, N = cfg.group_size, cfg.window_size, cfg.steps
    n_rounds = check_instructions(instructions, len(prompt_texts))
    k0_PR = np.asarray(windows, dtype=np.int64).reshape(len(prompt_texts), -1)
    if k0_PR.shape[1] != n_rounds:
        raise ValueError(f"windows has {k0_PR.shape[1]} entries per prompt for {n_rounds} rounds")
    texts = [p for p in prompt_texts for _ in range(G)]
    R, dev, mcfg = len(texts), model.embed.weight.device, model.cfg
    cap = cfg.max_new_tokens or None
    later = [encode_instructions(tokenizer, [x[r] for x in instructions for _ in range(G)], mcfg.max_text_len)
             for r in range(n_rounds - 1)]
    sigmas = sigma_schedule(N, cfg.shift).to(dev)
    uncond = unconditional_cache(model, tokenizer, R) if cfg.cfg_scale != 1.0 else None
    shape = (R, mcfg.latent_channels, mcfg.latent_size, mcfg.latent_size)
    t_text = t_image = 0.0
    parts, outs = [], []
    for r in range(n_rounds):
        t0 = time.perf_counter()
        if r == 0:
            rs = generate_reasoning(model, tokenizer, texts, temperature=cfg.temperature, max_new_tokens=cap,
                                    generator=generator, extra_capacity=round_capacity(model, later, cap))
            cache = rs.cache
        else:
            rs = next_round(model, tokenizer, cache, outs[-1].latents, later[r - 1], temperature=cfg.temperature,
                            max_new_tokens=cap, generator=generator)
        t1 = time.perf_counter()
        k0_host = k0_PR[:, r].repeat(G)
        tables = sde_tables(sigmas, k0_host, window=W, eta=cfg.eta, kind=cfg.sde_kind)
        x = torch.randn(shape, generator=generator, device=dev)
        velocity = make_velocity(model, cache, uncond_cache=uncond, cfg_scale=cfg.cfg_scale,
                                 cuda_graph=cfg.cuda_graph)
        outs.append(sde_loop(velocity, x, tables, generator=generator, backend=backend))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        rs.cache = None
        parts.append(rs)
        t_text, t_image = t_text + t1 - t0, t_image + time.perf_counter() - t1
    columns = np.cumsum([0] + [p.tokens_BT.shape[1] for p in parts]).tolist()
    reasoning = Reasoning(prompt_ids=parts[0].prompt_ids, tokens_BT=torch.cat([p.tokens_BT for p in parts], 1),
                          logp_BT=torch.cat([p.logp_BT for p in parts], 1),
                          mask_BT=torch.cat([p.mask_BT for p in parts], 1), texts=parts[-1].texts, cache=None)
    episode = Episode(instruction_ids=[[later[r][i] for r in range(n_rounds - 1)] for i in range(R)],
                      columns=columns, texts=[[p.texts[i] for p in parts] for i in range(R)],
                      latents_RK=torch.stack([o.latents for o in outs], 1), window=W)
    k0 = torch.as_tensor(k0_PR.repeat(G, axis=0), dtype=torch.long).to(dev)
    cat = lambda name: torch.cat([getattr(o, name) for o in outs], 1)  # noqa: E731
    return Trajectories(texts, reasoning, k0, cat("x_RW"), cat("x_next_RW"), cat("noise_RW"), cat("logp_RW"),
                        outs[-1].latents, G, {"rollout_text": t_text, "rollout_image": t_image}, episode)


def concat_trajectories(parts: list[Trajectories], group_size: int) -> Trajectories:
    """Rows of `parts` in order as one Trajectories of groups of `group_size` (reasoning tensors padded to the
    longest T, round by round for episodes: tokens 0, log-probs 0, mask False); timings summed."""
    eps = [p.episode for p in parts]
    if any(e is None for e in eps) != all(e is None for e in eps):
        raise ValueError("cannot concatenate single-round and multi-round trajectories")
    bounds = [e.columns if e is not None else [0, p.reasoning.tokens_BT.shape[1]] for e, p in zip(eps, parts)]
    widths = [max(b[r + 1] - b[r] for b in bounds) for r in range(len(bounds[0]) - 1)]

    def pad(t, b, value):   # each round's columns padded to that round's widest
        return torch.cat([torch.nn.functional.pad(t[:, b[r]:b[r + 1]], (0, w - (b[r + 1] - b[r])), value=value)
                          for r, w in enumerate(widths)], 1)
    rs = [p.reasoning for p in parts]
    reasoning = Reasoning(prompt_ids=[i for r in rs for i in r.prompt_ids],
                          tokens_BT=torch.cat([pad(r.tokens_BT, b, 0) for r, b in zip(rs, bounds)]),
                          logp_BT=torch.cat([pad(r.logp_BT, b, 0.0) for r, b in zip(rs, bounds)]),
                          mask_BT=torch.cat([pad(r.mask_BT, b, False) for r, b in zip(rs, bounds)]),
                          texts=[t for r in rs for t in r.texts], cache=None)
    cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    timing = {k: sum(p.timing[k] for p in parts) for k in parts[0].timing}
    episode = None
    if eps[0] is not None:
        episode = Episode([x for e in eps for x in e.instruction_ids], np.cumsum([0] + widths).tolist(),
                          [x for e in eps for x in e.texts], torch.cat([e.latents_RK for e in eps]), eps[0].window)
    return Trajectories([t for p in parts for t in p.prompt_texts], reasoning, cat("window_k0"), cat("x_RW"),
                        cat("x_next_RW"), cat("noise_RW"), cat("logp_RW"), cat("latents"), group_size, timing,
                        episode)


def check_rollout_batch(batch: int, group_size: int) -> None:
    """dist.rollout_batch must be 0 (all rows at once), a divisor >= 2 of G or a multiple of G."""
    if batch and not (batch >= 2 and group_size % batch == 0 or batch % group_size == 0):
        raise ValueError(f"dist.rollout_batch={batch} must be 0 (all at once), a divisor >= 2 of "
                         f"rollout.group_size={group_size} or a multiple of it")


def rollout_in_batches(model, tokenizer, prompt_texts: list[str], cfg: RolloutConfig, *, batch: int,
                       generator: torch.Generator, windows, backend: str = "auto",
                       instructions: list[list[str]] | None = None) -> Trajectories:
    """`rollout` of the same rows, at most `batch` trajectories at a time (0 = all at once): whole groups
    when batch is a multiple of G, else G/batch pieces of each group (same window k0). Peak memory of the
    KV cache and the denoising activations scales with `batch`; the sampled values differ from one call
    (the generator is consumed in another order), their distribution does not."""
    G = cfg.group_size
    check_rollout_batch(batch, G)
    kw = dict(generator=generator, backend=backend)
    if not batch or batch >= len(prompt_texts) * G:
        return rollout(model, tokenizer, prompt_texts, cfg, windows=windows, instructions=instructions, **kw)
    sub = (lambda a, b: None) if instructions is None else (lambda a, b: instructions[a:b])  # noqa: E731
    parts = []
    if batch % G == 0:
        per = batch // G
        for i in range(0, len(prompt_texts), per):
            parts.append(rollout(model, tokenizer, prompt_texts[i:i + per], cfg, windows=windows[i:i + per],
                                 instructions=sub(i, i + per), **kw))
    else:
        piece = dataclasses.replace(cfg, group_size=batch)
        for i, text in enumerate(prompt_texts):
            for _ in range(G // batch):
                parts.append(rollout(model, tokenizer, [text], piece, windows=windows[i:i + 1],
                                     instructions=sub(i, i + 1), **kw))
    return concat_trajectories(parts, G)
