"""Building a model bundle (model, tokenizer, image codec): freshly initialised from a ModelConfig, or
loaded from a checkpoint directory (ours or BAGEL's)."""
from __future__ import annotations

import os
from dataclasses import fields

import torch

from unigrpo.checkpoint import load_checkpoint, load_state_strict
from unigrpo.model.bagel import load_bagel
from unigrpo.model.bundle import Bundle
from unigrpo.model.codec import build_codec
from unigrpo.model.config import ModelConfig
from unigrpo.model.tokenizer import build_tokenizer
from unigrpo.model.unified import UnifiedModel


def build_bundle(model_cfg: ModelConfig, tokenizer_spec: dict | None = None) -> Bundle:
    """A freshly initialised model with its tokenizer and codec. tokenizer_spec: {"kind": "byte"} (default
    for the pixel codec) or {"kind": "hf", "path": DIR}."""
    spec = dict(tokenizer_spec or {"kind": "byte"})
    tok = build_tokenizer(**spec)
    if tok.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but model.vocab_size is {model_cfg.vocab_size}")
    return Bundle(UnifiedModel(model_cfg), tok, build_codec(model_cfg), spec)


def model_config_of(config: dict, path: str) -> ModelConfig:
    """The ModelConfig recorded in a checkpoint's config.json contents (errors name `path` and the bad keys)."""
    model_dict = config.get("model")
    if not isinstance(model_dict, dict):
        raise ValueError(f"checkpoint {path}: config.json has no 'model' mapping (keys: {sorted(config)})")
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(model_dict) - known)
    if unknown:
        raise ValueError(f"checkpoint {path}: unknown model config keys {unknown}; expected a subset of "
                         f"{sorted(known)}")
    return ModelConfig(**model_dict)


def load_bundle(path: str, device: str | torch.device = "cpu", *, image_size: int = 1024) -> Bundle:
    """Rebuild the model recorded in a checkpoint directory and load its weights (strictly: a missing,
    unexpected or wrongly shaped tensor is an error naming it). A BAGEL checkpoint directory (llm_config.json,
    ema.safetensors, ae.safetensors, tokenizer files) is loaded with unigrpo.model.bagel.load_bagel in fp32
    (the trainer's master weights; FSDP gathers them in its param_dtype) at `image_size` pixels per side."""
    if os.path.exists(os.path.join(path, "llm_config.json")):
        return load_bagel(path, dtype=torch.float32, device=device, image_size=image_size)
    ckpt = load_checkpoint(path)
    bundle = build_bundle(model_config_of(ckpt.config, path), ckpt.config.get("tokenizer"))
    load_state_strict(bundle.model, ckpt.model_state)
    bundle.model.to(device)
    return bundle
