"""Atomic checkpoints, strict weight loading, and RNG state capture for resumable training.

A checkpoint is a directory:
    model.safetensors   the weights (contiguous CPU tensors; ties recorded in the safetensors metadata)
    config.json         a JSON dict: the model config and whatever else the caller records
    trainer.pt          optional: optimizer state, RNG states, step, ... (torch.save)
    meta.json           step, time, unigrpo version (+ the caller's meta)

Atomic swap, in this exact order (`P` = the checkpoint path, one writer per path, e.g. rank 0):
    1. write every file into the sibling `P.tmp-<id>`, fsync each file and the directory;
    2. if `P` exists, rename it to `P.old-<id>`;
    3. rename `P.tmp-<id>` to `P`, fsync the parent directory;
    4. delete `P.old-<id>`.
A crash before 3 leaves the old checkpoint (at `P`, or at `P.old-<id>` if it came between 2 and 3); after 3,
the new one is at `P`. A crash never leaves a partial directory at `P`. The window between 2 and 3 is covered
by recovery: `load_checkpoint(P)` reads `P.old-*` when `P` is missing, and the next `save_checkpoint(P)`
first moves it back and deletes stale `P.tmp-*` directories. An exception raised inside steps 1–3 (not a
crash) is rolled back on the spot.

Tied weights: safetensors refuses tensors sharing memory. Names that are the same view of the same storage
(e.g. `lm_head.weight` is `embed.weight`) are saved once under the first name in sorted order, and the tie is
recorded in the metadata (`unigrpo.tied`: JSON {alias: kept}); loading puts the same tensor object under
both names. Tensors that only partly overlap are saved as independent copies.

trainer.pt is loaded with `weights_only=True` by default (no arbitrary code from a checkpoint); the RNG
helpers here keep their states in plain types so they pass. Pass `weights_only=False` for trusted files that
hold other objects.
"""
from __future__ import annotations

import glob
import json
import os
import random
import shutil
import time
import uuid
from dataclasses import dataclass, field, is_dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from unigrpo import __version__
from unigrpo.config import config_to_dict
from unigrpo.io import fsync

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "load_state_strict", "get_rng_state",
           "set_rng_state", "MODEL_FILE", "CONFIG_FILE", "TRAINER_FILE", "META_FILE"]

MODEL_FILE, CONFIG_FILE, TRAINER_FILE, META_FILE = "model.safetensors", "config.json", "trainer.pt", "meta.json"
_TIED_KEY = "unigrpo.tied"


@dataclass
class Checkpoint:
    """What `load_checkpoint` returns."""

    model_state: dict[str, torch.Tensor]
    """parameter / buffer name → tensor (tied names share one tensor)"""
    config: dict
    """the contents of config.json"""
    trainer_state: dict | None = None
    """the contents of trainer.pt, or None when absent"""
    meta: dict = field(default_factory=dict)
    """the contents of meta.json ({} when absent)"""
    path: str = ""
    """the directory actually read (a recovered `P.old-*` when `P` was missing)"""


# ---------------------------------------------------------------------------------------------------------
# saving


def save_checkpoint(path: str | os.PathLike, *, model_state: dict[str, torch.Tensor], config: dict | Any,
                    trainer_state: dict | None = None, meta: dict | None = None) -> None:
    """Write a checkpoint directory at `path` atomically (see the module docstring for the sequence).
    `config` is a JSON-serialisable dict (a dataclass config is converted with config_to_dict)."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    _recover(path)
    if is_dataclass(config) and not isinstance(config, type):
        config = config_to_dict(config)
    meta = {"time": time.time(), "version": __version__, **(meta or {})}
    tensors, tied = _dedup_tensors(model_state)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        os.mkdir(tmp)
        save_file(tensors, os.path.join(tmp, MODEL_FILE), metadata={"format": "pt", _TIED_KEY: json.dumps(tied)})
        fsync(os.path.join(tmp, MODEL_FILE))
        write_json(os.path.join(tmp, CONFIG_FILE), config, "config")
        write_json(os.path.join(tmp, META_FILE), meta, "meta")
        if trainer_state is not None:
            with open(os.path.join(tmp, TRAINER_FILE), "wb") as f:
                torch.save(trainer_state, f)
                f.flush()
                os.fsync(f.fileno())
        fsync(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in(tmp, path)


def write_json(file: str, obj: Any, what: str) -> None:
    """`obj` as JSON into a file of a checkpoint's temporary directory, fsynced (the directory swap is
    the atomic step). A value JSON cannot hold is a ValueError naming `what`."""
    try:
        text = json.dumps(obj, indent=2)
    except (TypeError, ValueError) as err:
        raise ValueError(f"checkpoint {what} is not JSON-serialisable: {err}") from None
    with open(file, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def new_temp_dir(path: str) -> str:
    """Step 1's directory `P.tmp-<id>` (created; stale temp/old directories of `P` recovered first)."""
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _recover(path)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    os.mkdir(tmp)
    return tmp


def swap_in(tmp: str, path: str) -> None:
    """Steps 2–4 of the module docstring's sequence for a fully written, fsynced `tmp` = `P.tmp-<id>`: the
    old `P` aside, `tmp` → `P`, the old one deleted. An exception rolls back and deletes `tmp`."""
    path = os.path.abspath(os.fspath(path))
    old = f"{path}.old-{tmp.rsplit('.tmp-', 1)[1]}"
    moved_aside = False
    try:
        if os.path.exists(path):
            os.replace(path, old)
            moved_aside = True
        os.replace(tmp, path)
        moved_aside = False
        fsync(os.path.dirname(path))
    except BaseException:
        if moved_aside and not os.path.exists(path):
            os.replace(old, path)  # roll back step 2
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _recover(path: str) -> None:
    """Undo what a crash mid-save left: restore `P.old-*` if `P` is missing, drop stale temp/old dirs."""
    olds = sorted(glob.glob(glob.escape(path) + ".old-*"), key=os.path.getmtime)
    if olds and not os.path.exists(path):
        os.replace(olds.pop(), path)
    for stale in olds + glob.glob(glob.escape(path) + ".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _dedup_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Contiguous CPU tensors with aliases removed; returns (tensors, {alias: kept name})."""
    out: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    by_view: dict[tuple, str] = {}
    storages: set[tuple] = set()
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"model_state[{name!r}] is a {type(t).__name__}, not a tensor")
        t = t.detach()
        if t.numel() > 0:
            sptr = (t.device, t.untyped_storage().data_ptr())
            view = (sptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if view in by_view:
                tied[name] = by_view[view]
                continue
            by_view[view] = name
            if sptr in storages:
                t = t.clone()  # partial overlap with another tensor: save an independent copy
            storages.add(sptr)
        out[name] = t.to("cpu").contiguous()
    return out, tied


# ---------------------------------------------------------------------------------------------------------
# loading


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
                    weights_only: bool = True) -> Checkpoint:
    """Read a checkpoint directory. Missing directory/files → FileNotFoundError; an unreadable file →
    ValueError naming it. Falls back to `P.old-*` when `P` is missing after a crash mid-save."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        olds = sorted(glob.glob(glob.escape(path) + ".old-*"), key=os.path.getmtime)
        if not olds:
            raise FileNotFoundError(f"checkpoint directory not found: {path} "
                                    f"(expected {MODEL_FILE} and {CONFIG_FILE} inside)")
        path = olds[-1]
    missing = [f for f in (MODEL_FILE, CONFIG_FILE) if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise FileNotFoundError(f"checkpoint {path} is missing {', '.join(missing)}")

    model_file = os.path.join(path, MODEL_FILE)
    try:
        from safetensors import safe_open
        with safe_open(model_file, framework="pt") as f:
            tied = json.loads((f.metadata() or {}).get(_TIED_KEY, "{}"))
        state = load_file(model_file, device=str(map_location))
    except Exception as err:
        raise ValueError(f"corrupt checkpoint file {model_file}: {err}") from None
    for alias, kept in tied.items():
        state[alias] = state[kept]

    config, meta, trainer_state = read_side_files(path, map_location, weights_only)
    return Checkpoint(model_state=state, config=config, trainer_state=trainer_state, meta=meta, path=path)


def read_side_files(path: str, map_location="cpu", weights_only: bool = True) -> tuple[dict, dict, dict | None]:
    """(config.json, meta.json or {}, trainer.pt or None) of a checkpoint directory, any format."""
    config = read_json_object(os.path.join(path, CONFIG_FILE))
    meta_file = os.path.join(path, META_FILE)
    meta = read_json_object(meta_file) if os.path.isfile(meta_file) else {}
    trainer_file = os.path.join(path, TRAINER_FILE)
    trainer_state = None
    if os.path.isfile(trainer_file):
        try:
            trainer_state = torch.load(trainer_file, map_location=map_location, weights_only=weights_only)
        except Exception as err:
            raise ValueError(f"corrupt checkpoint file {trainer_file} (or, with weights_only=True, it holds "
                             f"objects beyond tensors and plain types): {err}") from None
    return config, meta, trainer_state


def read_json_object(file: str, what: str = "corrupt checkpoint file") -> dict:
    """A JSON object from `file`; unreadable, malformed or non-object content is a ValueError "<what> <file>: …"."""
    try:
        with open(file) as f:
            obj = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{what} {file}: {err}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{what} {file}: expected a JSON object, got {type(obj).__name__}")
    return obj


def key_problems(groups: list[tuple[str, list[str]]], limit: int = 10) -> list[str]:
    """One line per non-empty (title, items) group, e.g. "2 missing keys: a, b", listing up to `limit` items.
    The wording of every strict-loading error (our checkpoints, BAGEL, the FLUX VAE)."""
    problems = []
    for title, items in groups:
        if items:
            more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
            problems.append(f"{len(items)} {title}: {', '.join(items[:limit])}{more}")
    return problems


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], limit: int = 10) -> None:
    """module.load_state_dict(state) after checking names and shapes; any missing key, unexpected key or
    shape mismatch raises one ValueError listing up to `limit` of each."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}"
                  for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = key_problems([("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)], limit)
    if problems:
        raise ValueError(f"state does not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------------------------
# RNG state


def get_rng_state() -> dict:
    """States of Python's `random`, NumPy's global generator, torch CPU and (when available) every CUDA
    device, in plain types / tensors (loadable with torch.load(weights_only=True))."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "key": key.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what get_rng_state returned (CUDA states only where CUDA is available)."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state((n["name"], np.asarray(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
