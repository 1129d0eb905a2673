"""The `step` suite: whole UniGRPO iterations (rollout → reward → advantages → old/ref recompute → K epochs)
of unigrpo.trainer.Trainer on a randomly initialised model, torch backend against the fused ones.

Rows (one per provider and phase; `mode` names the phase): "iteration" (wall time of Trainer.iteration(),
synchronised), and the trainer's own split "rollout_text", "rollout_image", "reward" (decode + verifier +
advantages), "train" (old/ref recompute + K epochs). p20/p50/p80 over the timed iterations (2–3: few, so
read them as a range), after warm-up iterations that are excluded (and that the check uses).

Model FLOPs (what "TFLOP/s" and the fraction of the matmul ceiling — the MFU — count). Per token, a layer's
expert does 2·P FLOPs with P = its matmul weights (q, k, v, o, gate, up, down: 2H² + 2·H·kv_dim + 3·H·I);
norms, biases, RoPE, softmax, embeddings and the VAE/verifier are not counted:
- N_text = layers·P (+ lm_head V·H on each position whose logits are used: the sampled / trained reasoning
  tokens); N_image = layers·P + 2·patch_dim·H (image in/out projections). Tokens use one expert (MoT).
- attention: 4·H FLOPs per (query, key) pair per layer (QKᵀ and AV); text is causal (t(t+1)/2 pairs for a
  text of t = prompt + reasoning tokens), an image block of I tokens sees the text and itself (I·(t + I)).
- rollout_text: 2·N_text·t + lm_head + attention, per sample (prefill + KV-cached decoding, useful tokens
  only: padding and finished rows are not counted).
- rollout_image: steps × (2·N_image·I + attention over t + I), per sample (×2 with CFG in training).
- train: one packed forward F = text part + W image blocks per trajectory, run without grad for the
  recomputed old log-probs and for the reference (when the config uses them), then K epochs of
  forward + backward = 3F (the usual 6·N·tokens).
- multi-round episodes (the "R=2" case, `data.train=shapes_edit`): round r's text (instruction + reasoning)
  also attends to the context c before it (earlier rounds' text and clean images: t·c more pairs), its image
  blocks to c + t + I; each round but the last adds one clean-block forward x̄^r (in rollout_image, and once
  in F), and F holds W noise blocks per round. The 3F of an epoch still counts the clean blocks' backward,
  which `edit.history_grad: false` skips (2·epochs·(R − 1) clean-block forwards too many, about
  (R − 1)/(R·W + R − 1) of the image part).
Token counts are read exactly from each iteration's trajectories (the suite wraps the `rollout` name inside
unigrpo.trainer for the duration of a run and restores it; no library code changes).
samples/s = trajectories (B·G) / iteration time; tokens/s = packed training tokens (Σ over trajectories of
prompt + reasoning + W·I, per round, + I per clean block) / iteration time.

Model and settings:
- GPU: the `small` preset's transformer (hidden 1024, 16 layers, vocab 32768). `small` itself is 256 px
  through a FLUX-style VAE (16 × 32 × 32 latent, 256 image tokens) that this version cannot build (codec
  "flux-vae" raises), so the bench overrides it — here only, presets unchanged — to the pixel codec at 256 px
  with latent 48 × 64 × 64 and patch 1: 64 × 64 = 4096 image tokens, the paper's 1024-px token count, with
  D = 196,608 (0.75× the paper's 262,144). G = 24 (the paper's group), N = 25, W = 3, K = 2, one prompt.
- CPU: the `tiny` preset (hidden 192, 4 layers, 16 image tokens, D = 3072) at a tiny batch, marked CPU.
- Random weights (seed 0; the zero-initialised output projection gets N(0, 0.02) so velocities are not 0),
  saved to a temporary base checkpoint because the Trainer loads its policy from a directory.
  skip_zero_std = false so every iteration trains on every trajectory (a random model's groups often have
  equal rewards); reasoning is capped by max_new_tokens (a random model rarely emits EOS).
- Backends: TrainConfig's `flow_backend` / `text_backend`: provider "torch" sets both to torch; a fused
  provider X sets flow_backend = X and text_backend = X when the text ops have X (else the best available).
  The device is TrainConfig's `dist.device` ("cuda" on a GPU, one process: no FSDP).
- MFU on GPU divides by the bf16 matmul ceiling whatever the weights' dtype (the row's dtype column).
- Check: each fused provider's first (warm-up) iteration must match torch's from the same base and seed:
  |Δ loss| ≤ 1e-3 and |Δ reward/mean| ≤ 0.05 (kernel rounding carried through the rollout and K epochs).
- peak_mem_mib: GPU — peak allocated memory of the process during the timed iterations (model, optimizer,
  activations); CPU — the process's maximum resident set (ru_maxrss), the whole process.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass

import torch

from ..context import Context, Row, make_row
from ..timing import sync

NAME = "step"
DESCRIPTION = "whole UniGRPO iterations (rollout, reward, K epochs) on a random model: torch vs fused backends"

PHASES = ("iteration", "rollout_text", "rollout_image", "reward", "train")
_LOSS_TOL, _REWARD_TOL = 1e-3, 0.05


@dataclass
class StepCase:
    label: str
    """the model: a preset name, or a name for a preset with bench-only overrides"""
    preset: str
    overrides: dict
    prompts: int
    """B: prompts per iteration"""
    rollout: dict
    """RolloutConfig fields"""
    optim: dict
    """OptimConfig fields"""
    warmup: int = 1
    iters: int = 3
    train: str = "shapes"
    """DataConfig.train: "shapes_edit" makes every trajectory a two-round editing episode (ALGORITHM.md §12)"""

    @property
    def name(self) -> str:
        return self.shape

    @property
    def shape(self) -> str:
        r = self.rollout
        rounds = " R=2" if self.train == "shapes_edit" else ""
        return (f"{self.label} B={self.prompts} G={r['group_size']} N={r['steps']} W={r['window_size']}{rounds} "
                f"K={self.optim['epochs']}")


# 4096 image tokens of 48 values: the paper's token count per image (see the module docstring)
SMALL_4096_TOKENS = dict(codec="pixel", image_size=256, latent_size=64, latent_channels=48, patch=1)


def cases(ctx: Context) -> list[StepCase]:
    """One single-round case and its two-round editing counterpart (the same settings per round; GPU --quick:
    the single round only)."""
    if ctx.is_cuda:
        G, N, iters = (8, 10, 2) if ctx.quick else (24, 25, 3)
        one = StepCase("small-4096tok", "small", SMALL_4096_TOKENS, prompts=1,
                       rollout=dict(group_size=G, steps=N, window_size=3, window_hi=5, max_new_tokens=128),
                       optim=dict(epochs=2, minibatch=2), warmup=1, iters=iters)
    elif ctx.quick:
        one = StepCase("tiny", "tiny", {}, prompts=1,
                       rollout=dict(group_size=4, steps=8, window_size=3, window_hi=5, max_new_tokens=24),
                       optim=dict(epochs=2, minibatch=4), warmup=1, iters=2)
    else:
        one = StepCase("tiny", "tiny", {}, prompts=2,
                       rollout=dict(group_size=8, steps=25, window_size=3, window_hi=5, max_new_tokens=48),
                       optim=dict(epochs=2, minibatch=16), warmup=1, iters=3)
    if ctx.is_cuda and ctx.quick:   # the device check's 15 s for this suite hold the single round only
        return [one]
    return [one, dataclasses.replace(one, train="shapes_edit")]


# ------------------------------------------------------------------------------------------------ FLOPs

def model_flops(mcfg, counts: dict, *, steps: int, window: int, epochs: int, cfg_scale: float,
                nograd_forwards: int) -> dict[str, float]:
    """Model FLOPs of one iteration by phase (the module docstring's counting). counts: "prompt" and
    "reasoning" token counts, per trajectory a list of one int per round (the prompt, then each later round's
    instruction)."""
    H, L, V, I = mcfg.hidden, mcfg.layers, mcfg.vocab_size, mcfg.image_tokens
    kv_dim = mcfg.kv_heads * mcfg.head_dim
    P = 2 * H * H + 2 * H * kv_dim + 3 * H * mcfg.intermediate
    n_text, n_img = L * P, L * P + 2 * mcfg.patch_dim * H
    attn = 4 * H * L
    rt = ri = fwd = 0.0
    for prompts, reasonings in zip(counts["prompt"], counts["reasoning"]):
        for r, (t, n, pairs_t, pairs_i) in enumerate(round_pairs(prompts, reasonings, I)):
            text = 2 * n_text * t + 2 * V * H * n + attn * pairs_t
            image = 2 * n_img * I + attn * pairs_i
            clean = image if r < len(prompts) - 1 else 0.0  # x̄^r as a clean block for the later rounds
            rt += text
            ri += steps * image * (2 if cfg_scale != 1.0 else 1) + clean
            fwd += text + window * image + clean
    train = (nograd_forwards + 3 * epochs) * fwd
    return {"rollout_text": rt, "rollout_image": ri, "reward": None, "train": train,
            "iteration": rt + ri + train}


def round_pairs(prompts: list[int], reasonings: list[int], image_tokens: int) -> list[tuple[int, int, int, int]]:
    """Per round of one trajectory: (text tokens t, reasoning tokens n, attention pairs of the round's text,
    attention pairs of one image block of the round). Round r's text (causal) sees the context c before it
    (earlier rounds' text and clean images); its image blocks see c + t and themselves."""
    out, c, I = [], 0, image_tokens
    for p, n in zip(prompts, reasonings):
        t = p + n
        out.append((t, n, t * c + t * (t + 1) // 2, I * (c + t + I)))
        c += t + I
    return out


@contextlib.contextmanager
def capture_rollout_counts(sink: list):
    """Wrap the rollout entry unigrpo.trainer calls (`rollout_in_batches`, or `rollout`) so each iteration's token
    counts land in `sink`; restored on exit."""
    import unigrpo.trainer as tr

    name = "rollout_in_batches" if hasattr(tr, "rollout_in_batches") else "rollout"
    orig = getattr(tr, name, None)
    if orig is None:  # the trainer was refactored: no exact counts, no FLOPs
        yield
        return

    def wrapped(*args, **kwargs):
        traj = orig(*args, **kwargs)
        ep, mask = traj.episode, traj.reasoning.mask_BT
        if ep is None:
            sink.append({"prompt": [[len(x)] for x in traj.reasoning.prompt_ids],
                         "reasoning": [[n] for n in mask.sum(1).tolist()]})
        else:
            sink.append({"prompt": [[len(x)] + [len(c) for c in later]
                                    for x, later in zip(traj.reasoning.prompt_ids, ep.instruction_ids)],
                         "reasoning": ep.reasoning_lengths(mask).tolist()})
        return traj

    setattr(tr, name, wrapped)
    try:
        yield
    finally:
        setattr(tr, name, orig)


# ------------------------------------------------------------------------------------------------- run

def _providers(ctx: Context, fields: set[str]) -> list[tuple[str, dict, str]]:
    """(provider name, TrainConfig backend fields, note): torch, then each fused flow backend available and
    wanted, with the same backend for the text ops when they have it (else the best available)."""
    from unigrpo_kernels import available_backends, resolve_backend

    if {"flow_backend", "text_backend"} <= fields:
        out = [("torch", {"flow_backend": "torch", "text_backend": "torch"}, "flow=torch text=torch")]
        text_avail = available_backends(ctx.device, op="token_logprobs")
        for be in available_backends(ctx.device, op="flow_grpo_loss"):
            if be == "torch" or not ctx.wants(be):
                continue
            text_be = be if be in text_avail else resolve_backend("auto", ctx.device, op="token_logprobs")
            note = f"flow={be} text={text_be}"
            if be == "triton" and not ctx.is_cuda:
                note += " (Triton CPU interpreter: not a speed figure)"
            out.append((be, {"flow_backend": be, "text_backend": text_be}, note))
        return out
    raise ValueError("TrainConfig has no flow_backend/text_backend fields: the step suite compares backends "
                     "through them")


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    t = torch.tensor(xs, dtype=torch.float64)
    return tuple(float(torch.quantile(t, q)) for q in (0.2, 0.5, 0.8))


def run(case: StepCase, ctx: Context) -> list[Row]:
    from unigrpo.checkpoint import save_checkpoint
    from unigrpo.model.build import build_bundle
    from unigrpo.model.config import preset
    from unigrpo.trainer import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = dict(suite=NAME, op="unigrpo_iteration", shape=case.shape)
    if ctx.is_cuda and "dist" not in fields:
        note = "skipped: TrainConfig has no `dist.device` field (the Trainer runs on CPU only)"
        ctx.log(f"  {note}")
        return [make_row(ctx, provider="torch", mode="iteration", dtype="fp32", note=note, **kw)]
    tmp = tempfile.mkdtemp(prefix="unigrpo-bench-step-")
    rows: list[Row] = []
    try:
        torch.manual_seed(0)
        bundle = build_bundle(preset(case.preset, **case.overrides))
        torch.nn.init.normal_(bundle.model.image_out.weight, std=0.02)
        info = {"params": f"{bundle.model.num_params() / 1e6:.1f}M "
                          f"({bundle.model.num_params(active=True) / 1e6:.1f}M active)",
                "dtype": str(next(bundle.model.parameters()).dtype).replace("torch.", "").replace("float32", "fp32"),
                "base": os.path.join(tmp, "base"), "tmp": tmp, "fields": fields}
        save_checkpoint(info["base"], model_state=bundle.model.state_dict(), config=bundle.checkpoint_config())
        del bundle
        ref: dict = {}
        for name, backend_kw, note in _providers(ctx, fields):
            pkw = dict(kw, provider=name, dtype=info["dtype"])
            try:
                rows += _run_provider(case, ctx, name, backend_kw, note, info, ref, pkw)
            except Exception as err:  # a provider that crashes is a failed provider, not a crashed run
                msg = f"raised {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                ctx.log(f"  FAIL {case.name} [{name}]: {msg}")
                rows.append(make_row(ctx, mode="iteration", ok=False, check_ratio=float("inf"),
                                     note=f"check failed: {msg}", **pkw))
            gc.collect()
            if ctx.is_cuda:
                torch.cuda.empty_cache()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def _run_provider(case: StepCase, ctx: Context, name: str, backend_kw: dict, note: str, info: dict, ref: dict,
                  pkw: dict) -> list[Row]:
    """Warm-up (checked against torch's), then the timed iterations of one provider → its PHASES rows."""
    from unigrpo.rollout.rollout import RolloutConfig
    from unigrpo.trainer import OptimConfig, TrainConfig, Trainer

    extra_cfg = dict(backend_kw)
    if "dist" in info["fields"]:
        from unigrpo.distributed import DistConfig
        extra_cfg["dist"] = DistConfig(device="cuda" if ctx.is_cuda else "cpu")
    from unigrpo.data import DataConfig

    cfg = TrainConfig(base=info["base"], out=os.path.join(info["tmp"], f"run-{name}"), iterations=10**9,
                      data=DataConfig(train=case.train, eval=case.train),
                      prompts_per_iter=case.prompts, rollout=RolloutConfig(**case.rollout),
                      optim=OptimConfig(**case.optim), skip_zero_std=False, resume=False,
                      checkpoint_every=10**9, seed=0, **extra_cfg)
    trainer = Trainer(cfg, progress=False)
    counts: list[dict] = []
    times: dict[str, list[float]] = {p: [] for p in PHASES}
    flops: dict[str, list[float]] = {p: [] for p in PHASES}
    with capture_rollout_counts(counts):
        warm = [trainer.iteration() for _ in range(case.warmup)]
        ratio, check_note = 0.0, "reference"
        if name == "torch":
            ref.update(warm[0])
        elif ref:
            dl = abs(warm[0].get("loss", 0.0) - ref.get("loss", 0.0))
            dr = abs(warm[0]["reward/mean"] - ref["reward/mean"])
            ratio = max(dl / _LOSS_TOL, dr / _REWARD_TOL)
            check_note = f"Δloss {dl:.2e} (tol {_LOSS_TOL:g}), Δreward {dr:.3f} (tol {_REWARD_TOL:g})"
            if not ratio <= 1.0:
                ctx.log(f"  FAIL {case.name} [{name}]: {check_note}")
                return [make_row(ctx, mode="iteration", ok=False, check_ratio=ratio,
                                 note=f"check failed: {check_note}", **pkw)]
        else:
            ratio, check_note = None, "not checked (torch did not run)"
        if ctx.is_cuda:
            torch.cuda.reset_peak_memory_stats()
        del counts[:]
        for _ in range(case.iters):
            sync(ctx.device)
            t0 = time.perf_counter()
            m = trainer.iteration()
            sync(ctx.device)
            times["iteration"].append((time.perf_counter() - t0) * 1e3)
            for p in PHASES[1:]:
                times[p].append(m[f"time/{p}"] * 1e3)
            if counts:
                f = model_flops(trainer.policy.cfg, counts[-1], steps=cfg.rollout.steps,
                                window=cfg.rollout.window_size, epochs=cfg.optim.epochs,
                                cfg_scale=cfg.rollout.cfg_scale,
                                nograd_forwards=int(cfg.recompute_old) + int(trainer.ref is not None))
                for p in PHASES:
                    flops[p].append(f[p])
    if ctx.is_cuda:
        peak, mem_note = torch.cuda.max_memory_allocated() / 2**20, "GPU peak allocated"
    else:
        peak, mem_note = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process max RSS"
    R = case.prompts * case.rollout["group_size"]
    I, W = trainer.policy.cfg.image_tokens, case.rollout["window_size"]
    it_ms = _quantiles(times["iteration"])
    rounds = len(counts[-1]["prompt"][0]) if counts else 1
    packed = (sum(map(sum, counts[-1]["prompt"])) + sum(map(sum, counts[-1]["reasoning"]))
              + R * (rounds * W + rounds - 1) * I) if counts else None
    rows = []
    for p in PHASES:
        ms = _quantiles(times[p])
        work = sorted(flops[p])[len(flops[p]) // 2] if flops[p] and flops[p][0] is not None else None
        extra = {"share": ms[1] / it_ms[1]} if p != "iteration" else {
            "samples/s": R / (it_ms[1] * 1e-3), **({"tokens/s": packed / (it_ms[1] * 1e-3)} if packed else {}),
            "params": info["params"], "backends": note, "mem": mem_note}
        rows.append(make_row(ctx, mode=p, ms=ms, work=work, unit="TFLOP/s" if work else None, ceiling="matmul",
                             peak_mem_mib=peak if p == "iteration" else None, check_ratio=ratio,
                             note=check_note if p == "iteration" else "", extra=extra, **pkw))
    ctx.log(f"  {case.name} [{name}]: {it_ms[1]:.4g} ms/iteration, {R / (it_ms[1] * 1e-3):.3g} samples/s"
            + (f", {rows[0].value:.3g} TFLOP/s" if rows[0].value else ""))
    return rows
