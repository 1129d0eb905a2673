"""FSDP2 for the unified model, applied in one place and in a fixed order: activation checkpointing flags,
then `fully_shard` on every decoder layer, then on the root (torchtitan's order: the root group then holds only
the parameters outside the layers). Plus the full (world-size independent) state dicts used by checkpoints,
and unsharding for generation.

Decisions:
- Mixed precision: parameters gathered in `param_dtype` (bf16 for real runs, fp32 in the CPU tests), gradients
  reduced in fp32; the sharded master weights and AdamW state stay fp32.
- The frozen reference model is cast to param_dtype (it is never updated) and sharded the same way with
  requires_grad off (its forward all-gathers too).
- Generation calls the model's cached methods (append_text, image_velocity, logits), not forward, and touches
  lm_head outside any forward: `unsharded(model)` gathers every layer and the root once for the whole rollout
  and keeps them gathered (reshard_after_forward off) until it exits. Memory: one full copy of the weights per
  GPU during the rollout (BAGEL-7B: 14.2B parameters, 28 GB in bf16), freed before training.
- The training forward is `forward_packed`, registered as an FSDP forward method so the root's parameters
  (embeddings, lm_head, image in/out) are gathered for it; the token log-probs run inside it (`text_head`).
  The cached entry points (append_text, append_image, image_velocity) are registered too: FSDP decides which
  module is the root at the first forward it sees, and that must be the root's, not a layer's.
- Full state dicts keyed by parameter name (model and optimizer), gathered to CPU on every rank with
  `torch.distributed.checkpoint.state_dict`: the safetensors checkpoints' contents (sharded runs write DCP
  checkpoints instead, sharded_checkpoint.py) and the tests' reference values.
- `optimizer_offloaded`: the AdamW moments on the host for the rollout (dist.offload_optimizer).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from unigrpo_kernels.dtypes import DTYPE_NAMES

__all__ = ["DTYPES", "DistConfig", "apply_fsdp", "unsharded", "optimizer_offloaded", "full_model_state", "full_optimizer_state",
           "load_full_model_state", "load_full_optimizer_state"]

DTYPES = {k: DTYPE_NAMES[k] for k in ("fp32", "bf16")}   # the parameter dtypes FSDP gathers in


@dataclass
class DistConfig:
    param_dtype: str = "bf16"
    """dtype parameters are gathered in for forward/backward under FSDP: "bf16" or "fp32" (reductions are fp32)"""
    activation_checkpointing: bool = False
    """recompute each decoder layer in the backward (saves activation memory at 1024 px)"""
    reshard_after_forward: bool = True
    """free gathered layer weights after each forward (ZeRO-3); false keeps them until the backward (ZeRO-2)"""
    device: str = "auto"
    """"auto" (cuda:<local rank> when CUDA is available), "cpu" or "cuda\""""
    rollout_batch: int = 0
    """trajectories rolled out at once per rank (0 = all of them; else a divisor >= 2 of rollout.group_size or a
    multiple of it): bounds the rollout's KV cache and activations (python -m unigrpo.distributed.memory)"""
    offload_optimizer: bool = False
    """keep the AdamW moments on the host during the rollout (frees 8 bytes per parameter / world on the GPU)"""
    offload_reference: bool = False
    """keep the frozen reference's shards on the host (FSDP2 CPUOffloadPolicy; under torchrun only): frees
    2 bytes per parameter / world on the GPU, costs a host→GPU copy of them in every reference forward"""
    checkpoint_format: str = "auto"
    """"auto" (DCP under torchrun, safetensors in one process), "dcp" or "safetensors\""""
    async_save: bool = False
    """DCP checkpoints written in the background (dcp.async_save); the next save or the end of the run waits"""

    def __post_init__(self):
        if self.rollout_batch < 0:
            raise ValueError(f"dist.rollout_batch={self.rollout_batch} must be >= 0 (0 = all at once)")
        if self.checkpoint_format not in ("auto", "dcp", "safetensors"):
            raise ValueError(f"dist.checkpoint_format={self.checkpoint_format!r}; expected 'auto', 'dcp' or "
                             "'safetensors'")
        if self.param_dtype not in DTYPES:
            raise ValueError(f"dist.param_dtype={self.param_dtype!r}; expected one of {tuple(DTYPES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"dist.device={self.device!r}; expected 'auto', 'cpu' or 'cuda'")


def _fsdp_modules(model: nn.Module):
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def apply_fsdp(model: nn.Module, cfg: DistConfig, *, checkpointing: bool | None = None,
               offload: bool = False) -> nn.Module:
    """Shard `model` (a UnifiedModel) in place over the default process group and return it. offload: the
    shards live in host memory (CPUOffloadPolicy, pinned when CUDA is there), copied in for each gather."""
    from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                        register_fsdp_forward_method)

    ac = cfg.activation_checkpointing if checkpointing is None else checkpointing
    for layer in model.layers:
        layer.checkpointing = ac
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[cfg.param_dtype], reduce_dtype=torch.float32)
    off = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()
    for layer in model.layers:
        fully_shard(layer, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward, offload_policy=off)
    # the root's parameters are used right after its forward by the backward: keep them gathered
    fully_shard(model, mp_policy=mp, reshard_after_forward=False, offload_policy=off)
    # entry points other than forward: FSDP's root hooks (lazy init, gathering the root's own parameters)
    # must run before any layer does
    for name in ("forward_packed", "append_text", "append_image", "image_velocity"):
        register_fsdp_forward_method(model, name)
    return model


@contextlib.contextmanager
def optimizer_offloaded(opt: torch.optim.Optimizer, enabled: bool = True):
    """Free the gradients (always: every backward of the update starts from none), and when `enabled` move
    every optimizer state tensor (DTensor shards included) to host memory for the block, then back to where
    each was (pinned host copies when they came from CUDA)."""
    opt.zero_grad(set_to_none=True)
    if not enabled:
        yield opt
        return
    from torch.distributed.tensor import DTensor

    homes = {}
    for p, st in opt.state.items():
        for k, v in st.items():
            if not isinstance(v, torch.Tensor) or v.dim() == 0:
                continue   # AdamW's step counter stays
            local = v.to_local() if isinstance(v, DTensor) else v
            spec = (v.device_mesh, v.placements, v.shape, v.stride()) if isinstance(v, DTensor) else None
            host = torch.empty_like(local, device="cpu", pin_memory=local.is_cuda)
            host.copy_(local, non_blocking=True)
            homes[(id(p), k)] = (local.device, spec)
            st[k] = host
    try:
        yield opt
    finally:
        for p, st in opt.state.items():
            for k, v in st.items():
                if (id(p), k) not in homes:
                    continue
                dev, spec = homes[(id(p), k)]
                back = v.to(dev, non_blocking=True)
                if spec is not None:
                    mesh, placements, shape, stride = spec
                    back = DTensor.from_local(back, mesh, placements, run_check=False, shape=shape, stride=stride)
                st[k] = back


@contextlib.contextmanager
def unsharded(model: nn.Module):
    """Gather every FSDP-sharded part of `model` for the duration of the block (no-op without FSDP)."""
    mods = _fsdp_modules(model)
    if not mods:
        yield model
        return
    for m in mods:
        m.set_reshard_after_forward(False)
    for m in mods:
        m.unshard()
    try:
        yield model
    finally:
        for m in mods:
            m.reshard()
        for m in mods:
            m.set_reshard_after_forward(True)


def _opts(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(**kw)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full, unsharded state dict on CPU (every rank gets it), keyed like the unsharded model's."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=_opts(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The full optimizer state keyed by parameter name (loadable at any world size)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(model, opt, options=_opts(full_state_dict=True, cpu_offload=True))


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    set_model_state_dict(model, state, options=_opts(full_state_dict=True, strict=True))


def load_full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    set_optimizer_state_dict(model, opt, state, options=_opts(full_state_dict=True))
