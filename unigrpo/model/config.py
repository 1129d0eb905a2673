"""Model configuration and presets of the BAGEL-style unified model.

Presets:
- `tiny`: CPU demo on the shapes world. Pixel-space images (the "latent" is the 32×32 RGB canvas
  space-to-depth'ed by 4: 48 channels × 8×8), so a 2×2 patch is an 8×8-px cell — exactly one object of the
  shapes world — and an image is 16 tokens of 192 values; byte-level tokenizer, no files needed.
- `small`: one GPU; a FLUX-style latent (16 channels, 8× down) at 256 px.
- `bagel-7b`: the shape of BAGEL-7B-MoT's language model (Qwen2-7B decoder, duplicated into two experts):
  hidden 3584, 28 layers, 28 heads, 4 KV heads, intermediate 18944, vocab 152064, rope θ 1e6, q/k/v bias,
  1024-px images through a 16-channel FLUX VAE (128×128 latent, 2×2 patches → 4096 tokens of 64 values).
  Weights come from a local BAGEL checkpoint directory (unigrpo/model/bagel.py); nothing is downloaded.
  It also takes BAGEL's two input conventions (new fields, defaults unchanged for the other presets):
  σ enters the timestep features unscaled (`time_scale` 1.0) and the 2D sin-cos table puts the column in
  the first half of the channels (`pos_table_order` "col-row").
"""
from __future__ import annotations

from dataclasses import dataclass, replace

PRESETS = ("tiny", "small", "bagel-7b")


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of the unified (mixture-of-transformers) model."""

    name: str = "tiny"
    """preset name this config derives from (informational)"""
    vocab_size: int = 264
    """text vocabulary size (embedding rows)"""
    hidden: int = 192
    """model width"""
    layers: int = 4
    """decoder layers (each holds a text expert and an image expert)"""
    heads: int = 6
    """query heads"""
    kv_heads: int = 2
    """key/value heads (GQA); must divide `heads`"""
    intermediate: int = 512
    """SwiGLU inner width"""
    rope_theta: float = 10000.0
    """RoPE base"""
    norm_eps: float = 1e-6
    """RMSNorm epsilon"""
    qkv_bias: bool = True
    """bias on q/k/v projections (Qwen2 style)"""
    tie_embeddings: bool = False
    """lm_head shares the embedding matrix"""
    max_text_len: int = 160
    """longest text (prompt + reasoning) in tokens"""
    latent_channels: int = 48
    """channels of the image latent"""
    latent_size: int = 8
    """height = width of the image latent"""
    patch: int = 2
    """latent patch size: tokens carry latent_channels·patch² values"""
    image_size: int = 32
    """pixels per side of the decoded image"""
    codec: str = "pixel"
    """image codec: "pixel" (space-to-depth of the RGB canvas) or "flux-vae" (a FLUX-style VAE)"""
    max_latent_size: int = 64
    """side (in patches) of the fixed 2D sin-cos position table"""
    pos_table_order: str = "row-col"
    """which half of the 2D sin-cos table's channels encodes the patch row: "row-col" (first half row, second
    half column; our presets) or "col-row" (first half column — the DiT/MAE table BAGEL uses)"""
    time_scale: float = 1000.0
    """σ is multiplied by this before the sinusoidal timestep features (1000 for our presets; BAGEL: 1.0)"""
    vae_path: str = ""
    """local ae.safetensors of the "flux-vae" codec ("" = none; load_bagel sets it); never downloaded"""

    def __post_init__(self):
        def need(cond: bool, msg: str):
            if not cond:
                raise ValueError(f"model.{msg}")

        for field in ("vocab_size", "hidden", "layers", "heads", "kv_heads", "intermediate", "max_text_len",
                      "latent_channels", "latent_size", "patch", "image_size", "max_latent_size"):
            value = getattr(self, field)
            need(isinstance(value, int) and value > 0, f"{field} must be a positive int, got {value!r}")
        need(self.hidden % self.heads == 0, f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        need(self.heads % self.kv_heads == 0, f"heads ({self.heads}) must be divisible by kv_heads ({self.kv_heads})")
        need((self.hidden // self.heads) % 2 == 0, f"head dim {self.hidden // self.heads} must be even for RoPE")
        need(self.latent_size % self.patch == 0,
             f"latent_size ({self.latent_size}) must be divisible by patch ({self.patch})")
        need(self.latent_size // self.patch <= self.max_latent_size,
             f"latent grid {self.latent_size // self.patch} exceeds max_latent_size {self.max_latent_size}")
        need(self.codec in ("pixel", "flux-vae"), f"codec must be 'pixel' or 'flux-vae', got {self.codec!r}")
        need(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}")
        need(self.pos_table_order in ("row-col", "col-row"),
             f"pos_table_order must be 'row-col' or 'col-row', got {self.pos_table_order!r}")
        need(self.time_scale > 0, f"time_scale must be > 0, got {self.time_scale}")
        need(isinstance(self.vae_path, str), f"vae_path must be a string path, got {self.vae_path!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def patch_dim(self) -> int:
        """values per image token"""
        return self.latent_channels * self.patch * self.patch

    @property
    def image_tokens(self) -> int:
        """tokens per image block"""
        return (self.latent_size // self.patch) ** 2

    @property
    def latent_numel(self) -> int:
        """D: latent elements per sample (ALGORITHM.md §3)"""
        return self.latent_channels * self.latent_size * self.latent_size


def preset(name: str, **overrides) -> ModelConfig:
    """The ModelConfig of a preset, with field overrides."""
    if name == "tiny":
        cfg = ModelConfig()
    elif name == "small":
        cfg = ModelConfig(name="small", vocab_size=32768, hidden=1024, layers=16, heads=16, kv_heads=4,
                          intermediate=2816, max_text_len=1024, latent_channels=16, latent_size=32,
                          image_size=256, codec="flux-vae")
    elif name == "bagel-7b":
        cfg = ModelConfig(name="bagel-7b", vocab_size=152064, hidden=3584, layers=28, heads=28, kv_heads=4,
                          intermediate=18944, rope_theta=1e6, max_text_len=32768, latent_channels=16,
                          latent_size=128, image_size=1024, codec="flux-vae", time_scale=1.0,
                          pos_table_order="col-row")
    else:
        raise ValueError(f"unknown model preset {name!r}; expected one of {', '.join(PRESETS)}")
    return replace(cfg, **overrides) if overrides else cfg
