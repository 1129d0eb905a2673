"""The `rollout` suite: the generation loops of a rollout on a randomly initialised model — the denoising
loop (images/s) with and without CFG, eager and with the step's evaluation replayed from a CUDA graph, and
KV-cached text decoding (tokens/s).

Rows:
- op "denoise": `unigrpo.rollout.generate.denoise` (N Euler steps over a fixed text context, no decoding),
  provider "torch" (the eager evaluation) or "cuda_graph" (unigrpo/rollout/graphs.py), mode "no-cfg" (one
  model evaluation per step, the training rollout's case) or "cfg" (two: conditional + unconditional).
  One call = one whole loop for R images, graph capture included (each loop captures its own graph:
  the cache differs between rollouts); extra "steady_ms" times the same loop with a graph captured once
  beforehand (capture excluded). images/s = R / median loop time. The cfg row's extra "no_cfg_speedup" is
  the no-cfg loop's speed over the cfg loop's for that provider (the ratio the paper's CFG-free training
  buys; ~2× when the evaluation dominates).
- op "decode": `generate_reasoning` with T new tokens (prefill included), provider "torch", mode "text";
  tokens/s counts the sampled (valid) tokens.

Model and settings:
- GPU: the `small` preset's transformer (hidden 1024, 16 layers, 16 heads / 4 KV, vocab 32768), bf16,
  its own 256-px latent (16 × 32 × 32, 2×2 patches → 256 image tokens). Only the transformer is built:
  `small` uses codec "flux-vae", which the denoising loop never touches. R = 24 (the paper's group) and
  R = 4 (a small evaluation batch, where launch overhead shows); N = 25; a context of 160 text tokens
  (32 prompt + 128 reasoning; CFG's unconditional context is the empty prompt, 3 tokens). Decoding:
  R = 24, 32-token prompts, T = 128.
- CPU: the `tiny` preset (16 image tokens of 192 values), fp32, tiny batch — marked CPU figures (a smoke
  test, not a claim). The cuda_graph provider needs a GPU: its rows say "skipped".
- Random weights (seed 0; the zero-initialised output projection gets N(0, 0.02) so velocities are not 0);
  a random model rarely emits EOS, so decoding runs ~T steps.
- Check: the cuda_graph loop must equal the eager loop from the same noise (tolerance 1e-6 relative;
  the claim and the GPU test are bit-identity, recorded in extra "bit_identical").
- FLOPs (unit TFLOP/s, ceiling "matmul": the MFU): the step suite's counting (bench/suites/step.py
  `model_flops`): per image evaluation 2·N_image·I + attention over the context; ×2 with CFG (which
  slightly over-counts the unconditional evaluation's attention over its 3-token context). Decoding:
  2·N_text per prompt and sampled token, lm_head on each sampled position, causal attention.
- peak_mem_mib (GPU): the most memory one loop allocates above what was allocated before it (the graph's
  private pool included).
"""
from __future__ import annotations

import gc
from dataclasses import dataclass

import torch

from ..checks import rel_err
from ..context import Context, Row, make_row
from ..timing import peak_mem_mib, sync, time_ms
from unigrpo_kernels.dtypes import DTYPE_NAMES

NAME = "rollout"
DESCRIPTION = "rollout generation: denoising images/s (eager vs CUDA graph, with/without CFG), decoding tokens/s"

_TOL = 1e-6


@dataclass
class RolloutCase:
    label: str
    """the model: a preset name"""
    preset: str
    dtype: str
    """"bf16" or "fp32" weights"""
    rows: int
    """R: images per denoising loop (and rows of the decode rows)"""
    steps: int
    """N: denoising steps"""
    context: int
    """text tokens in the cache the images attend to"""
    decode_tokens: int
    """T: new tokens of the decode rows (0 = no decode rows)"""
    prompt_tokens: int = 32
    cfg_scale: float = 4.0

    @property
    def name(self) -> str:
        return self.shape

    @property
    def shape(self) -> str:
        return f"{self.label} R={self.rows} N={self.steps} ctx={self.context}"


def cases(ctx: Context) -> list[RolloutCase]:
    if ctx.is_cuda:
        if ctx.quick:
            return [RolloutCase("small", "small", "bf16", rows=8, steps=10, context=160, decode_tokens=32)]
        return [RolloutCase("small", "small", "bf16", rows=24, steps=25, context=160, decode_tokens=128),
                RolloutCase("small", "small", "bf16", rows=4, steps=25, context=160, decode_tokens=0)]
    if ctx.quick:
        return [RolloutCase("tiny", "tiny", "fp32", rows=2, steps=4, context=24, decode_tokens=8, prompt_tokens=12)]
    return [RolloutCase("tiny", "tiny", "fp32", rows=4, steps=10, context=40, decode_tokens=16, prompt_tokens=16)]


def _build(case: RolloutCase, ctx: Context):
    from unigrpo.model import UnifiedModel, preset
    from unigrpo.model.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    dtype = DTYPE_NAMES[case.dtype]
    with torch.device(ctx.device):
        model = UnifiedModel(preset(case.preset))
    torch.nn.init.normal_(model.image_out.weight, std=0.02)
    return model.to(dtype).eval(), ByteTokenizer()


def _flops(mcfg, *, prompt, reasoning, steps, cfg_scale):
    from .step import model_flops

    return model_flops(mcfg, {"prompt": prompt, "reasoning": reasoning}, steps=steps, window=0, epochs=0,
                       cfg_scale=cfg_scale, nograd_forwards=0)


def run(case: RolloutCase, ctx: Context) -> list[Row]:
    model, tok = _build(case, ctx)
    try:
        rows = _denoise_rows(case, ctx, model, tok)
        if case.decode_tokens:
            rows += _decode_rows(case, ctx, model, tok)
    finally:
        del model
        gc.collect()
        if ctx.is_cuda:
            torch.cuda.empty_cache()
    return rows


@torch.no_grad()
def _denoise_rows(case: RolloutCase, ctx: Context, model, tok) -> list[Row]:
    from unigrpo.rollout.generate import denoise, unconditional_cache
    from unigrpo.rollout.graphs import make_velocity, ode_loop, ode_tables

    mcfg, dev, R, N = model.cfg, ctx.device, case.rows, case.steps
    g = torch.Generator(device=dev).manual_seed(1)
    cache = model.new_cache(R, case.context)
    model.append_text(cache, torch.randint(0, 256, (R, case.context), generator=g, device=dev))
    uncond = unconditional_cache(model, tok, R)
    noise = torch.randn(R, mcfg.latent_channels, mcfg.latent_size, mcfg.latent_size, generator=g, device=dev)
    kw = dict(suite=NAME, op="denoise", shape=case.shape, dtype=case.dtype)
    rows: list[Row] = []
    times: dict[tuple[str, str], float] = {}
    for mode, scale in (("no-cfg", 1.0), ("cfg", case.cfg_scale)):
        args = dict(num_steps=N, cfg_scale=scale, uncond_cache=uncond if scale != 1.0 else None, noise_BChw=noise)
        flops = _flops(mcfg, prompt=[case.context] * R, reasoning=[0] * R, steps=N, cfg_scale=scale)["rollout_image"]
        ref = denoise(model, cache, cuda_graph=False, **args)
        for provider in ("torch", "cuda_graph"):
            pkw = dict(kw, provider=provider, mode=mode)
            if provider == "cuda_graph" and not (ctx.is_cuda and ctx.wants(provider)):
                note = "skipped: needs a CUDA device" if not ctx.is_cuda else "skipped: not in --providers"
                rows.append(make_row(ctx, note=note, **pkw))
                continue
            graph = provider == "cuda_graph"
            extra = {"evals/step": 2 if scale != 1.0 else 1}
            ratio, note = 0.0, "reference"
            if graph:
                out = denoise(model, cache, cuda_graph=True, **args)
                err = rel_err(out, ref)
                ratio, extra["bit_identical"] = err / _TOL, bool(torch.equal(out, ref))
                note = "bit-identical to eager" if extra["bit_identical"] else f"rel err {err:.2e} vs eager"
                if not ratio <= 1.0:
                    ctx.log(f"  FAIL {case.name} [{provider} {mode}]: {note}")
                    rows.append(make_row(ctx, ok=False, check_ratio=ratio, note=f"check failed: {note}", **pkw))
                    continue
            fn = (lambda _, a=args, gr=graph: denoise(model, cache, cuda_graph=gr, **a))
            ms = time_ms(ctx, fn)
            times[(provider, mode)] = ms[1]
            extra["images/s"] = R / (ms[1] * 1e-3)
            extra["ms/step"] = ms[1] / N
            if graph:
                velocity = make_velocity(model, cache, uncond_cache=args["uncond_cache"], cfg_scale=scale)
                tables = ode_tables(N, 3.0, R, dev)
                ode_loop(velocity, noise, tables)  # captures
                extra["captured"] = bool(getattr(velocity, "captured", False))
                steady = time_ms(ctx, lambda _: ode_loop(velocity, noise, tables))
                extra["steady_ms"] = steady[1]
                extra["steady images/s"] = R / (steady[1] * 1e-3)
                del velocity
            if mode == "cfg" and (provider, "no-cfg") in times:
                extra["no_cfg_speedup"] = ms[1] / times[(provider, "no-cfg")]
            rows.append(make_row(ctx, ms=ms, work=flops, unit="TFLOP/s", ceiling="matmul",
                                 peak_mem_mib=peak_mem_mib(ctx, fn), check_ratio=ratio, note=note, extra=extra,
                                 **pkw))
            ctx.log(f"  {case.name} [{provider} {mode}]: {ms[1]:.4g} ms/loop, {extra['images/s']:.4g} images/s")
    for provider in ("torch", "cuda_graph"):
        if (provider, "cfg") in times and (provider, "no-cfg") in times:
            r = times[(provider, "cfg")] / times[(provider, "no-cfg")]
            ctx.log(f"  {case.name} [{provider}]: CFG-free / CFG speed = {r:.3g}x"
                    + (" (target >= 1.9x on GPU)" if ctx.is_cuda else " (CPU figure)"))
    return rows


@torch.no_grad()
def _decode_rows(case: RolloutCase, ctx: Context, model, tok) -> list[Row]:
    from unigrpo.rollout.generate import generate_reasoning

    R, T = case.rows, case.decode_tokens
    text = ("a red circle left of two blue squares " * 8)[:case.prompt_tokens - 2]  # + bos, sor
    prompts = [text] * R
    pkw = dict(suite=NAME, op="decode", provider="torch", mode="text",
               shape=f"{case.label} R={R} prompt={case.prompt_tokens} T={T}", dtype=case.dtype)
    state = {}

    def fn(_):
        gen = torch.Generator(device=ctx.device).manual_seed(2)
        state["r"] = generate_reasoning(model, tok, prompts, temperature=1.0, max_new_tokens=T, generator=gen)

    # one untimed warm-up call inside time_ms; the token count comes from the last call (same seed: same run)
    ms = time_ms(ctx, fn)
    sync(ctx.device)
    r = state["r"]
    n = r.mask_BT.sum(1).tolist()
    flops = _flops(model.cfg, prompt=[len(x) for x in r.prompt_ids], reasoning=n, steps=0,
                   cfg_scale=1.0)["rollout_text"]
    tokens = sum(n)
    extra = {"tokens/s": tokens / (ms[1] * 1e-3), "tokens": tokens, "decode steps": r.tokens_BT.shape[1],
             "includes": "prefill"}
    ctx.log(f"  {pkw['shape']} [decode]: {ms[1]:.4g} ms, {extra['tokens/s']:.4g} tokens/s")
    return [make_row(ctx, ms=ms, work=flops, unit="TFLOP/s", ceiling="matmul", check_ratio=0.0,
                     note="eager KV-cached decoding (one host sync per token)", extra=extra, **pkw)]
