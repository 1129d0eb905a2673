"""The FLUX autoencoder (the VAE of FLUX.1 and BAGEL), our own implementation, loaded strictly from a local
ae.safetensors; plus the strict safetensors reader that bagel.py shares.

Architecture (Black Forest Labs' layout, whose parameter names ae.safetensors uses — our module tree
reproduces them exactly, so the key mapping is the identity):
    encoder.conv_in (3×3) → for level i: encoder.down.{i}.block.{j} (ResnetBlocks, j < num_res_blocks) and,
    except at the last level, encoder.down.{i}.downsample.conv (pad right/bottom by 1, 3×3 stride 2)
    → encoder.mid.{block_1, attn_1, block_2} → encoder.norm_out, swish, encoder.conv_out (3×3, 2·z channels:
    mean and log-variance);
    decoder.conv_in (3×3) → decoder.mid.{block_1, attn_1, block_2} → for level i from the last down to 0:
    decoder.up.{i}.block.{j} (j ≤ num_res_blocks) and, except at level 0, decoder.up.{i}.upsample.conv
    (nearest ×2, then 3×3) → decoder.norm_out, swish, decoder.conv_out.
    ResnetBlock: norm1, swish, conv1, norm2, swish, conv2, + the input (through a 1×1 nin_shortcut when the
    channel count changes). AttnBlock: GroupNorm, 1×1 q/k/v, one head over all h·w positions, 1×1 proj_out,
    residual. Every norm is GroupNorm(32 groups, eps 1e-6).
BAGEL-7B-MoT's ae.safetensors: ch 128, ch_mult (1, 2, 4, 4), 2 res blocks, z 16 channels, so 8× down
(1024 px → 16 × 128 × 128). These dims are read from the tensor shapes, never assumed.

Decisions:
- Latent normalisation z = scale·(mean − shift) with FLUX.1's scale 0.3611 and shift 0.1159 (BAGEL's
  `load_ae` uses the same numbers; they are not stored in ae.safetensors, so they are arguments here).
- `encode` returns the posterior mean by default (deterministic, what a reward or a training target wants);
  BAGEL's and FLUX's reference code samples mean + std·ε — pass `sample=True` (with a generator) for that.
- No diffusers and no einops: plain torch.

The strict reader (`load_safetensors_strict`) fills a module's state key by key through `safe_open`, so a
29 GB file never sits in memory twice; before reading any tensor it checks names and shapes and raises one
ValueError that names every missing key, every shape mismatch (expected vs found) and every unexpected key.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from unigrpo.checkpoint import key_problems

__all__ = ["FluxVAEParams", "FluxAutoencoder", "load_flux_vae", "load_safetensors_strict", "FLUX_SCALE",
           "FLUX_SHIFT"]

FLUX_SCALE, FLUX_SHIFT = 0.3611, 0.1159
_LIST_LIMIT = 10


@dataclass(frozen=True)
class FluxVAEParams:
    """Dimensions of a FLUX autoencoder."""

    in_channels: int = 3
    """image channels"""
    out_channels: int = 3
    """decoded image channels"""
    ch: int = 128
    """base width"""
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    """width multiplier per resolution level"""
    num_res_blocks: int = 2
    """ResnetBlocks per encoder level (the decoder has one more)"""
    z_channels: int = 16
    """latent channels"""
    groups: int = 32
    """GroupNorm groups"""
    scale_factor: float = FLUX_SCALE
    """latent normalisation: z = scale·(mean − shift)"""
    shift_factor: float = FLUX_SHIFT
    """latent normalisation shift"""

    @property
    def downsample(self) -> int:
        """pixels per latent cell along a side"""
        return 2 ** (len(self.ch_mult) - 1)

    @staticmethod
    def from_shapes(shapes: Mapping[str, tuple[int, ...]], **kw) -> "FluxVAEParams":
        """Dimensions read from the tensor shapes of an ae.safetensors (name → shape)."""
        def shape(key):
            if key not in shapes:
                raise ValueError(f"cannot read the VAE dimensions: key {key!r} is missing")
            return tuple(shapes[key])

        ch, in_channels = shape("encoder.conv_in.weight")[:2]
        levels = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down.")})
        if levels != list(range(len(levels))) or not levels:
            raise ValueError(f"encoder.down levels must be 0..n-1, found {levels}")
        blocks = {int(k.split(".")[4]) for k in shapes if k.startswith("encoder.down.0.block.")}
        ch_mult = []
        for i in levels:
            out = shape(f"encoder.down.{i}.block.0.conv1.weight")[0]
            if out % ch:
                raise ValueError(f"encoder.down.{i}.block.0.conv1.weight has {out} channels, not a multiple of {ch}")
            ch_mult.append(out // ch)
        z = shape("decoder.conv_in.weight")[1]
        return FluxVAEParams(in_channels=in_channels, out_channels=shape("decoder.conv_out.weight")[0], ch=ch,
                             ch_mult=tuple(ch_mult), num_res_blocks=len(blocks), z_channels=z, **kw)


def _norm(c: int, groups: int) -> nn.GroupNorm:
    if c % groups:
        raise ValueError(f"FLUX VAE: {c} channels are not divisible by {groups} GroupNorm groups")
    return nn.GroupNorm(groups, c, eps=1e-6, affine=True)


class _ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class _AttnBlock(nn.Module):
    """Single-head self-attention over the h·w positions."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = _norm(c, groups)
        self.q, self.k, self.v = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (t(h).reshape(B, 1, C, H * W).transpose(2, 3) for t in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)  # [B, 1, HW, C], scale 1/sqrt(C)
        return x + self.proj_out(a.transpose(2, 3).reshape(B, C, H, W))


class _Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding: right and bottom only


class _Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(c: int, groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = _ResnetBlock(c, c, groups)
    mid.attn_1 = _AttnBlock(c, groups)
    mid.block_2 = _ResnetBlock(c, c, groups)
    return mid


class FluxEncoder(nn.Module):
    """images [B, in, H, W] → moments [B, 2·z, H/d, W/d] (mean, log-variance)."""

    def __init__(self, p: FluxVAEParams):
        super().__init__()
        g = p.groups
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = p.ch
        for i, mult in enumerate(p.ch_mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(p.num_res_blocks):
                level.block.append(_ResnetBlock(cin, p.ch * mult, g))
                cin = p.ch * mult
            if i != len(p.ch_mult) - 1:
                level.downsample = _Downsample(cin)
            self.down.append(level)
        self.mid = _mid(cin, g)
        self.norm_out = _norm(cin, g)
        self.conv_out = nn.Conv2d(cin, 2 * p.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class FluxDecoder(nn.Module):
    """latents (unnormalised) [B, z, h, w] → images [B, out, h·d, w·d]."""

    def __init__(self, p: FluxVAEParams):
        super().__init__()
        g = p.groups
        cin = p.ch * p.ch_mult[-1]
        self.conv_in = nn.Conv2d(p.z_channels, cin, 3, padding=1)
        self.mid = _mid(cin, g)
        levels = []
        for i in reversed(range(len(p.ch_mult))):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(p.num_res_blocks + 1):
                level.block.append(_ResnetBlock(cin, p.ch * p.ch_mult[i], g))
                cin = p.ch * p.ch_mult[i]
            if i != 0:
                level.upsample = _Upsample(cin)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)  # up[i] is level i; they run from the last level down to 0
        self.norm_out = _norm(cin, g)
        self.conv_out = nn.Conv2d(cin, p.out_channels, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class FluxAutoencoder(nn.Module):
    """encoder + decoder; `encode` / `decode` apply the latent normalisation."""

    def __init__(self, params: FluxVAEParams):
        super().__init__()
        self.params = params
        self.encoder = FluxEncoder(params)
        self.decoder = FluxDecoder(params)

    def encode(self, images_B3HW, *, sample: bool = False, generator: torch.Generator | None = None):
        """images [B, 3, H, W] in [-1, 1] (H, W multiples of `params.downsample`) → normalised latents
        [B, z, H/d, W/d]: the posterior mean, or a sample of it when `sample`."""
        mean, logvar = self.encoder(images_B3HW).chunk(2, dim=1)
        z = mean
        if sample:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * eps
        return self.params.scale_factor * (z - self.params.shift_factor)

    def decode(self, latents_BzHW):
        """normalised latents [B, z, h, w] → images [B, 3, h·d, w·d] (nominally in [-1, 1]; not clamped)."""
        return self.decoder(latents_BzHW / self.params.scale_factor + self.params.shift_factor)


def load_flux_vae(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu", scale_factor: float = FLUX_SCALE,
                  shift_factor: float = FLUX_SHIFT) -> FluxAutoencoder:
    """A FluxAutoencoder with the dims and weights of a local ae.safetensors (strict: see the module docstring).
    Raises FileNotFoundError for a missing file and ValueError naming any bad key."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FLUX VAE weights not found: {path} (expected a local ae.safetensors)")
    with safe_open(path, framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    params = FluxVAEParams.from_shapes(shapes, scale_factor=scale_factor, shift_factor=shift_factor)
    with torch.device("meta"):
        vae = FluxAutoencoder(params)
    vae = vae.to(dtype).to_empty(device=device)
    load_safetensors_strict(vae, path, what="FLUX VAE")
    return vae.eval().requires_grad_(False)


def load_safetensors_strict(module: nn.Module, path: str | os.PathLike, *, key_map: Mapping[str, str] | None = None,
                            transforms: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
                            ignore_prefixes: tuple[str, ...] = (), consumed: tuple[str, ...] = (),
                            what: str = "checkpoint") -> list[str]:
    """Fill every entry of `module.state_dict()` from the safetensors file at `path`, key by key.

    key_map: our name → the file's key (identity when None or absent); transforms: our name → a function
    applied to the file's tensor (it must keep the shape, e.g. a permutation); ignore_prefixes: file keys
    deliberately not loaded; consumed: file keys the caller reads itself. Anything else in the file is
    unexpected. Names, shapes and coverage are checked before any tensor is read; returns the ignored keys."""
    from safetensors import safe_open

    key_map = dict(key_map or {})
    transforms = dict(transforms or {})
    targets = module.state_dict(keep_vars=True)
    stray = sorted(set(key_map) - set(targets))
    if stray:
        raise ValueError(f"key map names {len(stray)} entries the {type(module).__name__} lacks: {stray[:5]}")
    path = os.fspath(path)
    with safe_open(path, framework="pt") as f:
        file_keys = set(f.keys())
        missing, mismatched, used = [], [], set()
        for name, target in targets.items():
            key = key_map.get(name, name)
            used.add(key)
            if key not in file_keys:
                missing.append(key)
                continue
            found = list(f.get_slice(key).get_shape())
            if found != list(target.shape):
                mine = "" if key == name else f" (our {name})"
                mismatched.append(f"{key}: expected {list(target.shape)}{mine}, found {found}")
        rest = sorted(file_keys - used - set(consumed))
        ignored = [k for k in rest if k.startswith(tuple(ignore_prefixes))]
        unexpected = [k for k in rest if not k.startswith(tuple(ignore_prefixes))]
        problems = key_problems([("missing key(s)", missing), ("shape mismatch(es)", mismatched),
                                 ("unexpected key(s)", unexpected)], _LIST_LIMIT)
        if problems:
            raise ValueError(f"{what} {path} does not fit {type(module).__name__}: " + "; ".join(problems))
        with torch.no_grad():
            for name, target in targets.items():
                src = f.get_tensor(key_map.get(name, name))
                if name in transforms:
                    src = transforms[name](src)
                target.copy_(src)
    return ignored

