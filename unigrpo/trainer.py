"""The UniGRPO trainer (ALGORITHM.md §4–§9), the loop around an objective (unigrpo/losses):

    __init__      the build order: process group → policy (and frozen reference; or an in-memory bundle) →
                  backends → objective → AdamW with the text and image expert groups → rewards → prompts →
                  RNG streams → resume from <out>/checkpoint when one is there (nothing is written)
    iteration()   prompts and windows from (seed, step) → rollout → decode → rewards → group advantages →
                  train_step on the groups with signal
    train_step()  objective.prepare (no-grad recompute of the old policy, ξ) → K PPO epochs of mini-batches:
                  objective.loss → backward → grad norms → clip → AdamW step
    train()       iterations with metrics.jsonl, TensorBoard, progress, checkpoints, held-out evaluations
    save()/load() safetensors or DCP checkpoints; resuming continues exactly (tests/test_trainer.py checks a
                  bit-identical next step on CPU)

The objective is UniGRPO's (losses/grpo.py) or ReFL's (losses/refl.py, method = "refl"); the method is
chosen once, in __init__, and what differs between them (FSDP, advantages, text training, rollout windows,
the prompts it accepts) is the objective's to say. Zero-std groups
carry no signal (§5) and are dropped before training (`skip_zero_std`). Ablations: `loss.train_text = false`
freezes the text expert (FlowGRPO only), `loss.train_image = false` the image expert (TextGRPO only).
"""
from __future__ import annotations

import copy
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
from unigrpo.data import (build_prompt_source, check_prompt_lengths, check_rounds, episode_rounds,
                          instructions_of, tag_order)
from unigrpo.distributed import (all_gather_objects, full_model_state, full_optimizer_state, init_distributed,
                                 load_full_model_state, load_full_optimizer_state, mean_metrics, optimizer_offloaded,
                                 unsharded)
from unigrpo.distributed.loading import check_base, load_sharded_bundle
from unigrpo.distributed.sharded_checkpoint import is_dcp_checkpoint, load_sharded, save_sharded
from unigrpo.losses.config import LossConfig, ReFLConfig
from unigrpo.losses.forward import PackedForward
from unigrpo.losses.grpo import UniGRPOObjective
from unigrpo.losses.packing import chunks
from unigrpo.losses.refl import ReFLObjective
from unigrpo.model.attention import resolve_attention_backend
from unigrpo.model.build import load_bundle
from unigrpo.model.bundle import Bundle
from unigrpo.rewards.advantages import group_advantages, group_has_signal, prompt_group_ids
from unigrpo.rewards.registry import RewardSet
from unigrpo.rollout.rollout import Trajectories, check_rollout_batch, draw_windows, rollout_in_batches
from unigrpo.optimizer import build_optimizer, grad_norms
from unigrpo.train_config import OptimConfig, TrainConfig
from unigrpo_kernels import resolve_backend, sigma_schedule

__all__ = ["Trainer", "TrainConfig", "OptimConfig", "LossConfig", "ReFLConfig"]


class Trainer:
    def __init__(self, cfg: TrainConfig, progress: bool = True, *, bundle: Bundle | None = None):
        """bundle: an in-memory policy (single process); None loads cfg.base. Nothing is read from or written
        to disk here except cfg.base (when bundle is None) and a checkpoint to resume from under cfg.out."""
        self.cfg, self.progress = cfg, progress
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if bundle is None:
            check_base(cfg.base)
        self.env = env = init_distributed(cfg.dist.device)
        if cfg.prompts_per_iter % env.world:
            raise ValueError(f"prompts_per_iter={cfg.prompts_per_iter} must be a multiple of the world size "
                             f"{env.world} (each rank rolls out whole groups)")
        check_rollout_batch(cfg.dist.rollout_batch, cfg.rollout.group_size)
        torch.manual_seed(cfg.seed)
        need_ref = cfg.loss.reg != "none" or cfg.loss.kl_coef > 0
        if env.enabled:   # built on meta, sharded, each rank reads only its rows (distributed/loading.py)
            if bundle is not None:
                raise ValueError("an in-memory bundle trains in a single process; under torchrun each rank "
                                 "loads its shards of cfg.base")
            self.bundle, self.policy, self.ref = load_sharded_bundle(cfg.base, cfg.dist, env.device,
                                                                     reference=need_ref)
        else:
            self.bundle = bundle if bundle is not None else load_bundle(cfg.base)
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
        self.sigmas = sigma_schedule(cfg.rollout.steps, cfg.rollout.shift)
        tok = self.bundle.tokenizer   # the context CFG contrasts with (generate.unconditional_cache)
        forward = PackedForward(temperature=cfg.rollout.temperature, cfg_scale=cfg.rollout.cfg_scale,
                                uncond_ids=tok.encode_prompt("") + tok.encode_reasoning(""),
                                image_tokens=self.policy.cfg.image_tokens, pad_id=tok.pad_id,
                                attn_backend=self.attn_backend, text_backend=self.text_backend,
                                context_grad=cfg.edit.history_grad)
        if cfg.method == "refl":
            self.objective = ReFLObjective(cfg, forward, self.policy, self.ref, self.sigmas, self.bundle.codec)
        else:
            self.objective = UniGRPOObjective(cfg, forward, self.policy, self.ref, self.sigmas, dev,
                                              self.flow_backend, self.text_backend)
        if env.enabled and not self.objective.distributed:
            raise ValueError(f"method {cfg.method!r} is a single-process baseline; run it without torchrun")
        groups = self.policy.parameter_groups()
        for p in groups["text"]:
            p.requires_grad_(self.objective.trains_text)
        for p in groups["image"]:
            p.requires_grad_(cfg.loss.train_image)
        self.opt = build_optimizer(groups, cfg.optim)
        self.groups = groups
        self.rewards = RewardSet(cfg.rewards)
        self.source = build_prompt_source(cfg.data.train, "train", cfg.seed)
        check_prompt_lengths(self.source.records, tok, self.policy.cfg.max_text_len)
        self.rounds = check_rounds(self.source.records)   # R (ALGORITHM.md §12): 1 unless the records have rounds
        self.round_weights = cfg.edit.weights(self.rounds)
        cfg.edit.trained_rounds(self.rounds)   # edit.text_rounds names rounds the episodes have
        if self.rounds > 1:
            if cfg.method != "grpo":
                raise ValueError(f"data.train={cfg.data.train!r} holds {self.rounds}-round episodes, which train "
                                 f"with method 'grpo' only (got {cfg.method!r})")
        for k, w in enumerate(self.round_weights):   # each scored round's targets, before any work
            if w:
                self.rewards.check_records([episode_rounds(r)[k] for r in self.source.records])
        self.objective.check_records(self.source.records)
        self.rng = np.random.default_rng(cfg.seed)
        # rank r samples from its own stream (rank 0's is the single-process one)
        self.gen = torch.Generator(device=dev).manual_seed(cfg.seed + 7919 * env.rank)
        self.step = 0
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

    # ------------------------------------------------------------------ one iteration
    def iteration(self) -> dict:
        cfg, rc = self.cfg, self.cfg.rollout
        t_start = time.perf_counter()
        env = self.env
        step_rng = np.random.default_rng([cfg.seed, self.step])  # prompts and windows: f(seed, step) only (§4)
        batch_prompts = self.source.batch(self.step, cfg.prompts_per_iter, step_rng)
        rc = self.objective.rollout_config(rc)
        windows = draw_windows(step_rng, cfg.prompts_per_iter, rc)
        if self.rounds > 1:   # round r ≥ 2's windows from (seed, step, r); round 1's as for one round (§12)
            windows = np.stack([windows] + [draw_windows(np.random.default_rng([cfg.seed, self.step, r]),
                                                         cfg.prompts_per_iter, rc) for r in range(1, self.rounds)], 1)
        mine = slice(env.rank * cfg.prompts_per_iter // env.world, (env.rank + 1) * cfg.prompts_per_iter // env.world)
        prompts = batch_prompts[mine]
        self.policy.eval()
        with optimizer_offloaded(self.opt, cfg.dist.offload_optimizer), unsharded(self.policy):
            traj = rollout_in_batches(self.policy, self.bundle.tokenizer, [p.text for p in prompts], rc,
                                      batch=cfg.dist.rollout_batch, generator=self.gen, windows=windows[mine],
                                      backend=self.flow_backend,
                                      instructions=[instructions_of(p) for p in prompts] if self.rounds > 1 else None)
        self.policy.train()
        t_reward = time.perf_counter()
        group_prompts = [p for p in prompts for _ in range(rc.group_size)]
        rewards, per_reward, reward_info = self.episode_rewards(traj, group_prompts)
        adv_kw = dict(scope=cfg.adv_scope, std=cfg.adv_std, clip=cfg.adv_clip)
        by_prompt = cfg.adv_group_by == "prompt"
        texts = [p.text for p in group_prompts]
        if env.enabled and (cfg.adv_scope == "batch" or by_prompt):   # the batch std / a prompt spans ranks
            everyone = torch.cat(all_gather_objects(rewards.cpu(), env))
            ids = prompt_group_ids(sum(all_gather_objects(texts, env), [])) if by_prompt else None
            mine_rows = slice(env.rank * rewards.numel(), (env.rank + 1) * rewards.numel())
            adv = group_advantages(everyone, rc.group_size, group_ids=ids, **adv_kw).float()[mine_rows]
            signal = group_has_signal(everyone, rc.group_size, ids)[mine_rows]
        else:
            ids = prompt_group_ids(texts) if by_prompt else None
            adv = group_advantages(rewards, rc.group_size, group_ids=ids, **adv_kw).float()
            signal = group_has_signal(rewards, rc.group_size, ids)
        adv = adv.to(env.device)
        keep = signal if cfg.skip_zero_std else torch.ones_like(rewards, dtype=torch.bool)
        rows = torch.nonzero(keep).flatten().tolist()
        t_train = time.perf_counter()
        metrics = {"step": self.step, "reward/mean": rewards.mean().item(), "reward/std": rewards.std().item(),
                   "reward/groups_with_signal": len(rows) / rc.group_size / len(prompts),
                   "reasoning/length": traj.reasoning.mask_BT.sum(1).float().mean().item()}
        if traj.episode is not None:
            for k, n in enumerate(traj.episode.reasoning_lengths(traj.reasoning.mask_BT).float().mean(0).tolist()):
                metrics[f"reasoning/length_round{k + 1}"] = n
        for label, r in per_reward.items():
            metrics[f"reward/{label}"] = r.mean().item()
        metrics.update(reward_info)
        for tag in tag_order([p.tag for p in group_prompts]):
            sel = [i for i, p in enumerate(group_prompts) if p.tag == tag]
            metrics[f"reward_tag/{tag}"] = rewards[sel].mean().item()
        if not self.objective.uses_advantages:   # ReFL: every trajectory trains
            rows = list(range(len(group_prompts)))
        if rows or env.enabled:   # under FSDP every rank joins the update's collectives, even with no rows
            metrics.update(self.train_step(traj, rows, adv, group_prompts))
        self.step += 1
        t_end = time.perf_counter()
        n = len(group_prompts)
        metrics.update({"time/rollout_text": traj.timing["rollout_text"],
                        "time/rollout_image": traj.timing["rollout_image"],
                        "time/reward": t_train - t_reward, "time/train": t_end - t_train,
                        "time/iteration": t_end - t_start, "samples_per_s": n * env.world / (t_end - t_start)})
        return mean_metrics(metrics, env)

    def episode_rewards(self, traj: Trajectories, group_prompts: list) -> tuple[torch.Tensor, dict, dict]:
        """(reward [R], per-reward means' inputs, extra metrics) of the rollout's rows: the rewards of the final
        image, or for R-round episodes r = Σ_k w_k·R(x^k, T^k) over the rounds with w_k ≠ 0 (§12), their
        per-reward values labelled "round<k>/<label>"."""
        G, codec = self.cfg.rollout.group_size, self.bundle.codec
        if self.rounds == 1:
            return self.rewards(codec.decode(traj.latents), [p.text for p in group_prompts],
                                [p.metadata for p in group_prompts], G)
        total, per_reward, info = None, {}, {}
        for k, w in enumerate(self.round_weights):
            if not w:
                continue
            targets = [episode_rounds(p)[k] for p in group_prompts]
            r_k, each, extra = self.rewards(codec.decode(traj.episode.latents_RK[:, k]), [t.text for t in targets],
                                            [t.metadata for t in targets], G)
            total = w * r_k if total is None else total + w * r_k
            per_reward.update({f"round{k + 1}/{lab}": v for lab, v in each.items()})
            info.update({f"round{k + 1}/{key}": v for key, v in extra.items()})
        return total, per_reward, info

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

    def train_step(self, traj: Trajectories, rows: list[int], adv_R: torch.Tensor, prompts: list) -> dict:
        """K PPO epochs over the rows `rows` of `traj` in mini-batches, one AdamW step each (§9): the objective
        fixes the old policy's quantities once, then gives each mini-batch's loss, accumulated over micro-batches
        of optim.microbatch rows (the same gradient as one pass). A step whose gradient norm is not finite is
        not taken (counted in "skipped_steps"); its metrics are not finite either, so train() stops the run with
        FloatingPointError naming them, before the next checkpoint."""
        oc, fsdp = self.cfg.optim, self.env.enabled
        old = self.objective.prepare(traj, rows, adv_R, prompts, self._balanced_chunks)
        params = [p for ps in self.groups.values() for p in ps]
        sums, steps = {"loss": 0.0}, 0   # metric sums over the real steps (a step's: over its micro-batches by rows)
        gnorms = {"text": 0.0, "image": 0.0}   # the max over steps
        for _ in range(oc.epochs):
            order = [rows[i] for i in self.rng.permutation(len(rows))]
            for mb, weight in self._balanced_chunks(order, oc.minibatch):
                self.opt.zero_grad(set_to_none=True)
                parts = list(chunks(mb, oc.micro))
                n_real, within = len(parts), mb if len(parts) > 1 else None
                parts += [[0]] * ((-(-oc.minibatch // oc.micro) - n_real) if fsdp else 0)   # as many on every rank
                step_loss = 0.0
                for j, part in enumerate(parts):
                    loss, m = self.objective.loss(old, part, within)
                    w = weight if j < n_real else 0.0
                    (loss * w if w != 1.0 else loss).backward()
                    if w > 0:
                        step_loss += float(loss.detach())
                        frac = 1.0 if within is None else len(part) / len(mb)
                        for k, val in m.items():
                            sums[k] = sums.get(k, 0.0) + float(val) * frac
                norms, total_norm = grad_norms(self.groups)   # collectives under FSDP: every rank runs them
                gnorms = {k: max(gnorms[k], norms[k]) if weight > 0 else gnorms[k] for k in gnorms}
                torch.nn.utils.clip_grads_with_norm_(params, oc.grad_clip, total_norm)
                if torch.isfinite(total_norm):
                    self.opt.step()
                elif weight > 0:
                    sums["skipped_steps"] = sums.get("skipped_steps", 0.0) + 1
                if weight > 0:
                    sums["loss"], steps = sums["loss"] + step_loss, steps + 1
        out = {k: val / steps for k, val in sums.items() if k != "skipped_steps"} if steps else {}
        out["skipped_steps"] = sums.get("skipped_steps", 0.0)
        out.update({f"grad_norm/{k}": v for k, v in gnorms.items()})
        out.update(old.metrics)
        return out

    # ------------------------------------------------------------------ the loop
    def train(self, on_eval=None) -> list[dict]:
        cfg = self.cfg
        main = self.env.is_main   # rank 0 writes logs and shows progress; every rank trains and checkpoints
        log_path = os.path.join(cfg.out, "metrics.jsonl")
        if main:
            os.makedirs(cfg.out, exist_ok=True)
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


def _tensorboard(out: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(os.path.join(out, "tb"))
