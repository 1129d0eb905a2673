"""The UniGRPO trainer (ALGORITHM.md §5–§9): rollout → reward → group advantages → old/reference recompute →
K PPO epochs of the unified objective in mini-batches → AdamW with the two expert groups.

One packed training forward per trajectory serves both parts: [prompt + reasoning] (causal) followed by the W
noisy window latents, each its own block that sees the text and itself (PackedLayout). It yields the
reasoning-token log-probs and the W velocities at once; the frozen reference runs the same packed forward
without gradients for v_ref. The text side runs inside the forward (`text_head`, where FSDP has lm_head
gathered): token_logprobs for the no-grad recomputes, and in training linear_text_grpo_loss, hidden states
→ GRPO text loss in one call (its triton backend never holds the [tokens × vocab] logits).

Decisions:
- Old log-probs are recomputed with a no-grad forward of this same code path (`recompute_old`, default on),
  so rollout-vs-training mismatch never enters a ratio; the largest mismatch seen is logged
  ("mismatch/text_logp_max", "mismatch/flow_logp_max"). Then ξ = (x' − μ_old)/s with μ_old from the recomputed
  v_old. With recompute off, v_old = (x' − s·ξ − a·x)/b from the rollout's own noise (exact algebra).
- L = L_text + λ·L_flow + β·L_mse (§9). flow_grpo_loss carries β·reg itself, so it is called with β/λ and
  scaled by λ (λ = 0 drops the flow part and its regulariser).
- Ablations: `train_text = false` (FlowGRPO only: no L_text, text expert frozen); `train_image = false`
  (TextGRPO only: λ = 0, image expert frozen).
- Zero-std groups carry no signal (§5) and are dropped before training (`skip_zero_std`).
- Resumable: a checkpoint holds the policy weights, the optimizer, every RNG state and the step; resuming
  continues exactly (tests/test_trainer.py checks a bit-identical next step on CPU).

Legend: R trajectories, W window steps, T reasoning tokens, M = R·W image blocks, D latent elements.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
import warnings

import numpy as np
import torch
from tqdm import tqdm

from unigrpo.checkpoint import get_rng_state, load_checkpoint, load_state_strict, save_checkpoint, set_rng_state
from unigrpo.config import config_to_dict
from unigrpo.data import build_prompt_source, check_prompt_lengths, tag_order
from unigrpo.distributed import (all_gather_objects, full_model_state, full_optimizer_state, init_distributed,
                                 load_full_model_state, load_full_optimizer_state, mean_metrics, optimizer_offloaded,
                                 unsharded)
from unigrpo.distributed.loading import load_sharded_bundle
from unigrpo.distributed.sharded_checkpoint import is_dcp_checkpoint, load_sharded, save_sharded
from unigrpo.losses.config import LossConfig, ReFLConfig
from unigrpo.losses.packing import PackedBatch, chunks, pack, pack_unconditional
from unigrpo.model import no_text_head
from unigrpo.model.attention import resolve_attention_backend
from unigrpo.model.build import load_bundle
from unigrpo.model.codec import PixelCodec
from unigrpo.rewards.advantages import group_advantages, group_has_signal
from unigrpo.rewards.registry import RewardSet
from unigrpo.rewards.surrogate import check_surrogate_records, surrogate_reward_of
from unigrpo.rollout.rollout import Trajectories, check_rollout_batch, draw_windows, rollout_in_batches
from unigrpo.train_config import OptimConfig, TrainConfig
from unigrpo_kernels import (flow_grpo_loss, gaussian_logprob, linear_text_grpo_loss, resolve_backend, sigma_schedule,
                             step_coeffs_batch, token_logprobs)

__all__ = ["Trainer", "TrainConfig", "OptimConfig", "LossConfig", "ReFLConfig"]


# ---------------------------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, cfg: TrainConfig, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if is_dcp_checkpoint(cfg.base):
            raise ValueError(f"base {cfg.base!r} is a sharded (DCP) checkpoint; consolidate it first with "
                             f"`unigrpo export checkpoint={cfg.base} out=DIR` and use DIR as the base")
        if not any(os.path.exists(os.path.join(cfg.base, f)) for f in ("model.safetensors", "llm_config.json")):
            raise FileNotFoundError(f"base checkpoint {cfg.base!r} not found (expected model.safetensors and "
                                    "config.json there, or a BAGEL directory with llm_config.json, ema.safetensors "
                                    "and ae.safetensors); run `unigrpo pretrain` or `unigrpo demo` first")
        self.env = env = init_distributed(cfg.dist.device)
        if cfg.prompts_per_iter % env.world:
            raise ValueError(f"prompts_per_iter={cfg.prompts_per_iter} must be a multiple of the world size "
                             f"{env.world} (each rank rolls out whole groups)")
        check_rollout_batch(cfg.dist.rollout_batch, cfg.rollout.group_size)
        torch.manual_seed(cfg.seed)
        need_ref = cfg.loss.reg != "none" or cfg.loss.kl_coef > 0
        if env.enabled:   # built on meta, sharded, each rank reads only its rows (distributed/loading.py)
            self.bundle, self.policy, self.ref = load_sharded_bundle(cfg.base, cfg.dist, env.device,
                                                                     reference=need_ref)
        else:
            self.bundle = load_bundle(cfg.base)
            self.policy = self.bundle.model.to(env.device)
            self.ref = copy.deepcopy(self.policy).eval().requires_grad_(False) if need_ref else None
        dev = env.device
        self.flow_backend = resolve_backend(cfg.flow_backend, dev, op="flow_grpo_loss")
        self.text_backend = resolve_backend(cfg.text_backend, dev, op="token_logprobs")
        self.attn_backend = resolve_attention_backend(cfg.attention_backend, dev)
        if self.attn_backend == "flex" and dev.type != "cuda":
            raise ValueError("attention_backend='flex' needs a CUDA device (FlexAttention has no CPU backward); "
                             "use 'sdpa' or 'split' on CPU")
        self.policy.train()
        if cfg.method == "refl" and env.enabled:
            raise ValueError("method 'refl' is a single-process baseline; run it without torchrun")
        if cfg.method == "refl" and not isinstance(self.bundle.codec, PixelCodec):
            raise ValueError(f"method 'refl' back-propagates through the decoder, which needs the pixel codec; "
                             f"{cfg.base} uses {type(self.bundle.codec).__name__}")
        groups = self.policy.parameter_groups()
        for p in groups["text"]:
            p.requires_grad_(cfg.loss.train_text and cfg.method == "grpo")
        for p in groups["image"]:
            p.requires_grad_(cfg.loss.train_image)
        o = cfg.optim
        self.opt = torch.optim.AdamW(
            [{"params": groups["text"], "lr": o.lr_text, "name": "text"},
             {"params": groups["image"], "lr": o.lr_image, "name": "image"}],
            betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
        self.groups = groups
        self.rewards = RewardSet(cfg.rewards)
        self.source = build_prompt_source(cfg.data.train, "train", cfg.seed)
        check_prompt_lengths(self.source.records, self.bundle.tokenizer, self.policy.cfg.max_text_len)
        self.rewards.check_records(self.source.records)
        if cfg.method == "refl":   # its surrogate reads the prompts' shapes-world metadata
            check_surrogate_records(self.source.records)
        self.rng = np.random.default_rng(cfg.seed)
        # rank r samples from its own stream (rank 0's is the single-process one)
        self.gen = torch.Generator(device=dev).manual_seed(cfg.seed + 7919 * env.rank)
        self.sigmas = sigma_schedule(cfg.rollout.steps, cfg.rollout.shift)
        tok = self.bundle.tokenizer   # the context CFG contrasts with (generate.unconditional_cache)
        self.uncond_ids = tok.encode_prompt("") + tok.encode_reasoning("")
        self.step = 0
        os.makedirs(cfg.out, exist_ok=True)
        self.ckpt_dir = os.path.join(cfg.out, "checkpoint")
        if cfg.resume and (os.path.exists(os.path.join(self.ckpt_dir, "model.safetensors"))
                           or is_dcp_checkpoint(self.ckpt_dir)):
            self.load(self.ckpt_dir)

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | None = None):
        """A collective under FSDP. Under torchrun (dist.checkpoint_format "auto" or "dcp") a DCP checkpoint:
        every rank writes its shards (in the background with dist.async_save, except the run's last save);
        otherwise safetensors, gathered, rank 0 writes."""
        env = self.env
        gens = all_gather_objects(self.gen.get_state().cpu(), env)
        state = {"rng": get_rng_state(), "gen": gens[0], "gens": gens, "world": env.world,
                 "np_rng": self.rng.bit_generator.state, "step": self.step}
        config = self.bundle.checkpoint_config()
        config["train"] = config_to_dict(self.cfg)
        meta = {"kind": "unigrpo", "step": self.step, "world": env.world}
        fmt = self.cfg.dist.checkpoint_format
        if fmt == "dcp" or (fmt == "auto" and env.enabled):
            if getattr(self, "_pending_save", None) is not None:
                self._pending_save.finish()
            background = self.cfg.dist.async_save and self.step < self.cfg.iterations
            self._pending_save = save_sharded(path or self.ckpt_dir, self.policy, self.opt, config=config,
                                              trainer_state=state, meta=meta, async_save=background)
            return
        model_state = full_model_state(self.policy) if env.enabled else self.policy.state_dict()
        state["optimizer"] = full_optimizer_state(self.policy, self.opt)
        if env.is_main:
            save_checkpoint(path or self.ckpt_dir, model_state=model_state, config=config,
                            trainer_state=state, meta=meta)
        if env.enabled:
            torch.distributed.barrier()

    def load(self, path: str):
        """Resume from a checkpoint directory: DCP (any world size, resharded) or safetensors."""

        env = self.env
        if is_dcp_checkpoint(path):
            _, _, st = load_sharded(path, self.policy, self.opt)
            if st is None:
                raise ValueError(f"checkpoint {path} has no trainer state (trainer.pt); cannot resume from it")
        else:
            ck = load_checkpoint(path)
            if ck.trainer_state is None:
                raise ValueError(f"checkpoint {path} has no trainer state (trainer.pt); cannot resume from it")
            if env.enabled:
                load_full_model_state(self.policy, ck.model_state)
            else:
                load_state_strict(self.policy, ck.model_state)
            st = ck.trainer_state
            if all(isinstance(k, str) for k in st["optimizer"]["state"]):   # keyed by name: any world size
                load_full_optimizer_state(self.policy, self.opt, st["optimizer"])
            else:
                self.opt.load_state_dict(st["optimizer"])
        set_rng_state(st["rng"])
        if st.get("world", 1) == env.world:
            self.gen.set_state(st.get("gens", [st["gen"]])[env.rank].to(self.gen.get_state().device))
        else:  # another world size: the sampling streams cannot continue; start new ones from (seed, step, rank)
            self.gen.manual_seed(hash((self.cfg.seed, int(st["step"]), env.rank)) % 2**63)
            warnings.warn(f"checkpoint {path} was written at world size {st.get('world', 1)}, resuming at "
                          f"{env.world}: weights and optimizer state continue exactly, sampling streams restart")
        self.rng.bit_generator.state = st["np_rng"]
        self.step = int(st["step"])

    # ------------------------------------------------------------------ forward pieces
    def _forward(self, model, batch: PackedBatch, with_entropy: bool = False):
        """Packed forward → (text log-probs [n] (+ entropy [n]), velocities [M, C, h, w]). The log-probs run
        inside the model's forward (`text_head`), where FSDP has lm_head gathered."""
        def head(hidden, weight):
            h_sel = hidden.reshape(-1, hidden.shape[-1])[batch.text_pos]
            return token_logprobs(h_sel, weight, batch.text_tgt, temperature=self.cfg.rollout.temperature,
                                  return_entropy=with_entropy, backend=self.text_backend)

        text_out, v = model.forward_packed(batch.layout, batch.ids_BS, batch.latents_M, batch.sigma_M,
                                           text_head=head, backend=self.attn_backend)
        return text_out, self._guided(model, batch, v)

    def _guided(self, model, batch: PackedBatch, v_c: torch.Tensor) -> torch.Tensor:
        """The velocity the rollout sampled with: v_c itself, or with CFG in training rollouts
        (rollout.cfg_scale = w ≠ 1) v_u + w·(v_c − v_u), v_u from a second packed forward against the
        unconditional context (2 evaluations, as in the rollout), so the ratios compare one policy. fp32."""
        w = self.cfg.rollout.cfg_scale
        if w == 1.0:
            return v_c
        ub = pack_unconditional(batch, self.uncond_ids, self.policy.cfg.image_tokens, self.bundle.tokenizer.pad_id)
        _, v_u = model.forward_packed(ub.layout, ub.ids_BS, ub.latents_M, ub.sigma_M, backend=self.attn_backend,
                                      text_head=no_text_head)
        v_u = v_u.float()
        return v_u + w * (v_c.float() - v_u)

    def _scatter(self, values_n, batch: PackedBatch, R: int, T: int):
        out = torch.zeros(R * T, dtype=values_n.dtype, device=values_n.device)
        out[batch.text_slot] = values_n
        return out.view(R, T)

    # ------------------------------------------------------------------ one iteration
    def iteration(self) -> dict:
        cfg, rc = self.cfg, self.cfg.rollout
        t_start = time.perf_counter()
        env = self.env
        step_rng = np.random.default_rng([cfg.seed, self.step])  # prompts and windows: f(seed, step) only (§4)
        batch_prompts = self.source.batch(self.step, cfg.prompts_per_iter, step_rng)
        if cfg.method == "refl":   # one late step per group: x_k before it is where the gradient enters
            rc = dataclasses.replace(rc, window_size=1, window_lo=rc.steps - cfg.refl.late_steps,
                                     window_hi=rc.steps)
        windows = draw_windows(step_rng, cfg.prompts_per_iter, rc)
        mine = slice(env.rank * cfg.prompts_per_iter // env.world, (env.rank + 1) * cfg.prompts_per_iter // env.world)
        prompts = batch_prompts[mine]
        self.policy.eval()
        with optimizer_offloaded(self.opt, cfg.dist.offload_optimizer), unsharded(self.policy):
            traj = rollout_in_batches(self.policy, self.bundle.tokenizer, [p.text for p in prompts], rc,
                                      batch=cfg.dist.rollout_batch, generator=self.gen, windows=windows[mine],
                                      backend=self.flow_backend)
        self.policy.train()
        t_reward = time.perf_counter()
        images = self.bundle.codec.decode(traj.latents)
        group_prompts = [p for p in prompts for _ in range(rc.group_size)]
        rewards, per_reward, reward_info = self.rewards(images, [p.text for p in group_prompts],
                                                        [p.metadata for p in group_prompts], rc.group_size)
        if env.enabled and cfg.adv_scope == "batch":   # the batch std spans every rank's groups
            everyone = torch.cat(all_gather_objects(rewards.cpu(), env))
            n = rewards.numel()
            adv = group_advantages(everyone, rc.group_size, scope="batch").float()[env.rank * n:(env.rank + 1) * n]
        else:
            adv = group_advantages(rewards, rc.group_size, scope=cfg.adv_scope).float()
        adv = adv.to(env.device)
        keep = group_has_signal(rewards, rc.group_size) if cfg.skip_zero_std else torch.ones_like(rewards, dtype=torch.bool)
        rows = torch.nonzero(keep).flatten().tolist()
        t_train = time.perf_counter()
        metrics = {"step": self.step, "reward/mean": rewards.mean().item(), "reward/std": rewards.std().item(),
                   "reward/groups_with_signal": len(rows) / rc.group_size / len(prompts),
                   "reasoning/length": traj.reasoning.mask_BT.sum(1).float().mean().item()}
        for label, r in per_reward.items():
            metrics[f"reward/{label}"] = r.mean().item()
        metrics.update(reward_info)
        for tag in tag_order([p.tag for p in group_prompts]):
            sel = [i for i, p in enumerate(group_prompts) if p.tag == tag]
            metrics[f"reward_tag/{tag}"] = rewards[sel].mean().item()
        if cfg.method == "refl":   # ReFL needs no advantages: every trajectory trains
            metrics.update(self._update_refl(traj, group_prompts))
        elif rows or env.enabled:   # under FSDP every rank joins the update's collectives, even with no rows
            metrics.update(self._update(traj, rows, adv))
        self.step += 1
        t_end = time.perf_counter()
        n = len(group_prompts)
        metrics.update({"time/rollout_text": traj.timing["rollout_text"],
                        "time/rollout_image": traj.timing["rollout_image"],
                        "time/reward": t_train - t_reward, "time/train": t_end - t_train,
                        "time/iteration": t_end - t_start, "samples_per_s": n * env.world / (t_end - t_start)})
        return mean_metrics(metrics, env)

    def _balanced_chunks(self, rows: list[int], n: int):
        """Mini-batches of `rows` as (rows, weight). Under FSDP every rank must run as many forwards and
        backwards as the others: a rank with fewer mini-batches runs dummy ones (row 0, weight 0), and the
        real ones are weighted world / (ranks with a real mini-batch at this index), so the gradient FSDP
        averages over ranks is the mean over the real mini-batches. weight is 1 in a single process."""
        batches = list(chunks(rows, n))
        env = self.env
        if not env.enabled:
            yield from ((mb, 1.0) for mb in batches)
            return
        counts = all_gather_objects(len(batches), env)
        for i in range(max(counts)):
            real = sum(c > i for c in counts)
            yield (batches[i], env.world / real) if i < len(batches) else ([0], 0.0)

    def _update(self, traj: Trajectories, rows: list[int], adv_R: torch.Tensor) -> dict:
        cfg, lc, oc, rc = self.cfg, self.cfg.loss, self.cfg.optim, self.cfg.rollout
        R, T = traj.reasoning.tokens_BT.shape
        W = traj.x_RW.shape[1]
        tok = self.bundle.tokenizer
        n_img = self.policy.cfg.image_tokens
        dev = self.env.device
        co = step_coeffs_batch(self.sigmas, traj.window_steps.flatten().cpu(), rc.eta, rc.sde_kind)
        a_RW, b_RW, s_RW, h_RW = (co[k].float().view(R, W).to(dev) for k in ("a", "b", "std", "h"))
        mask_RT = traj.reasoning.mask_BT
        D = traj.x_RW[0, 0].numel()
        # old (and reference) quantities with the training code path, no grad
        old_logp = traj.reasoning.logp_BT.clone()
        v_old = torch.zeros_like(traj.x_RW)
        ref_logp = torch.zeros(R, T, device=dev) if lc.kl_coef > 0 else None
        entropy = torch.zeros(R, T, device=dev)
        v_ref_t = torch.zeros_like(traj.x_RW)
        mism_text, mism_flow = 0.0, 0.0
        with torch.no_grad():
            for mb, weight in self._balanced_chunks(rows, oc.minibatch):
                batch = pack(traj, mb, self.sigmas, n_img, tok.pad_id)
                idx = torch.tensor(mb, device=dev)
                if cfg.recompute_old:
                    (lp, ent), v = self._forward(self.policy, batch, with_entropy=True)
                if self.ref is not None:
                    (lp_ref, _), v_r = self._forward(self.ref, batch, with_entropy=True)
                if weight == 0:
                    continue   # a dummy mini-batch: its forwards only keep FSDP's collectives in step
                if cfg.recompute_old:
                    lp_RT = self._scatter(lp, batch, len(mb), T)
                    mism_text = max(mism_text, (lp_RT - traj.reasoning.logp_BT[idx]).abs()[mask_RT[idx]].max().item()
                                    if mask_RT[idx].any() else 0.0)
                    old_logp[idx] = lp_RT
                    entropy[idx] = self._scatter(ent, batch, len(mb), T)
                    v_old[idx] = v.float().view(len(mb), W, *v.shape[1:])
                if self.ref is not None:
                    v_ref_t[idx] = v_r.float().view(len(mb), W, *v_r.shape[1:])
                    if ref_logp is not None:
                        ref_logp[idx] = self._scatter(lp_ref, batch, len(mb), T)
            bc = lambda t: t.view(R, W, *([1] * (traj.x_RW.dim() - 2)))  # noqa: E731  [R, W] → broadcast
            if not cfg.recompute_old:  # v_old from the rollout's own step: μ_old = x' − s·ξ = a·x + b·v_old
                v_old = (traj.x_next_RW - bc(s_RW) * traj.noise_RW - bc(a_RW) * traj.x_RW) / bc(b_RW)
            mu_old = bc(a_RW) * traj.x_RW + bc(b_RW) * v_old
            xi = (traj.x_next_RW - mu_old) / bc(s_RW)
            if cfg.recompute_old and rows:
                lp_flow = gaussian_logprob(traj.x_next_RW.flatten(0, 1), mu_old.flatten(0, 1), s_RW.flatten())
                sel = torch.tensor(rows, device=dev)
                mism_flow = (lp_flow.view(R, W) - traj.logp_RW)[sel].abs().max().item()
        v_ref_all = v_ref_t if self.ref is not None else v_old
        # K PPO epochs over mini-batches
        lam = lc.flow_weight if lc.train_image else 0.0
        # "constant" divides by G·L_max with L_max the configured reasoning cap, not this batch's longest
        max_len = (rc.max_new_tokens or self.policy.cfg.max_text_len) if lc.aggregation == "constant" else None
        sums: dict[str, float] = {}
        count = 0
        gnorms = {"text": 0.0, "image": 0.0}
        for _ in range(oc.epochs):
            order = [rows[i] for i in self.rng.permutation(len(rows))]
            for mb, weight in self._balanced_chunks(order, oc.minibatch):
                batch = pack(traj, mb, self.sigmas, n_img, tok.pad_id)
                idx = torch.tensor(mb, device=dev)
                def text_loss(hidden, weight, batch=batch, idx=idx):
                    """hidden → GRPO text loss in one fused call, inside the forward (FSDP)"""
                    h_sel = hidden.reshape(-1, hidden.shape[-1])[batch.text_pos]
                    return linear_text_grpo_loss(
                        h_sel, weight, batch.text_tgt, slot_T=batch.text_slot, old_logp_BL=old_logp[idx],
                        adv_B=adv_R[idx], mask_BL=mask_RT[idx], temperature=rc.temperature, eps_lo=lc.eps_lo,
                        eps_hi=lc.eps_hi, aggregation=lc.aggregation,
                        ref_logp_BL=None if ref_logp is None else ref_logp[idx], kl_coef=lc.kl_coef,
                        max_len=max_len, return_logp=True, backend=self.text_backend)

                text_out, v = self.policy.forward_packed(
                    batch.layout, batch.ids_BS, batch.latents_M, batch.sigma_M, backend=self.attn_backend,
                    text_head=text_loss if lc.train_text else no_text_head)
                if lam > 0:
                    v = self._guided(self.policy, batch, v)
                loss = torch.zeros((), device=dev)
                m: dict[str, torch.Tensor] = {}
                if lc.train_text:
                    l_text, mt, lp_RT = text_out
                    loss = loss + l_text
                    m.update(mt)
                    with torch.no_grad():
                        d = (old_logp[idx] - lp_RT)[mask_RT[idx]]
                        m["text/approx_kl"] = (torch.exp(d) - d - 1).mean() if d.numel() else torch.zeros((), device=dev)
                if lam > 0:
                    l_flow, mf = flow_grpo_loss(
                        v_BD=v.float().view(len(mb) * W, D), xi_BD=xi[idx].view(-1, D),
                        v_old_BD=v_old[idx].view(-1, D), v_ref_BD=v_ref_all[idx].view(-1, D),
                        adv_B=adv_R[idx].repeat_interleave(W), b_B=b_RW[idx].flatten(), std_B=s_RW[idx].flatten(),
                        h_B=h_RW[idx].flatten(), clip_eps=lc.flow_clip, beta=lc.beta / lam, reg=lc.reg,
                        ratio_norm=lc.ratio_norm, grad_reweight=lc.grad_reweight, backend=self.flow_backend)
                    loss = loss + lam * l_flow
                    m.update(mf)
                self.opt.zero_grad(set_to_none=True)
                (loss * weight if weight != 1.0 else loss).backward()
                for name, params in self.groups.items():
                    norm = _grad_norm(params)   # a collective under FSDP: every rank computes it
                    gnorms[name] = max(gnorms[name], norm) if weight > 0 else gnorms[name]
                total_norm = _local(torch.nn.utils.clip_grad_norm_(
                    [p for ps in self.groups.values() for p in ps], oc.grad_clip))
                if torch.isfinite(total_norm):
                    self.opt.step()
                elif weight > 0:
                    sums["skipped_steps"] = sums.get("skipped_steps", 0.0) + 1
                if weight == 0:
                    continue
                m["loss"] = loss.detach()
                for k, val in m.items():
                    sums[k] = sums.get(k, 0.0) + float(val)
                count += 1
        out = {k: val / count for k, val in sums.items() if k != "skipped_steps"} if count else {}
        out["skipped_steps"] = sums.get("skipped_steps", 0.0)
        out["grad_norm/text"], out["grad_norm/image"] = gnorms["text"], gnorms["image"]
        out["mismatch/text_logp_max"], out["mismatch/flow_logp_max"] = mism_text, mism_flow
        sel = torch.tensor(rows, dtype=torch.long, device=dev)
        out["text/entropy"] = (entropy[sel][mask_RT[sel]].mean().item() if cfg.recompute_old and rows
                               and mask_RT[sel].any() else float("nan"))
        return out

    def _update_refl(self, traj: Trajectories, prompts: list) -> dict:
        """ReFL (§11): x̂0 = x_k − σ_k·v_θ(x_k) at the row's late step k, decoded, scored by the differentiable
        surrogate; loss = −mean surrogate (+ β·velocity MSE to the reference with loss.reg = "mse"). The same
        K epochs of mini-batches as the GRPO update, one gradient step each."""
        cfg, lc, oc = self.cfg, self.cfg.loss, self.cfg.optim
        R = traj.x_RW.shape[0]
        n_img, pad = self.policy.cfg.image_tokens, self.bundle.tokenizer.pad_id
        use_ref = lc.reg == "mse" and self.ref is not None
        v_ref = torch.zeros_like(traj.x_RW[:, 0])
        if use_ref:
            with torch.no_grad():
                for mb in chunks(list(range(R)), oc.minibatch):
                    b = pack(traj, mb, self.sigmas, n_img, pad)
                    _, v_r = self.ref.forward_packed(b.layout, b.ids_BS, b.latents_M, b.sigma_M,
                                                     backend=self.attn_backend, text_head=no_text_head)
                    v_ref[torch.tensor(mb, device=v_ref.device)] = v_r.float()
        sums: dict[str, float] = {}
        count, gnorm, skipped = 0, 0.0, 0.0
        for _ in range(oc.epochs):
            order = [int(i) for i in self.rng.permutation(R)]
            for mb in chunks(order, oc.minibatch):
                batch = pack(traj, mb, self.sigmas, n_img, pad)
                _, v = self.policy.forward_packed(batch.layout, batch.ids_BS, batch.latents_M, batch.sigma_M,
                                                  backend=self.attn_backend, text_head=no_text_head)
                v = v.float()
                x0 = batch.latents_M - batch.sigma_M.view(-1, *([1] * (v.dim() - 1))) * v
                sur = surrogate_reward_of(self.bundle.codec.decode(x0, clamp=False), [prompts[i].text for i in mb],
                                          [prompts[i].metadata for i in mb], cfg.refl.softness)
                loss = -sur.mean()
                mse = ((v - v_ref[torch.tensor(mb, device=v.device)]) ** 2).mean() if use_ref else torch.zeros(())
                loss = loss + lc.beta * mse
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = max(gnorm, _grad_norm(self.groups["image"]))
                total = torch.nn.utils.clip_grad_norm_(self.groups["image"], oc.grad_clip)
                if torch.isfinite(total):
                    self.opt.step()
                else:
                    skipped += 1
                for k, val in (("loss", loss), ("refl/surrogate", sur.mean()), ("flow/velocity_mse", mse)):
                    sums[k] = sums.get(k, 0.0) + float(val)
                count += 1
        out = {k: val / count for k, val in sums.items()}
        out.update({"skipped_steps": skipped, "grad_norm/image": gnorm, "grad_norm/text": 0.0})
        return out

    # ------------------------------------------------------------------ the loop
    def train(self, on_eval=None) -> list[dict]:
        cfg = self.cfg
        main = self.env.is_main   # rank 0 writes logs and shows progress; every rank trains and checkpoints
        log_path = os.path.join(cfg.out, "metrics.jsonl")
        history = []
        writer = _tensorboard(cfg.out) if main else None
        bar = tqdm(total=cfg.iterations, initial=self.step, desc="unigrpo", disable=not (self.progress and main))
        with open(log_path if main else os.devnull, "a") as log:
            while self.step < cfg.iterations:
                m = self.iteration()
                if not all(math.isfinite(v) for k, v in m.items() if isinstance(v, float) and k != "text/entropy"):
                    bad = [k for k, v in m.items() if isinstance(v, float) and not math.isfinite(v)]
                    raise FloatingPointError(f"non-finite metrics at step {m['step']}: {bad}")
                history.append(m)
                log.write(json.dumps(m) + "\n")
                log.flush()
                if writer is not None:
                    for k, v in m.items():
                        if k != "step":
                            writer.add_scalar(k, v, m["step"])
                bar.update(1)
                bar.set_postfix(reward=f"{m['reward/mean']:.3f}", s_per_it=f"{m['time/iteration']:.1f}")
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.iterations:
                    self.save()
                if on_eval is not None and cfg.eval_every and self.step % cfg.eval_every == 0:
                    on_eval(self)
        bar.close()
        if writer is not None:
            writer.close()
        return history


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (FSDP gradient norms are DTensors), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _grad_norm(params) -> float:
    """L2 norm of the gradients of `params` (sharded or not); 0.0 when none has a gradient."""
    g = [p.grad for p in params if p.grad is not None]
    if not g:
        return 0.0
    return _local(torch.linalg.vector_norm(torch.stack([_local(torch.linalg.vector_norm(x)) for x in g]))).item()


def _tensorboard(out: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(os.path.join(out, "tb"))
