"""Worker of tests/test_distributed.py, launched with torchrun on CPU (gloo). Not collected by pytest.

    torchrun --nproc_per_node=2 tests/_dist_worker.py update <cfg.json> <traj.pt> <out.pt>
        one FSDP update (K epochs) on this rank's half of saved trajectories; rank 0 saves the full state
    torchrun --nproc_per_node=2 tests/_dist_worker.py train <cfg.json> [<final.pt>]
        Trainer.train() for cfg.iterations (checkpoints written at the world size of the launch); rank 0 saves
        the final full model and optimizer states to final.pt
"""
import json
import sys

import torch

from unigrpo.config import load_config
from unigrpo.distributed import full_model_state, full_optimizer_state
from unigrpo.rollout.rollout import Reasoning, Trajectories
from unigrpo.trainer import TrainConfig, Trainer


def select_groups(traj: Trajectories, start: int, stop: int) -> Trajectories:
    """The trajectories of prompt groups start … stop − 1 (rows start·G … stop·G − 1), the cache dropped."""
    G = traj.group_size
    r = slice(start * G, stop * G)
    rs = traj.reasoning
    reasoning = Reasoning(prompt_ids=rs.prompt_ids[r], tokens_BT=rs.tokens_BT[r], logp_BT=rs.logp_BT[r],
                          mask_BT=rs.mask_BT[r], texts=rs.texts[r], cache=None)
    return Trajectories(traj.prompt_texts[r], reasoning, traj.window_k0[r], traj.x_RW[r], traj.x_next_RW[r],
                        traj.noise_RW[r], traj.logp_RW[r], traj.latents[r], G, dict(traj.timing))


def main():
    mode, cfg_path = sys.argv[1], sys.argv[2]
    with open(cfg_path) as f:
        overrides = [f"{k}={v}" for k, v in json.load(f).items()]
    cfg = load_config(TrainConfig, None, overrides)
    trainer = Trainer(cfg, progress=False)
    env = trainer.env
    if mode == "update":
        saved = torch.load(sys.argv[3], weights_only=False)
        traj, adv = saved["traj"], saved["adv"]
        groups = len(traj.prompt_texts) // traj.group_size
        per = groups // env.world
        mine = select_groups(traj, env.rank * per, (env.rank + 1) * per)
        n = per * traj.group_size
        metrics = trainer.train_step(mine, list(range(n)), adv[env.rank * n:(env.rank + 1) * n], [])
        state = full_model_state(trainer.policy)
        if env.is_main:
            torch.save({"state": state, "metrics": metrics}, sys.argv[4])
    elif mode == "train":
        trainer.train()
        if len(sys.argv) > 3:   # the final full states, gathered (not through the checkpoint code)
            state = {"model": full_model_state(trainer.policy), "optim": full_optimizer_state(trainer.policy, trainer.opt)}
            if env.is_main:
                torch.save(state, sys.argv[3])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
