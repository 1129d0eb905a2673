"""Scale-out on torch.distributed: the process group from torchrun's environment (env.py) and FSDP2 applied
in one place, in a fixed order (parallelize.py). Model files contain no distributed code; a run without
torchrun (WORLD_SIZE unset or 1) never touches torch.distributed."""
from .env import DistEnv, all_gather_objects, init_distributed, max_across, mean_metrics
from .parallelize import (DistConfig, apply_fsdp, full_model_state, full_optimizer_state, load_full_model_state,
                          optimizer_offloaded,
                          load_full_optimizer_state, unsharded)

__all__ = ["DistEnv", "init_distributed", "all_gather_objects", "max_across", "mean_metrics", "DistConfig",
           "apply_fsdp", "unsharded", "full_model_state", "full_optimizer_state", "load_full_model_state",
           "load_full_optimizer_state", "optimizer_offloaded"]
