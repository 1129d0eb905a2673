"""The process group of a torchrun launch, and the few collectives the trainer needs on plain Python values.

Decisions:
- torchrun sets WORLD_SIZE / RANK / LOCAL_RANK; with WORLD_SIZE unset or 1 the run is one plain process and
  nothing here calls torch.distributed (so the single-process path is exactly the same code as before).
- Backend: NCCL when CUDA is available (one GPU per local rank), gloo on CPU (how the tests run).
- Metrics are reduced with all_gather_object (one small pickle per iteration): every rank gets the same
  dict: the max / min over ranks for keys ending in _max / _min, else the mean over the ranks that reported
  the key (categories may be missing on a rank).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "init_distributed", "all_gather_objects", "max_across", "mean_metrics"]


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistEnv:
    """Join torchrun's process group (once) and pick this rank's device. device: "auto" (cuda:<local rank>
    when CUDA is available, else cpu), "cpu" or "cuda"."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device={device!r} must be 'auto', 'cpu' or 'cuda'")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistEnv(rank=rank, world=world, local_rank=local, device=dev)


def all_gather_objects(obj, env: DistEnv) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] in a single process)."""
    if not env.enabled:
        return [obj]
    out = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


def max_across(value: int, env: DistEnv) -> int:
    return max(all_gather_objects(int(value), env))


def mean_metrics(metrics: dict, env: DistEnv) -> dict:
    """Reduce a metrics dict over ranks (see the module docstring); "step" is kept, "skipped_steps" summed,
    a non-finite value on any rank gives NaN."""
    if not env.enabled:
        return metrics
    dicts = all_gather_objects(metrics, env)
    out = {}
    for key in sorted({k for d in dicts for k in d}, key=lambda k: (k != "step", k)):
        vals = [d[key] for d in dicts if key in d]
        if key == "step":
            out[key] = vals[0]
        elif key == "skipped_steps":
            out[key] = float(sum(vals))
        elif all(isinstance(v, (int, float)) for v in vals):
            if not all(math.isfinite(v) for v in vals):
                out[key] = float("nan")
            elif key.endswith("_max"):
                out[key] = float(max(vals))
            elif key.endswith("_min"):
                out[key] = float(min(vals))
            else:
                out[key] = float(sum(vals) / len(vals))
        else:
            out[key] = vals[0]
    return out
