"""`unigrpo export checkpoint=DIR out=DIR [layout=unigrpo|bagel]`: consolidate a sharded (DCP) checkpoint, or
copy a safetensors one, into a single-file checkpoint for sharing and evaluation.

layout "unigrpo": our format (model.safetensors + config.json + meta.json; no optimizer or trainer state),
loadable by load_bundle / `unigrpo eval` / as a training base.
layout "bagel" (BAGEL-shaped models only, i.e. trained from a BAGEL base): BAGEL's directory layout
(ema.safetensors with BAGEL's keys, un-permuted patch projections and the fixed latent position table; the
base's llm_config.json, ae.safetensors and tokenizer files copied from the base directory recorded in the
checkpoint). BAGEL's understanding branch (vit_model.*, connector.*, vit_pos_embed.*) is never loaded by this
trainer and so is not in the export.
Read in one process (no torchrun needed); every write is atomic (a temporary directory, then a rename).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import torch
from unigrpo.checkpoint import load_checkpoint, new_temp_dir, save_checkpoint, swap_in
from unigrpo.config import load_config
from unigrpo.distributed.sharded_checkpoint import is_dcp_checkpoint, read_full_state, read_meta
from unigrpo.io import fsync
from unigrpo.model.bagel import EMA_FILE, LLM_CONFIG, POS_EMBED_KEY, VAE_FILE, bagel_key_map, patch_permutation
from unigrpo.model.build import model_config_of
from unigrpo.model.unified import sincos_2d_table

__all__ = ["ExportConfig", "export", "main"]

LAYOUTS = ("unigrpo", "bagel")


@dataclass
class ExportConfig:
    checkpoint: str = ""
    """the checkpoint directory to export (DCP or safetensors)"""
    out: str = ""
    """the directory to write"""
    layout: str = "unigrpo"
    """"unigrpo" (our safetensors format) or "bagel" (BAGEL's directory layout)"""

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout={self.layout!r}; expected one of {LAYOUTS}")


def _read(path: str) -> tuple[dict, dict, dict]:
    if is_dcp_checkpoint(path):
        state, config = read_full_state(path)
        return state, config, read_meta(path)[2]
    ck = load_checkpoint(path)
    return ck.model_state, ck.config, ck.meta


def export(cfg: ExportConfig) -> str:
    """Write the export; returns the output directory."""
    if not cfg.checkpoint or not cfg.out:
        raise ValueError(f"export needs checkpoint=DIR and out=DIR (got checkpoint={cfg.checkpoint!r}, "
                         f"out={cfg.out!r})")
    if os.path.abspath(cfg.checkpoint) == os.path.abspath(cfg.out):
        raise ValueError(f"out={cfg.out!r} must differ from checkpoint (the export would replace its source)")
    state, config, meta = _read(cfg.checkpoint)
    info = {"kind": "export", "source": os.path.abspath(cfg.checkpoint), "step": meta.get("step"),
            "world": meta.get("world")}
    if cfg.layout == "unigrpo":
        save_checkpoint(cfg.out, model_state=state, config=config, meta=info)
    else:
        _export_bagel(state, config, cfg.out, cfg.checkpoint)
    return cfg.out


def to_bagel_state(state: dict[str, torch.Tensor], mcfg) -> dict[str, torch.Tensor]:
    """Our parameter names → BAGEL's ema.safetensors keys (the inverse of load_bagel's mapping)."""
    inv = torch.argsort(patch_permutation(mcfg.latent_channels, mcfg.patch))
    undo = {"patch_in": lambda t: t[:, inv], "patch_out": lambda t: t[inv]}
    out = {}
    for ours, (theirs, tf) in bagel_key_map(mcfg).items():
        t = state[ours]
        out[theirs] = (undo[tf](t) if tf else t).contiguous()
    out[POS_EMBED_KEY] = sincos_2d_table(mcfg.max_latent_size, mcfg.hidden, mcfg.pos_table_order).float()
    return out


def _export_bagel(state: dict, config: dict, out: str, source: str) -> None:
    from safetensors.torch import save_file

    mcfg = model_config_of(config, source)
    base = (config.get("tokenizer") or {}).get("path")
    if mcfg.codec != "flux-vae" or not base or not os.path.isfile(os.path.join(base, LLM_CONFIG)):
        raise ValueError(f"layout=bagel needs a checkpoint trained from a BAGEL base (flux-vae codec, the base "
                         f"directory with {LLM_CONFIG} recorded as its tokenizer path); {source} has codec "
                         f"{mcfg.codec!r} and tokenizer path {base!r}")
    tmp = new_temp_dir(out)
    try:
        save_file(to_bagel_state(state, mcfg), os.path.join(tmp, EMA_FILE), metadata={"format": "pt"})
        for name in sorted(os.listdir(base)):   # llm_config, the VAE, the tokenizer files
            src = os.path.join(base, name)
            if os.path.isfile(src) and name != EMA_FILE and (name in (LLM_CONFIG, VAE_FILE)
                                                             or "token" in name or name in ("vocab.json", "merges.txt")):
                shutil.copyfile(src, os.path.join(tmp, name))
        for name in os.listdir(tmp):
            fsync(os.path.join(tmp, name))
        fsync(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in(tmp, out)


def main(argv=None) -> int:
    """`unigrpo export checkpoint=DIR out=DIR [layout=unigrpo|bagel]`."""
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        cfg = load_config(ExportConfig, None, argv)
        out = export(cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"unigrpo export: error: {err}", file=sys.stderr)
        return 2
    print(f"exported {cfg.checkpoint} ({cfg.layout} layout) to {out}")
    return 0
