"""Building the policy and the reference under FSDP without ever holding the whole model on one rank: the
model is built on the meta device, sharded (`apply_fsdp`), materialised empty (only this rank's shards get
storage), then each shard is filled from the base's safetensors file with safetensors' lazy `get_slice`,
reading only the rows this rank owns.

Sources: our checkpoint directories (model.safetensors, tied names through the file's metadata) and BAGEL
directories (ema.safetensors through unigrpo.model.bagel's key map and its patch permutations). The tokenizer
and the codec (the FLUX VAE of a BAGEL base) load once per rank, as in the single-process path.

Decisions:
- FSDP2 shards dim 0 of every parameter (`Shard(0)`); a rank's rows are a contiguous range of the file's
  tensor, read as `get_slice(key)[lo:hi]`. A parameter whose rows are permuted at load time (BAGEL's
  llm2vae) is read whole, permuted, then cut: the "largest single tensor" term of the memory bound.
- The file is opened again for every tensor, so the pages of its memory map that a slice touched are
  released at once; peak host memory per rank is the local shards plus about one slice (see
  memory.load_host_peak; tests/test_sharded.py measures it).
- Strict like the full load: every parameter must be in the file with its full shape, no unexpected key;
  the error lists each (key_problems wording).
- Dtypes: the policy is materialised in fp32 (the master weights), the frozen reference in the gather dtype
  (`dist.param_dtype`); file values are converted on copy (bf16 → fp32 is exact).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from unigrpo.checkpoint import CONFIG_FILE, MODEL_FILE, _TIED_KEY, key_problems, read_json_object
from unigrpo.distributed.parallelize import DTYPES, apply_fsdp
from unigrpo.distributed.sharded_checkpoint import is_dcp_checkpoint
from unigrpo.model.bagel import (EMA_FILE, IGNORED_PREFIXES, POS_EMBED_KEY, bagel_key_map, bagel_model_config,
                                 patch_permutation)
from unigrpo.model.build import model_config_of
from unigrpo.model.bundle import Bundle
from unigrpo.model.codec import build_codec
from unigrpo.model.tokenizer import build_tokenizer
from unigrpo.model.unified import UnifiedModel

__all__ = ["WeightSource", "open_base", "build_sharded", "load_sharded_weights", "load_sharded_bundle"]


@dataclass
class WeightSource:
    """Where each parameter of a UnifiedModel comes from."""

    file: str
    key_map: dict[str, str] = field(default_factory=dict)
    """our parameter name → the file's key (identity when absent)"""
    transforms: dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)
    """our name → a shape-keeping function of the whole file tensor (read whole, then sliced)"""
    ignore_prefixes: tuple[str, ...] = ()
    consumed: tuple[str, ...] = ()
    what: str = "checkpoint"


def open_base(path: str, *, image_size: int = 1024):
    """(ModelConfig, tokenizer, codec, tokenizer spec, WeightSource) of a base directory: ours (config.json +
    model.safetensors) or BAGEL's (llm_config.json + ema.safetensors + ae.safetensors). Reads no weights
    except BAGEL's position table (checked) and the VAE."""
    if os.path.exists(os.path.join(path, "llm_config.json")):
        cfg = bagel_model_config(path, image_size=image_size)
        spec = {"kind": "hf", "path": os.path.abspath(path)}
        key_map = bagel_key_map(cfg)
        perm = patch_permutation(cfg.latent_channels, cfg.patch)
        fns = {"patch_in": lambda t: t[:, perm], "patch_out": lambda t: t[perm]}
        src = WeightSource(os.path.join(path, EMA_FILE), {o: k for o, (k, _) in key_map.items()},
                           {o: fns[tf] for o, (_, tf) in key_map.items() if tf}, IGNORED_PREFIXES,
                           (POS_EMBED_KEY,), "BAGEL weights")
    else:
        conf = read_json_object(os.path.join(path, CONFIG_FILE))
        cfg = model_config_of(conf, path)
        spec = dict(conf.get("tokenizer") or {"kind": "byte"})
        file = os.path.join(path, MODEL_FILE)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"checkpoint {path} is missing {MODEL_FILE}")
        from safetensors import safe_open
        try:
            with safe_open(file, framework="pt") as f:
                tied = json.loads((f.metadata() or {}).get(_TIED_KEY, "{}"))
        except Exception as err:
            raise ValueError(f"corrupt checkpoint file {file}: {err}") from None
        src = WeightSource(file, dict(tied))
    tok = build_tokenizer(**spec)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but model.vocab_size is {cfg.vocab_size}")
    return cfg, tok, build_codec(cfg), spec, src


def build_sharded(cfg, dist_cfg, source: WeightSource, *, device: torch.device, dtype: torch.dtype = torch.float32,
                  checkpointing: bool | None = None, offload: bool = False) -> nn.Module:
    """A UnifiedModel(cfg) built on meta, sharded with apply_fsdp, materialised on `device` (on the host with
    `offload`: CPUOffloadPolicy) in `dtype` with only this rank's shards, and filled from `source` (see the
    module docstring)."""
    with torch.device("meta"):
        model = UnifiedModel(cfg)
    model.to(dtype)
    model.pos_table.data = model.pos_table.data.float()   # the position table stays fp32, as in the full build
    apply_fsdp(model, dist_cfg, checkpointing=checkpointing, offload=offload)
    model.to_empty(device="cpu" if offload else device)
    load_sharded_weights(model, source)
    model.reset_buffers()
    return model


def _local_rows(p: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(this rank's local tensor, first global row, row count) of a parameter (a DTensor sharded on dim 0,
    or a plain tensor: all rows)."""
    from torch.distributed.tensor import DTensor, Shard
    if not isinstance(p, DTensor):
        return p, 0, p.shape[0] if p.dim() else 1
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    if any(not isinstance(pl, Shard) or pl.dim != 0 for pl in p.placements):
        raise ValueError(f"sharded loading expects Shard(0) placements, got {p.placements}")
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return p.to_local(), int(offset[0]) if p.dim() else 0, int(shape[0]) if p.dim() else 1


def load_sharded_weights(model: nn.Module, source: WeightSource) -> list[str]:
    """Fill this rank's shard of every parameter of `model` from `source.file` (names and full shapes checked
    first; see the module docstring). Returns the file keys ignored on purpose."""
    from safetensors import safe_open

    params = dict(model.named_parameters())   # tied names appear once
    names = {n for n, _ in model.state_dict(keep_vars=True).items()}
    buffers = sorted(names - {n for n, _ in model.named_parameters(remove_duplicate=False)})
    if buffers:
        raise ValueError(f"sharded loading fills parameters only; {type(model).__name__} has persistent buffers "
                         f"{buffers[:5]} (make them non-persistent and recompute them, as pos_table)")
    path = source.file
    try:
        with safe_open(path, framework="pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:
        raise ValueError(f"corrupt checkpoint file {path}: {err}") from None
    missing, mismatched, used = [], [], set()
    for name in names:
        key = source.key_map.get(name, name)
        used.add(key)
        if name not in params and key not in shapes:
            continue   # a tied alias (its tensor is loaded under the kept name) or a buffer
        if key not in shapes:
            missing.append(key)
        elif name in params and shapes[key] != list(params[name].shape):
            mismatched.append(f"{key}: expected {list(params[name].shape)}, found {shapes[key]}")
    rest = sorted(set(shapes) - used - set(source.consumed))
    ignored = [k for k in rest if k.startswith(source.ignore_prefixes)] if source.ignore_prefixes else []
    unexpected = [k for k in rest if k not in ignored]
    problems = key_problems([("missing key(s)", missing), ("shape mismatch(es)", mismatched),
                             ("unexpected key(s)", unexpected)])
    if problems:
        raise ValueError(f"{source.what} {path} does not fit {type(model).__name__}: " + "; ".join(problems))
    with torch.no_grad():
        for name, p in params.items():
            key = source.key_map.get(name, name)
            local, lo, n = _local_rows(p.data)
            if local.numel() == 0:
                continue
            with safe_open(path, framework="pt") as f:   # reopened per tensor: its mapped pages go with it
                if name in source.transforms:
                    src = source.transforms[name](f.get_tensor(key))[lo:lo + n]
                elif p.dim() == 0:
                    src = f.get_tensor(key)
                else:
                    src = f.get_slice(key)[lo:lo + n]
            local.copy_(src)
            del src
    return ignored


def check_base(base: str) -> None:
    """A clear error before any process group or model exists when `base` is no checkpoint we can load."""
    if is_dcp_checkpoint(base):
        raise ValueError(f"base {base!r} is a sharded (DCP) checkpoint; consolidate it first with "
                         f"`unigrpo export checkpoint={base} out=DIR` and use DIR as the base")
    if not any(os.path.exists(os.path.join(base, f)) for f in ("model.safetensors", "llm_config.json")):
        raise FileNotFoundError(f"base checkpoint {base!r} not found (expected model.safetensors and "
                                "config.json there, or a BAGEL directory with llm_config.json, ema.safetensors "
                                "and ae.safetensors); run `unigrpo pretrain` or `unigrpo demo` first")


def load_sharded_bundle(base: str, dist_cfg, device: torch.device, *, reference: bool, image_size: int = 1024):
    """(Bundle with the sharded fp32 policy as its model, policy, frozen sharded reference in
    dist.param_dtype or None): the trainer's FSDP start, each rank reading only its rows of `base`."""
    cfg, tok, codec, spec, src = open_base(base, image_size=image_size)
    policy = build_sharded(cfg, dist_cfg, src, device=device)
    ref = None
    if reference:
        ref = build_sharded(cfg, dist_cfg, src, device=device, dtype=DTYPES[dist_cfg.param_dtype],
                            checkpointing=False, offload=dist_cfg.offload_reference).eval().requires_grad_(False)
    return Bundle(policy, tok, codec, spec), policy, ref
