"""A per-GPU memory estimate of UniGRPO training under FSDP2 (docs/DESIGN.md "Memory"), computed from a
ModelConfig so the table in the docs is reproducible: `python -m unigrpo.distributed.memory`.

What is counted (bytes per GPU, N GPUs, full sharding; P = all parameters of the policy, both experts):
- policy master weights fp32 4P/N, gradients fp32 4P/N, AdamW moments fp32 8P/N;
- the frozen reference, kept in the gather dtype (bf16): 2P/N;
- gathered weights while training: the root (embeddings, lm_head, image in/out: kept gathered) plus two
  decoder layers (the current one and the prefetched next) in bf16;
- activations of one mini-batch of m trajectories, each one packed sequence of S = text + W·image tokens:
  with per-layer activation checkpointing, each layer's input (S·H bf16) for every layer, plus one layer's
  working set recomputed in the backward (q, k, v, attention output, o: ≈4·S·H; SwiGLU gate, up and product:
  3·S·I; bf16). Without checkpointing: that working set for every layer. Token log-probs are fused, so no
  [tokens × vocab] logits are held.
- rollout (not at the same time as training): one full bf16 copy of the weights (`unsharded`) plus the
  KV cache of this GPU's trajectories (text context only; noise blocks are never cached).
Not counted: the allocator's fragmentation, NCCL buffers, CUDA context (~1–3 GB in practice).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from unigrpo.model.config import ModelConfig, preset

GB = 1e9


@dataclass
class MemoryEstimate:
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

    @property
    def training_total(self) -> float:
        return (self.weights_fp32 + self.grads + self.adam + self.reference + self.gathered + self.activations)

    @property
    def rollout_total(self) -> float:
        return self.weights_fp32 + self.adam + self.reference + self.rollout_weights + self.kv_cache   # grads freed


def count_params(cfg: ModelConfig) -> tuple[int, int, int]:
    """(all parameters, parameters of one decoder layer, root parameters) from the model built on meta."""
    import torch

    from unigrpo.model.unified import UnifiedModel
    with torch.device("meta"):
        model = UnifiedModel(cfg)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    layer = sum(p.numel() for p in model.layers[0].parameters())
    return total, layer, total - layer * cfg.layers


def estimate(cfg: ModelConfig, gpus: int, *, group: int = 24, prompts: int = 32, window: int = 3,
             text_tokens: int = 512, micro_batch: int = 1, checkpointing: bool = True) -> MemoryEstimate:
    """Bytes per GPU for one configuration (see the module docstring)."""
    P, P_layer, P_root = count_params(cfg)
    H, I = cfg.hidden, cfg.intermediate
    S = text_tokens + window * cfg.image_tokens
    per_layer_work = (4 * S * H + 3 * S * I) * 2
    if checkpointing:
        act = micro_batch * (cfg.layers * S * H * 2 + per_layer_work)
    else:
        act = micro_batch * cfg.layers * per_layer_work
    trajectories = group * prompts // gpus
    kv = trajectories * text_tokens * cfg.layers * 2 * cfg.kv_heads * cfg.head_dim * 2
    return MemoryEstimate(gpus=gpus, params=P, weights_fp32=4 * P / gpus, grads=4 * P / gpus, adam=8 * P / gpus,
                          reference=2 * P / gpus, gathered=2 * (P_root + 2 * P_layer), activations=act,
                          rollout_weights=2 * P, kv_cache=kv)


def markdown_table(cfg: ModelConfig, gpu_counts=(4, 8, 16, 32, 64), **kw) -> str:
    rows = ["| GPUs | weights fp32 | grads | AdamW | reference bf16 | gathered bf16 | activations | "
            "training total | rollout total |", "|---|---|---|---|---|---|---|---|---|"]
    for n in gpu_counts:
        e = estimate(cfg, n, **kw)
        cells = [e.weights_fp32, e.grads, e.adam, e.reference, e.gathered, e.activations, e.training_total,
                 e.rollout_total]
        rows.append(f"| {n} | " + " | ".join(f"{c / GB:.1f} GB" for c in cells) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m unigrpo.distributed.memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bagel-7b")
    ap.add_argument("--micro-batch", type=int, default=1, help="trajectories per mini-batch per GPU")
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--gpus", default="4,8,16,32,64")
    args = ap.parse_args(argv)
    cfg = preset(args.preset)
    print(markdown_table(cfg, tuple(int(g) for g in args.gpus.split(",")), micro_batch=args.micro_batch,
                         checkpointing=not args.no_checkpointing))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
