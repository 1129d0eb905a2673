"""A per-GPU memory estimate of UniGRPO training under FSDP2 and a plan of the settings that make a run fit
(docs/DESIGN.md "Memory per GPU"), computed from a ModelConfig so the tables in the docs are reproducible:

    python -m unigrpo.distributed.memory --config paper --gpus 4      the plan for 4 GPUs (+ the settings)
    python -m unigrpo.distributed.memory --table                      the per-component table, 4 … 64 GPUs

What is counted (bytes per GPU, N GPUs, full sharding; P = all parameters of the policy, both experts):
- policy master weights fp32 4P/N, gradients fp32 4P/N (training only: freed before the rollout),
  AdamW moments fp32 8P/N (on the GPU, or on the host during the rollout with dist.offload_optimizer;
  the gradients are freed before every rollout either way);
- the frozen reference in the gather dtype (bf16): 2P/N, kept sharded during the rollout (it is not used
  there; gathering it would cost 2P, shown for comparison), or on the host with dist.offload_reference;
- gathered weights while training: the root (embeddings, lm_head, image in/out: kept gathered) plus two
  decoder layers (the current one and the prefetched next) in bf16; their unsharded gradients before the
  reduce-scatter (the root's for the whole backward, one layer's, in bf16, + that layer's fp32 reduce input);
- the unsharded fp32 position tables of policy and reference (buffers);
- training activations of one mini-batch of m trajectories, each one packed sequence of S = text + W·image
  tokens: with per-layer activation checkpointing, each layer's input (S·H bf16) for every layer, plus one
  layer's working set recomputed in the backward (q, k, v, attention output, o: ≈4·S·H; SwiGLU gate, up and
  product: 3·S·I; bf16). Without checkpointing: that working set for every layer. Token log-probs are fused,
  so no [tokens × vocab] logits are held;
- the rollout (never at the same time as training): one full bf16 copy of the weights (`unsharded`, freed
  before the decode, the reward and training; a per-layer gather, not implemented, would hold the root and
  two layers instead), the KV cache of the text context of the trajectories rolled out at once (noise blocks
  are never cached), one layer's working set of the image tokens of those trajectories (no grad: nothing is
  kept across layers), and the stored trajectories of all this GPU's rows (x, x', ξ of the W window steps
  and the final latents, fp32). dist.rollout_batch bounds the trajectories rolled out at once.
- overhead: CUDA context, NCCL buffers and allocator fragmentation, a flat `overhead` (default 4 GB).
The host side (per rank): the offloaded AdamW moments, and the sharded load's peak (`load_host_peak`).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from unigrpo.checkpoint import read_json_object
from unigrpo.config import load_config, resolve_config_path
from unigrpo.model.config import ModelConfig, preset
from unigrpo.model.unified import UnifiedModel
from unigrpo.train_config import TrainConfig

GB = 1e9

__all__ = ["MemoryEstimate", "count_params", "estimate", "plan", "load_host_peak", "markdown_table", "main"]


@dataclass
class MemoryEstimate:
    """Bytes per GPU of each component (see the module docstring)."""

    gpus: int
    params: int
    weights_fp32: float
    grads: float
    adam: float
    reference: float
    gathered: float
    activations: float
    rollout_weights: float
    kv_cache: float
    rollout_activations: float
    trajectories: float
    grad_buffers: float = 0.0
    buffers: float = 0.0
    overhead: float = 0.0
    adam_on_gpu_in_rollout: bool = True
    reference_on_gpu: bool = True
    host_offload: float = 0.0

    @property
    def training_total(self) -> float:
        ref = self.reference if self.reference_on_gpu else 0.0
        return (self.weights_fp32 + self.grads + self.adam + ref + self.gathered + self.grad_buffers
                + self.activations + self.trajectories + self.buffers + self.overhead)

    @property
    def rollout_total(self) -> float:
        adam = self.adam if self.adam_on_gpu_in_rollout else 0.0   # gradients are freed before the rollout
        ref = self.reference if self.reference_on_gpu else 0.0
        return (self.weights_fp32 + adam + ref + self.rollout_weights + self.kv_cache
                + self.rollout_activations + self.trajectories + self.buffers + self.overhead)

    @property
    def peak(self) -> float:
        return max(self.training_total, self.rollout_total)


def count_params(cfg: ModelConfig) -> tuple[int, int, int]:
    """(all parameters, parameters of one decoder layer, root parameters) from the model built on meta."""
    key = repr(cfg)
    if key not in _COUNTS:
        _COUNTS[key] = _count_params(cfg)
    return _COUNTS[key]


_COUNTS: dict[str, tuple[int, int, int]] = {}


def _count_params(cfg: ModelConfig) -> tuple[int, int, int]:
    import torch

    with torch.device("meta"):
        model = UnifiedModel(cfg)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    layer = sum(p.numel() for p in model.layers[0].parameters())
    return total, layer, total - layer * cfg.layers


def estimate(cfg: ModelConfig, gpus: int, *, group: int = 24, prompts: int = 32, window: int = 3,
             text_tokens: int = 512, micro_batch: int = 1, checkpointing: bool = True, rollout_batch: int = 0,
             offload_optimizer: bool = False, offload_reference: bool = False, reference_sharded: bool = True,
             rollout_gather: str = "full", overhead: float = 0.0, gather_bytes: int = 2) -> MemoryEstimate:
    """Bytes per GPU for one configuration (see the module docstring). group: G; prompts: B (over all GPUs);
    window: W; text_tokens: prompt + reasoning tokens per trajectory; micro_batch: trajectories per training
    mini-batch per GPU; rollout_batch: trajectories rolled out at once per GPU (0 = all G·B/N);
    rollout_gather: "full" (implemented) or "layer" (for comparison); overhead: bytes added to each peak;
    gather_bytes: bytes per element of dist.param_dtype (2 = bf16; 4 for the fp32 CPU runs): the reference,
    gathered weights and their gradients, activations and the KV cache; offload_optimizer /
    offload_reference: dist.offload_optimizer / dist.offload_reference."""
    if gpus < 1 or prompts % gpus:
        raise ValueError(f"gpus={gpus} must be >= 1 and divide prompts={prompts}")
    if rollout_gather not in ("full", "layer"):
        raise ValueError(f"rollout_gather={rollout_gather!r}; expected 'full' or 'layer'")
    P, P_layer, P_root = count_params(cfg)
    H, I = cfg.hidden, cfg.intermediate
    S = text_tokens + window * cfg.image_tokens
    b = gather_bytes
    per_layer_work = (4 * S * H + 3 * S * I) * b
    if checkpointing:
        act = micro_batch * (cfg.layers * S * H * b + per_layer_work)
    else:
        act = micro_batch * cfg.layers * per_layer_work
    rows_here = prompts // gpus * group
    at_once = min(rollout_batch, rows_here) if rollout_batch else rows_here
    kv = at_once * text_tokens * cfg.layers * 2 * cfg.kv_heads * cfg.head_dim * b
    n_img = cfg.image_tokens
    rollout_act = at_once * n_img * (2 * H + 4 * H + 3 * I) * b   # layer input + output, one layer's working set
    D = cfg.latent_channels * cfg.latent_size ** 2
    traj = rows_here * (3 * window + 1) * D * 4
    gathered = b * (P_root + 2 * P_layer)
    # unsharded gradients before their reduce-scatter: the root's (kept gathered: its gradients live through the
    # whole backward) and one layer's, in the gather dtype, plus that layer's fp32 reduce-scatter input
    grad_buffers = b * (P_root + P_layer) + 4 * P_layer
    buffers = 2 * cfg.max_latent_size ** 2 * H * 4   # the unsharded fp32 position table of policy and reference
    reference = b * P / gpus if reference_sharded else b * P
    host = (8 * P / gpus if offload_optimizer else 0.0) + (reference if offload_reference else 0.0)
    return MemoryEstimate(gpus=gpus, params=P, weights_fp32=4 * P / gpus, grads=4 * P / gpus, adam=8 * P / gpus,
                          reference=reference, gathered=gathered,
                          activations=act, rollout_weights=b * P if rollout_gather == "full" else gathered,
                          kv_cache=kv, rollout_activations=rollout_act, trajectories=traj, grad_buffers=grad_buffers,
                          buffers=buffers, overhead=overhead, adam_on_gpu_in_rollout=not offload_optimizer,
                          reference_on_gpu=not offload_reference, host_offload=host)


def load_host_peak(cfg: ModelConfig, world: int, *, reference: bool = True, dtype_bytes: int = 4) -> float:
    """Peak host bytes per rank of the sharded load (unigrpo/distributed/loading.py) above the interpreter with
    the model code imported: the policy's local shards (dtype_bytes·P/world; + the reference's 2·P/world in
    bf16 when `reference`), one full tensor in flight (the largest, fp32: a transform reads it whole), and the
    unsharded position table (fp32 buffer + its float64 computation: 3 × its fp32 size)."""
    import torch

    with torch.device("meta"):
        model = UnifiedModel(cfg)
    params = {id(p): p for p in model.parameters()}.values()
    P = sum(p.numel() for p in params)
    largest = max(p.numel() for p in params)
    ref = 2 * P / world if reference else 0.0
    return P * dtype_bytes / world + ref + largest * 4 + 3 * model.pos_table.numel() * 4


# ------------------------------------------------------------------------------------------------ the plan
@dataclass
class Plan:
    gpus: int
    settings: dict
    """config overrides the plan needs (key=value as on the command line)"""
    estimate: MemoryEstimate
    fits: bool
    notes: list


def plan(cfg: ModelConfig, gpus: int, *, gpu_memory: float = 80 * GB, group: int = 24, prompts: int = 32,
         window: int = 3, text_tokens: int = 512, micro_batch: int = 1, checkpointing: bool = True,
         overhead: float = 4 * GB) -> Plan:
    """The cheapest settings under which the peak (rollout and training) fits `gpu_memory` per GPU. Tried in
    order of cost: activation checkpointing (already on in the paper config); rollout micro-batches (the
    largest dist.rollout_batch that fits, a divisor or multiple of G: larger batches are faster); offloading
    AdamW during the rollout (host↔GPU copies of 8P/N bytes per iteration); the reference on the host
    (2P/N bytes copied in per reference pass); a smaller training mini-batch (changes the optimizer steps per
    iteration: reported, never chosen silently)."""
    kw = dict(group=group, prompts=prompts, window=window, text_tokens=text_tokens, overhead=overhead)
    rows_here = prompts // gpus * group
    sizes = sorted({b for b in range(2, rows_here + 1) if rows_here % b == 0 and (group % b == 0 or b % group == 0)},
                   reverse=True)
    notes = []
    settings = {"dist.activation_checkpointing": True} if checkpointing else {}

    def est(mb, rb, off_opt, off_ref):
        return estimate(cfg, gpus, micro_batch=mb, checkpointing=checkpointing, rollout_batch=rb,
                        offload_optimizer=off_opt, offload_reference=off_ref, **kw)
    choice = None
    for off_opt, off_ref in ((False, False), (True, False), (True, True)):
        rb = next((rb for rb in sizes if est(micro_batch, rb, off_opt, off_ref).rollout_total <= gpu_memory),
                  sizes[-1])
        choice = (rb, off_opt, off_ref)
        if est(micro_batch, rb, off_opt, off_ref).peak <= gpu_memory:
            break
    rb, off_opt, off_ref = choice
    mb = micro_batch
    while est(mb, rb, off_opt, off_ref).training_total > gpu_memory and mb > 1:
        mb -= 1
    best = est(mb, rb, off_opt, off_ref)
    if rb < rows_here:
        settings["dist.rollout_batch"] = rb
    if off_opt:
        settings["dist.offload_optimizer"] = True
    if off_ref:
        settings["dist.offload_reference"] = True
    if mb != micro_batch:
        settings["optim.microbatch"] = mb
        notes.append(f"optim.microbatch {mb}: each mini-batch of {micro_batch} is accumulated over micro-batches "
                     f"of {mb} (the same optimisation as the paper's setting, more forward/backward passes)")
    fits = best.peak <= gpu_memory
    if not fits:
        notes.append("does not fit even with every option")
    return Plan(gpus, settings, best, fits, notes)


def markdown_table(cfg: ModelConfig, gpu_counts=(4, 8, 16, 32, 64), **kw) -> str:
    rows = ["| GPUs | weights fp32 | grads | AdamW | reference bf16 | gathered bf16 | unsharded grads | "
            "activations | rollout copy | KV cache | rollout act. | trajectories | training total | rollout total |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in gpu_counts:
        e = estimate(cfg, n, **kw)
        cells = [e.weights_fp32, e.grads, e.adam, e.reference, e.gathered, e.grad_buffers, e.activations,
                 e.rollout_weights,
                 e.kv_cache, e.rollout_activations, e.trajectories, e.training_total, e.rollout_total]
        rows.append(f"| {n} | " + " | ".join(f"{c / GB:.1f} GB" for c in cells) + " |")
    return "\n".join(rows)


def format_plan(p: Plan, gpu_memory: float) -> str:
    e = p.estimate
    lines = [f"{p.gpus} GPUs × {gpu_memory / GB:.0f} GB, {e.params / 1e9:.2f}B parameters: "
             f"{'fits' if p.fits else 'DOES NOT FIT'}",
             f"  rollout peak  {e.rollout_total / GB:6.1f} GB  (sharded fp32 weights {e.weights_fp32 / GB:.1f}, "
             f"AdamW {'on host' if not e.adam_on_gpu_in_rollout else f'{e.adam / GB:.1f}'}, reference "
             f"{'on host' if not e.reference_on_gpu else f'sharded {e.reference / GB:.1f}'}, full bf16 copy {e.rollout_weights / GB:.1f}, KV {e.kv_cache / GB:.1f}, "
             f"activations {e.rollout_activations / GB:.1f}, trajectories {e.trajectories / GB:.1f}, "
             f"buffers {e.buffers / GB:.1f}, overhead {e.overhead / GB:.1f})",
             f"  training peak {e.training_total / GB:6.1f} GB  (weights {e.weights_fp32 / GB:.1f}, grads "
             f"{e.grads / GB:.1f}, AdamW {e.adam / GB:.1f}, reference "
             f"{'on host' if not e.reference_on_gpu else f'{e.reference / GB:.1f}'}, gathered "
             f"{e.gathered / GB:.1f}, unsharded grads {e.grad_buffers / GB:.1f}, activations {e.activations / GB:.1f}, trajectories {e.trajectories / GB:.1f}, "
             f"overhead {e.overhead / GB:.1f})",
             f"  host per rank: {e.host_offload / GB:.1f} GB offloaded (pinned)",
             "  settings: " + (" ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                                        for k, v in p.settings.items()) or "(none beyond the config)")]
    lines += [f"  note: {n}" for n in p.notes]
    return "\n".join(lines)


def _from_config(name: str | None):
    """(ModelConfig, estimate keywords) of a training config (bundled name or YAML path); the model is the
    base's when it is a local checkpoint, else bagel-7b (the paper's) or tiny for the tiny config."""
    import os

    tc = load_config(TrainConfig, resolve_config_path(name), [])
    model = preset("tiny") if name == "tiny" else preset("bagel-7b")
    if os.path.exists(os.path.join(tc.base, "config.json")):
        model = ModelConfig(**read_json_object(os.path.join(tc.base, "config.json"))["model"])
    kw = dict(group=tc.rollout.group_size, prompts=tc.prompts_per_iter, window=tc.rollout.window_size,
              micro_batch=tc.optim.micro, checkpointing=tc.dist.activation_checkpointing)
    if tc.rollout.max_new_tokens:
        kw["text_tokens"] = 64 + tc.rollout.max_new_tokens
    return model, kw


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m unigrpo.distributed.memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="paper", help="training config (bundled name or YAML): G, B, W, "
                    "mini-batch, checkpointing; the model is bagel-7b unless the config's base is a local checkpoint")
    ap.add_argument("--preset", default=None, help="model preset instead of the config's model")
    ap.add_argument("--gpus", default="4,8", help="comma-separated GPU counts")
    ap.add_argument("--gpu-memory", type=float, default=80.0, help="GB per GPU")
    ap.add_argument("--overhead", type=float, default=4.0, help="GB per GPU for context, NCCL, fragmentation")
    ap.add_argument("--text-tokens", type=int, default=None, help="prompt + reasoning tokens per trajectory")
    ap.add_argument("--table", action="store_true", help="print the per-component table without options")
    args = ap.parse_args(argv)
    model, kw = _from_config(args.config)
    if args.preset:
        model = preset(args.preset)
    if args.text_tokens:
        kw["text_tokens"] = args.text_tokens
    gpus = tuple(int(g) for g in args.gpus.split(","))
    if args.table:
        print(markdown_table(model, gpus, **kw))
        return 0
    for n in gpus:
        print(format_plan(plan(model, n, gpu_memory=args.gpu_memory * GB, overhead=args.overhead * GB, **kw),
                          args.gpu_memory * GB))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
