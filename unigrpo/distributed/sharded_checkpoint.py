"""Sharded checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own shards of the model
and the optimizer; a run resumes at the same or another world size (DCP reshards on load by global offsets).

A DCP checkpoint directory P:
    dcp/          DCP's files: .metadata + one __<rank>_0.distcp per rank; one state {"model", "optim"} from
                  get_model_state_dict / get_optimizer_state_dict (sharded, keyed by parameter name)
    config.json   as in our safetensors checkpoints (model, tokenizer, train)
    meta.json     {"format": "dcp", "kind", "step", "world", ...}
    trainer.pt    the non-tensor trainer state (RNG states, step, world), written by rank 0
Atomic as unigrpo/checkpoint.py's: everything is written into P.tmp-<id> (the id from rank 0), every rank
waits for every other, then rank 0 swaps it in (`swap_in`); a kill -9 at any moment leaves the previous P
(or P.old-<id>, which load and the next save recover). The single-process path keeps safetensors.

Asynchronous saving (`dist.async_save`): dcp.async_save stages the shards to host memory, then writes them
in a background thread over a separate gloo group (so it never interleaves with the training's collectives;
tests/test_dcp.py takes an AdamW step while the shards are written and gets the pre-step values back);
`PendingSave.finish()` (every rank, at the next save) waits for the writes, then does the swap.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from unigrpo import __version__
from unigrpo.checkpoint import (CONFIG_FILE, META_FILE, MODEL_FILE, TRAINER_FILE, new_temp_dir, read_side_files,
                                swap_in, write_json)
from unigrpo.io import fsync
from unigrpo.model.build import model_config_of
from unigrpo.model.unified import UnifiedModel

__all__ = ["DCP_DIR", "is_dcp_checkpoint", "resolve_checkpoint", "save_sharded", "load_sharded",
           "PendingSave", "read_full_state"]

DCP_DIR = "dcp"


def resolve_checkpoint(path: str) -> str:
    """`path`, or the newest `path.old-*` when a crash mid-swap left no `path` (FileNotFoundError if none)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        return path
    olds = sorted(glob.glob(glob.escape(path) + ".old-*"), key=os.path.getmtime)
    if not olds:
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    return olds[-1]


def is_dcp_checkpoint(path: str) -> bool:
    try:
        path = resolve_checkpoint(path)
    except FileNotFoundError:
        return False
    return os.path.isfile(os.path.join(path, DCP_DIR, ".metadata"))


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _states(model: nn.Module, opt: torch.optim.Optimizer | None) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    st = {"model": get_model_state_dict(model)}
    if opt is not None:
        st["optim"] = get_optimizer_state_dict(model, opt)
    return st


_CKPT_GROUP = None


def _ckpt_group():
    global _CKPT_GROUP
    if _CKPT_GROUP is None:
        _CKPT_GROUP = dist.new_group(backend="gloo")
    return _CKPT_GROUP


@dataclass
class PendingSave:
    """A save whose shards may still be in flight; `finish()` (a collective) completes it."""

    tmp: str
    path: str
    future: object = None
    rank0: bool = True

    def finish(self) -> None:
        if self.future is not None:
            self.future.result()
            self.future = None
        if _is_dist():
            dist.barrier(group=_ckpt_group())
        if self.rank0:
            for f in glob.glob(os.path.join(self.tmp, DCP_DIR, "*")):
                fsync(f)
            fsync(os.path.join(self.tmp, DCP_DIR))
            fsync(self.tmp)
            swap_in(self.tmp, self.path)
        if _is_dist():
            dist.barrier(group=_ckpt_group())


def save_sharded(path: str, model: nn.Module, opt: torch.optim.Optimizer | None, *, config: dict,
                 trainer_state: dict | None = None, meta: dict | None = None,
                 async_save: bool = False) -> PendingSave:
    """Write a DCP checkpoint at `path` (a collective under torch.distributed; also works in one process).
    Returns the PendingSave: already finished unless `async_save`."""
    rank0 = not _is_dist() or dist.get_rank() == 0
    world = dist.get_world_size() if _is_dist() else 1
    tmp = [new_temp_dir(path) if rank0 else None]
    if _is_dist():
        dist.broadcast_object_list(tmp, src=0)
    tmp = tmp[0]
    if rank0:
        write_json(os.path.join(tmp, CONFIG_FILE), config, "config")
        write_json(os.path.join(tmp, META_FILE), {"format": "dcp", "version": __version__, "world": world,
                                                   **(meta or {})}, "meta")
        if trainer_state is not None:
            with open(os.path.join(tmp, TRAINER_FILE), "wb") as f:
                torch.save(trainer_state, f)
                f.flush()
                os.fsync(f.fileno())
    import torch.distributed.checkpoint as dcp
    state = _states(model, opt)
    target = os.path.join(tmp, DCP_DIR)
    pending = PendingSave(tmp, os.path.abspath(path), rank0=rank0)
    try:
        if async_save and _is_dist():
            pending.future = dcp.async_save(state, checkpoint_id=target,
                                            process_group=_ckpt_group())
            return pending
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(state, checkpoint_id=target, process_group=_ckpt_group() if _is_dist() else None)
    except BaseException:
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    pending.finish()
    return pending


def read_meta(path: str) -> tuple[str, dict, dict, dict | None]:
    """(directory read, config.json, meta.json, trainer.pt or None) of a DCP checkpoint."""
    path = resolve_checkpoint(path)
    if not os.path.isfile(os.path.join(path, DCP_DIR, ".metadata")):
        have = sorted(os.listdir(path))
        raise FileNotFoundError(f"{path} is not a DCP checkpoint (no {DCP_DIR}/.metadata; found {have}"
                                + (f"; it holds {MODEL_FILE}: a safetensors checkpoint" if MODEL_FILE in have
                                   else "") + ")")
    config, meta, trainer = read_side_files(path)
    return path, config, meta, trainer


def load_sharded(path: str, model: nn.Module, opt: torch.optim.Optimizer | None = None) -> tuple[dict, dict, dict | None]:
    """Load the model (and the optimizer when given) from a DCP checkpoint into this run's layout, at any
    world size (sharded or plain modules). Strict: a parameter missing from the checkpoint is an error.
    Returns (config, meta, trainer state or None)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    path, config, meta, trainer = read_meta(path)
    state = _states(model, opt)
    try:
        with warnings.catch_warnings():   # one process without a group is a supported, intended case
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=os.path.join(path, DCP_DIR),
                     process_group=_ckpt_group() if _is_dist() else None)
    except Exception as err:
        raise ValueError(f"DCP checkpoint {path} does not fit {type(model).__name__}"
                         f"{' and its optimizer' if opt is not None else ''}: {err}") from None
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))
    if opt is not None:
        set_optimizer_state_dict(model, opt, state["optim"])
    return config, meta, trainer


def read_full_state(path: str) -> tuple[dict, dict]:
    """(full model state {name: tensor}, config.json) of a DCP checkpoint, read in this one process (no
    process group needed): the model is rebuilt from config.json on the meta device, materialised on CPU."""
    path, config, _, _ = read_meta(path)
    with torch.device("meta"):
        model = UnifiedModel(model_config_of(config, path))
    to_empty_keeping_ties(model, "cpu")
    model.reset_buffers()
    load_sharded(path, model)
    return model.state_dict(), config


def to_empty_keeping_ties(model: nn.Module, device) -> nn.Module:
    """module.to_empty(device), then the parameters that were one object before (tied weights, e.g.
    lm_head.weight = embed.weight) made one object again (plain to_empty gives each name its own storage)."""
    first: dict[int, str] = {}
    ties = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            ties.append((name, first[id(p)]))
        else:
            first[id(p)] = name
    model.to_empty(device=device)
    for alias, kept in ties:
        owner, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(kept))
    return model
