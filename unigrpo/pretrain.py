"""Supervised pre-training of the base model on the shapes world (`unigrpo pretrain`).

Per example: a train prompt, a layout plan (with probability `flaw_prob` a flawed one, so the reasoning has
room to improve under RL), and the render of that plan. Losses:
- text: next-token cross-entropy on the reasoning tokens (plan + EOS) given the prompt;
- image: flow-matching MSE ||v_θ(x_σ, σ) − (ε − x0)||² with σ ~ logit-normal(0, 1) (ALGORITHM.md §2),
  on `blocks_per_sample` noise blocks per example (independent σ, one packed forward);
- with probability `p_uncond` an example's text is replaced by the empty context (no text loss), so
  classifier-free guidance is available at evaluation;
- with probability `edit_fraction` the example is a two-round editing episode of the world's train split
  (ALGORITHM.md §12): [prompt, plan¹] W noise blocks of x¹, x¹ clean, [instruction, edited plan] W noise
  blocks of x², so the base learns the round-2 format: both plans' tokens and both images' flow losses.
`init` starts from an existing checkpoint (e.g. the shipped single-round base) instead of a fresh model.
Writes a base checkpoint (safetensors + JSON config, atomically) and evaluates it on held-out prompts.

Legend: B examples, S packed tokens, W noise blocks per example.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from unigrpo.checkpoint import save_checkpoint
from unigrpo.config import (config_to_dict, load_config, require_min, require_positive, require_range,
                            resolve_config_path)
from unigrpo.model import PackedLayout, Segment, episode_document, padded_ids, preset
from unigrpo.model.build import build_bundle, load_bundle
from unigrpo.model.layout import NOISE
from unigrpo.world import edit_pretrain_example, make_edit_tasks, make_prompts, pretrain_example
from unigrpo.world.render import to_float


@dataclass
class PretrainConfig:
    model: str = "tiny"
    """model preset"""
    out: str = "runs/tiny/base"
    """checkpoint directory to write"""
    steps: int = 700
    """optimizer steps"""
    batch: int = 32
    """examples per step"""
    blocks_per_sample: int = 4
    """noise blocks (independent σ) per example in the packed forward"""
    lr: float = 2e-3
    """peak AdamW learning rate"""
    warmup: int = 50
    """linear warm-up steps, then cosine decay to 10%"""
    weight_decay: float = 0.01
    """AdamW weight decay"""
    grad_clip: float = 1.0
    """gradient-norm clip"""
    flaw_prob: float = 0.3
    """fraction of flawed plans in the data"""
    p_uncond: float = 0.1
    """probability of dropping the text condition (enables CFG)"""
    image_weight: float = 1.0
    """weight of the flow-matching loss against the text loss"""
    edit_fraction: float = 0.0
    """fraction of two-round editing episodes in the data (the round-2 format, ALGORITHM.md §12)"""
    edit_flaw_prob: float = 0.0
    """fraction of the episodes whose round-2 plan is flawed (world/edit.py: the edit ignored, or a flaw of
    corrupt_layout); round 1 of an episode is never flawed"""
    init: str = ""
    """checkpoint to start from: "" = a fresh `model` preset, "shipped" = the shipped tiny base, or a path"""
    seed: int = 0
    """seed of data, initialisation and noise"""
    threads: int = 0
    """torch CPU threads (0 = torch's default)"""
    log_every: int = 50
    """steps between log lines"""
    eval_samples: int = 256
    """held-out samples evaluated at the end (0 = skip)"""

    def __post_init__(self):
        for name in ("steps", "batch", "blocks_per_sample"):
            require_min(f"pretrain.{name}", getattr(self, name), 1)
        require_positive("pretrain.lr", self.lr)
        for name in ("flaw_prob", "p_uncond", "edit_fraction", "edit_flaw_prob"):
            require_range(f"pretrain.{name}", getattr(self, name), 0, 1)
        preset(self.model)  # unknown preset names fail here, before any work


def lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def make_batch(bundle, prompts, rng: np.random.Generator, cfg: PretrainConfig, gen: torch.Generator, tasks=()):
    """One packed training batch: (layout, text ids [B, S], targets [B, S] (-100 = no loss), latents of every
    image block [M, ...] (x_σ for noise blocks, clean x¹ for an episode's full block), σ [M], target v of the
    noise blocks, the noise blocks' indices among the M). Example i is an editing episode when tasks[i] is
    not None."""
    tok, mcfg = bundle.tokenizer, bundle.model.cfg
    W, N = cfg.blocks_per_sample, mcfg.image_tokens
    docs, ids, tgts, images = [], [], [], []   # images: per example, per round (the clean x¹ is round 1's)
    empty = tok.encode_prompt("") + tok.encode_reasoning("")
    for i, p in enumerate(prompts):
        task = tasks[i] if i < len(tasks) else None
        if task is not None:
            plan1, img1, plan2, img2 = edit_pretrain_example(task, rng, canvas=mcfg.image_size,
                                                               flaw_prob=cfg.edit_flaw_prob)
            rounds = [(tok.encode_prompt(task.source.text), tok.encode_reasoning(plan1)),
                      (tok.encode_prompt(task.instruction), tok.encode_reasoning(plan2))]
            imgs = [img1, img2]
        else:
            plan, image = pretrain_example(p, rng, cfg.flaw_prob, canvas=mcfg.image_size)
            rounds = [(empty, []) if rng.random() < cfg.p_uncond else (tok.encode_prompt(p.text),
                                                                       tok.encode_reasoning(plan))]
            imgs = [image]
        seq, target = [], []
        for k, (ctx, o) in enumerate(rounds):
            text = (ctx + o)[:mcfg.max_text_len]
            t = [-100] * len(text)
            for j in range(len(ctx) - 1, len(text) - 1):  # position j predicts token j + 1 (a reasoning token)
                t[j] = text[j + 1]
            fill = W * N + (N if k < len(rounds) - 1 else 0)
            seq += text + [tok.pad_id] * fill
            target += t + [-100] * fill
            rounds[k] = len(text)
        docs.append([episode_document(rounds, W, N)] if task is not None else [[Segment("text", rounds[0])]
                                                                                + [Segment("noise", N)] * W])
        ids.append(seq)
        tgts.append(target)
        images.append(imgs)
    layout = PackedLayout.build(docs)
    ids_BS, tgt_BS = padded_ids(ids, layout.shape, tok.pad_id), padded_ids(tgts, layout.shape, -100)
    flat = [im for imgs in images for im in imgs]
    x0 = bundle.codec.encode(to_float(np.stack(flat)))
    first = np.cumsum([0] + [len(imgs) for imgs in images])[:-1]
    # the noise blocks' clean latents in block order (W per round); σ and ε drawn for all of them at once
    x_noise = torch.cat([x0[f + k:f + k + 1].expand(W, *x0.shape[1:]) for f, imgs in zip(first, images)
                         for k in range(len(imgs))])
    sigma = torch.sigmoid(torch.randn(x_noise.shape[0], generator=gen))
    eps = torch.randn(x_noise.shape, generator=gen)
    s = sigma[:, None, None, None]
    noisy = (1 - s) * x_noise + s * eps
    noise_idx = torch.tensor([m for m, kind in enumerate(layout.block_kinds) if kind == NOISE])
    clean = [x0[f + k] for f, imgs in zip(first, images) for k in range(len(imgs) - 1)]   # x¹ of each episode
    lat = torch.empty((len(layout.block_kinds),) + tuple(x0.shape[1:]))
    sig_M = torch.zeros(len(layout.block_kinds))
    lat[noise_idx], sig_M[noise_idx] = noisy, sigma
    if clean:
        full = torch.tensor([m for m, kind in enumerate(layout.block_kinds) if kind != NOISE])
        lat[full] = torch.stack(clean)
    return layout, ids_BS, tgt_BS, lat, sig_M, eps - x_noise, noise_idx


def run_pretrain(cfg: PretrainConfig, progress: bool = True) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    init = SHIPPED_BASE if cfg.init == "shipped" else cfg.init
    bundle = load_bundle(init) if init else build_bundle(preset(cfg.model))
    model = bundle.model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    pool = make_prompts("train", 8192, seed=cfg.seed)
    edits = make_edit_tasks("train", 8192, seed=cfg.seed) if cfg.edit_fraction > 0 else []
    os.makedirs(cfg.out, exist_ok=True)
    log_path = os.path.join(os.path.dirname(os.path.abspath(cfg.out)), "pretrain_log.jsonl")
    log = open(log_path, "w")
    t0 = time.time()
    bar = tqdm(range(cfg.steps), desc="pretrain", disable=not progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        batch = [pool[i] for i in rng.integers(0, len(pool), cfg.batch)]
        tasks = ([edits[int(rng.integers(len(edits)))] if rng.random() < cfg.edit_fraction else None
                  for _ in batch] if edits else [])
        layout, ids, tgt, x_sigma, sigma, v_target, noise = make_batch(bundle, batch, rng, cfg, gen, list(tasks))
        hidden, v = model.forward_packed(layout, ids, x_sigma, sigma)
        sel = tgt >= 0
        text_loss = F.cross_entropy(model.logits(hidden[sel]).float(), tgt[sel])
        image_loss = F.mse_loss(v[noise].float(), v_target)
        loss = text_loss + cfg.image_weight * image_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            rec = {"step": step, "text_ce": text_loss.item(), "flow_mse": image_loss.item(),
                   "grad_norm": gnorm.item(), "lr": lr_at(step, cfg), "time_s": round(time.time() - t0, 1)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(ce=f"{rec['text_ce']:.3f}", mse=f"{rec['flow_mse']:.3f}")
    log.close()
    train_time = time.time() - t0
    config = bundle.checkpoint_config()
    config["pretrain"] = config_to_dict(cfg)
    save_checkpoint(cfg.out, model_state=model.state_dict(), config=config,
                    meta={"kind": "base", "steps": cfg.steps, "train_time_s": round(train_time, 1)})
    return {"checkpoint": cfg.out, "train_time_s": train_time, "log": log_path}


SHIPPED_BASE = os.path.join(os.path.dirname(__file__), "assets", "tiny_base")
"""the tiny base checkpoint shipped with the package (made by `unigrpo pretrain --config tiny_pretrain`, then
`unigrpo pretrain --config tiny_pretrain_stage2`: PRETRAIN_CONFIGS)"""
SHIPPED_EDIT_BASE = os.path.join(os.path.dirname(__file__), "assets", "tiny_edit_base")
"""the editing base shipped with the package (`unigrpo pretrain --config tiny_edit_pretrain`, then
`unigrpo pretrain --config tiny_edit_pretrain_stage2`: PRETRAIN_CONFIGS)"""
SHIPPED_BASES = {os.path.normpath("runs/tiny/base"): SHIPPED_BASE,
                 os.path.normpath("runs/tiny/edit_base"): SHIPPED_EDIT_BASE}
"""the bundled configs' default base paths → the shipped checkpoint `unigrpo train` copies there when absent"""
PRETRAIN_CONFIGS = {SHIPPED_BASE: ("tiny_pretrain", "tiny_pretrain_stage2"),
                    SHIPPED_EDIT_BASE: ("tiny_edit_pretrain", "tiny_edit_pretrain_stage2")}
"""each shipped checkpoint → the bundled pre-training configs that make it, run in order (each stage after
the first continues from the previous stage's checkpoint)"""


def copy_shipped_base(base: str) -> bool:
    """When `base` is a bundled config's default path with no checkpoint there, copy the shipped one there
    (single process only: under torchrun every rank would copy). Returns whether it copied."""
    shipped = SHIPPED_BASES.get(os.path.normpath(base))
    if (shipped is None or os.path.exists(os.path.join(base, "model.safetensors"))
            or not os.path.exists(os.path.join(shipped, "model.safetensors")) or int(os.environ.get("WORLD_SIZE", 1)) > 1):
        return False
    print(f"copying the shipped base checkpoint ({shipped}) to {base}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
    shutil.copytree(shipped, base, dirs_exist_ok=True)
    return True


def ensure_base(base: str, *, pretrain: bool = False, source: str = "runs/tiny/base") -> str:
    """Make sure a tiny base checkpoint exists at `base`: kept when it is there (unless `pretrain`), else the
    checkpoint `source` stands for copied there: `source` itself when it holds one, else for a bundled
    config's default path (SHIPPED_BASES: the plain or the editing base) the shipped one, else (or with
    `pretrain`) pre-trained now with that base's bundled configs (PRETRAIN_CONFIGS; the plain base's for any other
    source). Returns "existing", "copied" or "pretrained"."""
    if os.path.exists(os.path.join(base, "model.safetensors")) and not pretrain:
        print(f"using the base checkpoint at {base}", flush=True)
        return "existing"
    shipped = SHIPPED_BASES.get(os.path.normpath(source))
    found = [d for d in ([] if pretrain else [source, shipped])
             if d and os.path.exists(os.path.join(d, "model.safetensors"))]
    if found and os.path.abspath(found[0]) != os.path.abspath(base):
        print(f"copying the base checkpoint {found[0]} to {base}", flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
        shutil.copytree(found[0], base, dirs_exist_ok=True)
        return "copied"
    if shipped is None and not pretrain:
        raise FileNotFoundError(f"no base checkpoint at {source} (model.safetensors) to start from; train or "
                                "pre-train one there, or point `base` at one")
    for i, name in enumerate(PRETRAIN_CONFIGS.get(shipped, PRETRAIN_CONFIGS[SHIPPED_BASE])):
        pcfg = load_config(PretrainConfig, resolve_config_path(name),
                           [f"out={base}", "eval_samples=0"] + ([f"init={base}"] if i else []))
        print(f"pre-training a base checkpoint at {base} ({name}, {pcfg.steps} steps)", flush=True)
        run_pretrain(pcfg)
    return "pretrained"
