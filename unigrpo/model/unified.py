"""The BAGEL-style unified model: a mixture-of-transformers with a text expert and an image expert.

Every decoder-layer weight exists twice — index 0 is the text (understanding) expert, index 1 the image
(generation) expert: q/k/v/o projections, per-head q/k RMSNorm, both RMSNorms, the SwiGLU MLP, and the
final norm. Embeddings, lm_head and RoPE are shared. Tokens are routed by type (no router), and one
attention runs over the whole packed sequence (GQA). Image latents are patchified (p×p) into tokens,
projected in with a linear layer, plus a timestep embedding of σ and a fixed 2D sin-cos position table;
all tokens of one image share one RoPE position. The output projection to latent space starts at zero, so
a fresh model predicts v = 0. Two input conventions are config fields so BAGEL checkpoints load as they are
(unigrpo/model/bagel.py): the σ scale of the timestep features (`time_scale`) and which half of the 2D
table's channels encodes the row (`pos_table_order`).

Two ways to run it, with the same numbers (tests/test_model.py checks they agree):
- `forward_packed(layout, ...)`: the training path, one packed sequence per row (PackedLayout);
- the cached path: `new_cache`, `append_text` (prefill and decode), `append_image` (a clean block),
  `image_velocity` (a denoising step that attends to the cache and leaves it unchanged).

Legend: B rows, S tokens, H hidden, T text tokens, N image tokens, M image blocks, C/h/w latent dims,
P = patch values per token.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unigrpo.model.attention import attend, packed_attention_inputs, resolve_attention_backend
from unigrpo.model.config import ModelConfig
from unigrpo.model.layout import FULL, PAD, PackedLayout

TEXT_EXPERT, IMAGE_EXPERT = 0, 1


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


class ExpertBlock(nn.Module):
    """One expert's share of a decoder layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, hd = cfg.hidden, cfg.head_dim
        self.input_norm = RMSNorm(H, cfg.norm_eps)
        self.q_proj = nn.Linear(H, cfg.heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(H, cfg.kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(H, cfg.kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.heads * hd, H, bias=False)
        self.q_norm = RMSNorm(hd, cfg.norm_eps)
        self.k_norm = RMSNorm(hd, cfg.norm_eps)
        self.post_attn_norm = RMSNorm(H, cfg.norm_eps)
        self.gate_proj = nn.Linear(H, cfg.intermediate, bias=False)
        self.up_proj = nn.Linear(H, cfg.intermediate, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate, H, bias=False)

    def qkv(self, x_NH, heads: int, kv_heads: int):
        h = self.input_norm(x_NH)
        N = h.shape[0]
        q = self.q_norm(self.q_proj(h).view(N, heads, -1))
        k = self.k_norm(self.k_proj(h).view(N, kv_heads, -1))
        v = self.v_proj(h).view(N, kv_heads, -1)
        return q, k, v

    def mlp(self, x_NH):
        h = self.post_attn_norm(x_NH)
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class DecoderLayer(nn.Module):
    """One decoder layer: both experts' projections and MLPs around one attention over the sequence. Its
    `forward` is the unit that FSDP shards and activation checkpointing recomputes (unigrpo/distributed)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.experts = nn.ModuleList([ExpertBlock(cfg), ExpertBlock(cfg)])
        self.checkpointing = False
        """recompute this layer in the backward instead of keeping its activations (training only)"""

    def forward(self, x, routes, cos_f, sin_f, B: int, S: int, zero_fill: bool, *, mask=None, block_mask=None,
                plan=None, backend: str = "sdpa", cache: KVCache | None = None, li: int = 0, append: bool = False):
        """x [B·S, H] → [B·S, H]. routes: (expert, token indices) pairs; cos_f/sin_f [B·S, hd]; zero_fill: some
        tokens are padding (they get zero q/k/v and keep their hidden state). mask / block_mask / plan: the
        attention backend's inputs (unigrpo.model.attention.attend). With `cache`, this layer's cached K/V
        (index li) are prepended, and written first when `append`."""
        if self.checkpointing and cache is None and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(
                self._forward, x, routes, cos_f, sin_f, B, S, zero_fill, mask, block_mask, plan, backend, None, li,
                append, use_reentrant=False)
        return self._forward(x, routes, cos_f, sin_f, B, S, zero_fill, mask, block_mask, plan, backend, cache, li,
                             append)

    def _forward(self, x, routes, cos_f, sin_f, B, S, zero_fill, mask, block_mask, plan, backend, cache, li, append):
        cfg = self.cfg
        hd = cfg.head_dim
        new_qkv = x.new_zeros if zero_fill else x.new_empty
        q = new_qkv(B * S, cfg.heads, hd)
        k = new_qkv(B * S, cfg.kv_heads, hd)
        v = new_qkv(B * S, cfg.kv_heads, hd)
        for e, idx, frozen in routes:
            with torch.no_grad() if frozen else contextlib.nullcontext():
                qe, ke, ve = self.experts[e].qkv(x[idx], cfg.heads, cfg.kv_heads)
                q[idx] = apply_rope(qe, cos_f[idx], sin_f[idx])
                k[idx] = apply_rope(ke, cos_f[idx], sin_f[idx])
                v[idx] = ve
        q = q.view(B, S, cfg.heads, hd).transpose(1, 2)
        k = k.view(B, S, cfg.kv_heads, hd).transpose(1, 2)
        v = v.view(B, S, cfg.kv_heads, hd).transpose(1, 2)
        if cache is not None:
            L = cache.length
            if append:
                cache.k[li][:, :, L:L + S] = k
                cache.v[li][:, :, L:L + S] = v
                k, v = cache.k[li][:, :, :L + S], cache.v[li][:, :, :L + S]
            else:
                k = torch.cat([cache.k[li][:, :, :L], k], dim=2)
                v = torch.cat([cache.v[li][:, :, :L], v], dim=2)
        attn = attend(q, k, v, mask=mask, block_mask=block_mask, plan=plan, backend=backend)
        attn = attn.transpose(1, 2).reshape(B * S, cfg.heads * hd)
        out = x.detach().clone() if zero_fill else torch.empty_like(x)   # every real row is written below
        for e, idx, frozen in routes:
            ex = self.experts[e]
            with torch.no_grad() if frozen else contextlib.nullcontext():
                h = x[idx] + ex.o_proj(attn[idx])
                out[idx] = h + ex.mlp(h)
        return out


def rope_cos_sin(pos, head_dim: int, theta: float, dtype):
    """pos [...] int → cos, sin [..., head_dim] (rotate-half convention)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float64) / head_dim))
    ang = pos.to(torch.float64)[..., None] * inv
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x [..., heads, hd]; cos/sin [..., hd] broadcast over heads."""
    x1, x2 = x.chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    return x * cos[..., None, :] + rot * sin[..., None, :]


def timestep_features(sigma_M, dim: int = 256, scale: float = 1000.0):
    """Sinusoidal features [cos, sin] of scale·σ, σ ∈ [0, 1] → [M, dim] float64 (cfg.time_scale: 1000 for our
    presets, 1 for BAGEL checkpoints)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=sigma_M.device, dtype=torch.float64) / half)
    ang = sigma_M.to(torch.float64)[:, None] * scale * freqs
    return torch.cat([ang.cos(), ang.sin()], dim=-1)


def sincos_2d_table(grid: int, dim: int, order: str = "row-col"):
    """Fixed 2D sin-cos position table [grid*grid, dim] float64, entry row·grid + col: the first dim//2 channels
    encode the row ("row-col") or the column ("col-row", BAGEL's / DiT's table), the rest the other axis."""
    def one_axis(n, d):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        ang = torch.arange(n, dtype=torch.float64)[:, None] * omega
        return torch.cat([ang.sin(), ang.cos()], dim=1)  # [n, d]

    d_half = dim // 2
    first = one_axis(grid, d_half)
    second = one_axis(grid, dim - d_half)
    idx = torch.arange(grid)
    rows, cols = idx[:, None].expand(grid, grid), idx[None, :].expand(grid, grid)
    a, b = (cols, rows) if order == "col-row" else (rows, cols)
    return torch.cat([first[a], second[b]], dim=-1).reshape(grid * grid, dim)


def patchify(latent_BChw, p: int):
    """[B, C, h, w] → [B, (h/p)(w/p), C·p·p] (row-major tokens)."""
    B, C, h, w = latent_BChw.shape
    x = latent_BChw.reshape(B, C, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (h // p) * (w // p), C * p * p)


def unpatchify(tokens_BNP, p: int, C: int, h: int, w: int):
    B = tokens_BNP.shape[0]
    x = tokens_BNP.reshape(B, h // p, w // p, C, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, C, h, w)


@dataclass
class KVCache:
    """Preallocated per-layer K/V: k, v [B, kv_heads, capacity, head_dim]; `valid` [B, capacity] marks real
    tokens (padding and tokens after a row finished are False); `next_pos` [B] is the next RoPE position;
    `length` the number of filled columns."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    valid: torch.Tensor
    next_pos: torch.Tensor
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]


class UnifiedModel(nn.Module):
    """See the module docstring. `cfg` is a ModelConfig."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden
        self.embed = nn.Embedding(cfg.vocab_size, H)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.layers)])
        self.final_norms = nn.ModuleList([RMSNorm(H, cfg.norm_eps), RMSNorm(H, cfg.norm_eps)])
        self.lm_head = nn.Linear(H, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.image_in = nn.Linear(cfg.patch_dim, H)
        self.image_out = nn.Linear(H, cfg.patch_dim)
        self.time_embed = nn.Sequential(nn.Linear(256, H), nn.SiLU(), nn.Linear(H, H))
        self.register_buffer("pos_table", sincos_2d_table(cfg.max_latent_size, H, cfg.pos_table_order).float(),
                             persistent=False)
        self.reset_parameters()

    # ------------------------------------------------------------------ parameters
    def reset_parameters(self, std: float = 0.02):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        nn.init.zeros_(self.image_out.weight)
        nn.init.zeros_(self.image_out.bias)
        self.reset_buffers()

    def reset_buffers(self):
        """Recompute the non-persistent buffers (the 2D position table), e.g. after `to_empty`."""
        if not self.pos_table.is_meta:
            self.pos_table.copy_(sincos_2d_table(self.cfg.max_latent_size, self.cfg.hidden, self.cfg.pos_table_order))

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """"text": the text expert + embeddings + lm_head; "image": the image expert + in/out projections +
        time embedding (ALGORITHM.md §9's two AdamW groups)."""
        groups = {"text": [], "image": []}
        seen = set()
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            image = (".experts.1." in name or name.startswith(("final_norms.1", "image_in", "image_out",
                                                                   "time_embed")))
            groups["image" if image else "text"].append(p)
        return groups

    def num_params(self, active: bool = False) -> int:
        """All parameters, or those one token uses (one expert per layer)."""
        total = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
        if not active:
            return total
        return total - sum(p.numel() for n, p in self.named_parameters() if ".experts.1." in n
                           or n.startswith("final_norms.1"))

    # ------------------------------------------------------------------ inputs
    def embed_images(self, latents_MChw, sigma_M):
        """Clean or noisy latents [M, C, h, w] at σ [M] → image token inputs [M, N, H]."""
        cfg = self.cfg
        tokens = patchify(latents_MChw, cfg.patch).to(self.image_in.weight.dtype)
        g = latents_MChw.shape[-1] // cfg.patch
        gh = latents_MChw.shape[-2] // cfg.patch
        rows = torch.arange(gh, device=tokens.device)[:, None] * cfg.max_latent_size
        idx = (rows + torch.arange(g, device=tokens.device)[None, :]).reshape(-1)
        t = self.time_embed(timestep_features(sigma_M.to(tokens.device), scale=cfg.time_scale).to(tokens.dtype))
        return self.image_in(tokens) + t[:, None, :] + self.pos_table[idx].to(tokens.dtype)

    def velocity_from_hidden(self, hidden_MNH, latent_shape):
        """Final image norm + output projection → velocity [M, C, h, w]."""
        C, h, w = latent_shape
        out = self.image_out(self.final_norms[IMAGE_EXPERT](hidden_MNH))
        return unpatchify(out, self.cfg.patch, C, h, w)

    def logits(self, text_hidden):
        """text hidden (after the final text norm) → logits (fp32 is up to the caller)."""
        return self.lm_head(text_hidden)

    # ------------------------------------------------------------------ core
    def _layers(self, x_BSH, image_BS, cos, sin, *, mask=None, block_mask=None, plan=None,
                cache: KVCache | None = None, append: bool = False, backend: str = "sdpa", pad_BS=None,
                frozen_BS=None):
        """Run every decoder layer. Text and image tokens go through their own expert; one attention over
        the sequence (plus the cache's columns when given). Padding tokens (pad_BS True) skip both experts
        (zero q/k/v, hidden left as is): in a packed batch they are a quarter of the tokens. Image tokens with
        frozen_BS True are computed without grad: fixed context that no gradient flows into.
        Returns hidden [B, S, H] (before final norms)."""
        cfg = self.cfg
        B, S, H = x_BSH.shape
        x = x_BSH.reshape(B * S, H)
        flat_img = image_BS.reshape(-1)
        keep = None if pad_BS is None else ~pad_BS.reshape(-1)
        frozen = None if frozen_BS is None else frozen_BS.reshape(-1)
        routes = []   # (expert, token indices, computed without grad)
        for e in (TEXT_EXPERT, IMAGE_EXPERT):
            sel = flat_img if e == IMAGE_EXPERT else ~flat_img
            sel = sel if keep is None else sel & keep
            parts = [(sel, False)] if frozen is None or e == TEXT_EXPERT else \
                [(sel & ~frozen, False), (sel & frozen, True)]
            for part, no_grad in parts:
                idx = torch.nonzero(part).squeeze(1)
                if idx.numel() > 0:
                    routes.append((e, idx, no_grad))
        zero_fill = not (keep is None or bool(keep.all()))
        hd = cfg.head_dim
        cos_f, sin_f = cos.reshape(B * S, hd), sin.reshape(B * S, hd)
        for li, layer in enumerate(self.layers):
            x = layer(x, routes, cos_f, sin_f, B, S, zero_fill, mask=mask, block_mask=block_mask, plan=plan,
                      backend=backend, cache=cache, li=li, append=append)
        return x.view(B, S, H)

    def _image_layers(self, x_BNH, cos, sin, *, mask=None, cache: KVCache | None = None, append: bool = False):
        """`_layers` for a sequence of image tokens only (one image block per row: no text, no padding). The
        route is fixed in code — every token to the image expert through a full slice — so there is no
        torch.nonzero and no host sync, and a denoising step can be captured in a CUDA graph
        (unigrpo/rollout/graphs.py). Same ops on the same values as `_layers(x, all-True, ...)`: x[:] is x and
        x[arange] a copy of it, so the results are bit-identical (tests/test_rollout_fast.py).
        x_BNH [B, N, H] → hidden [B, N, H] (before the final norm)."""
        B, N, H = x_BNH.shape
        hd = self.cfg.head_dim
        routes = [(IMAGE_EXPERT, slice(None), False)]
        x = x_BNH.reshape(B * N, H)
        cos_f, sin_f = cos.reshape(B * N, hd), sin.reshape(B * N, hd)
        for li, layer in enumerate(self.layers):
            x = layer(x, routes, cos_f, sin_f, B, N, False, mask=mask, cache=cache, li=li, append=append)
        return x.view(B, N, H)

    def _final_text(self, hidden_BSH):
        return self.final_norms[TEXT_EXPERT](hidden_BSH)

    # ------------------------------------------------------------------ packed (training) path
    def forward_packed(self, layout: PackedLayout, text_ids_BS, latents_MChw=None, sigma_M=None,
                       backend: str = "sdpa", text_head=None, context_grad: bool = True):
        """One forward over a packed batch.

        text_ids_BS: long [B, S] (values at image/pad positions are ignored);
        latents_MChw, sigma_M: one latent and σ per image block of the layout, in layout.block_starts order.
        backend: the attention backend ("sdpa", "flex", "split", "flash", or "auto" resolved for this device;
        unigrpo.model.attention); its mask / block mask / plan is built once per layout and reused.
        text_head: optional fn(text_hidden [B, S, H], lm_head weight [V, H]) applied inside this forward (under
        FSDP the weight is only gathered during a forward), e.g. the fused token log-probs.
        context_grad: False computes the clean image blocks (Segment "full": the history images x̄ of an
        episode) without grad, so no loss trains their encoding (ALGORITHM.md §12); the values are unchanged.
        Returns (text_hidden [B, S, H] after the final text norm — meaningful at text positions — or
                 text_head's result, velocity [M, C, h, w] or None)."""
        B, S = layout.shape
        if text_ids_BS.shape != (B, S):
            raise ValueError(f"text_ids has shape {tuple(text_ids_BS.shape)}, layout expects {(B, S)}")
        M = len(layout.block_starts)
        if M and (latents_MChw is None or latents_MChw.shape[0] != M or sigma_M is None or sigma_M.shape != (M,)):
            got = None if latents_MChw is None else tuple(latents_MChw.shape)
            raise ValueError(f"layout has {M} image blocks; got latents {got} and sigma "
                             f"{None if sigma_M is None else tuple(sigma_M.shape)}")
        ids = text_ids_BS.clamp(0, self.cfg.vocab_size - 1)
        x = self.embed(ids)
        image_BS = layout.is_image_BS
        if M:
            img = self.embed_images(latents_MChw, sigma_M)
            x = x.clone()
            for m, (b, start, n) in enumerate(layout.block_starts):
                if n != img.shape[1]:
                    raise ValueError(f"image block {m} has {n} tokens in the layout but its latent "
                                     f"{tuple(latents_MChw.shape[1:])} gives {img.shape[1]}")
                x[b, start:start + n] = img[m]
        cos, sin = rope_cos_sin(layout.pos_BS, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        if backend == "auto":
            backend = resolve_attention_backend(backend, x.device)
        attn_inputs = packed_attention_inputs(layout, backend)
        frozen = None if context_grad or FULL not in layout.block_kinds else layout.kind_BS == FULL
        hidden = self._layers(x, image_BS, cos, sin, backend=backend, pad_BS=layout.kind_BS == PAD,
                              frozen_BS=frozen, **attn_inputs)
        velocity = None
        if M:
            img_hidden = torch.stack([hidden[b, s:s + n] for b, s, n in layout.block_starts])
            velocity = self.velocity_from_hidden(img_hidden, latents_MChw.shape[1:])
        text = self._final_text(hidden)
        return (text if text_head is None else text_head(text, self.lm_head.weight)), velocity

    # ------------------------------------------------------------------ cached (inference) path
    def new_cache(self, batch: int, capacity: int, device=None, dtype=None) -> KVCache:
        cfg = self.cfg
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        shape = (batch, cfg.kv_heads, capacity, cfg.head_dim)
        return KVCache(k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.layers)],
                       v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.layers)],
                       valid=torch.zeros(batch, capacity, dtype=torch.bool, device=device),
                       next_pos=torch.zeros(batch, dtype=torch.long, device=device))

    def _cache_mask(self, cache: KVCache, new_valid_BS, causal: bool):
        """bool [B, 1, S, L+S]: cached valid columns, plus the new tokens (causal or bidirectional);
        invalid new tokens see only themselves."""
        B, S = new_valid_BS.shape
        L = cache.length
        old = cache.valid[:, None, :L].expand(B, S, L)
        eye = torch.eye(S, dtype=torch.bool, device=new_valid_BS.device)
        new = (torch.tril(torch.ones(S, S, dtype=torch.bool, device=eye.device)) if causal
               else torch.ones(S, S, dtype=torch.bool, device=eye.device))
        new = new[None] & new_valid_BS[:, None, :]
        old = old & new_valid_BS[:, :, None]
        new = new | (eye[None] & ~new_valid_BS[:, :, None])
        return torch.cat([old, new], dim=2)[:, None]

    def _check_room(self, cache: KVCache, n: int):
        if cache.length + n > cache.capacity:
            raise ValueError(f"KV cache full: {cache.length} + {n} tokens exceed its capacity {cache.capacity}")

    def append_text(self, cache: KVCache, ids_BS, valid_BS=None):
        """Prefill or decode: run text tokens [B, S] causally after the cache and append them.
        valid_BS marks real tokens (left padding / finished rows False). Returns text hidden [B, S, H]
        after the final norm."""
        B, S = ids_BS.shape
        self._check_room(cache, S)
        valid = torch.ones_like(ids_BS, dtype=torch.bool) if valid_BS is None else valid_BS.bool()
        pos = cache.next_pos[:, None] + torch.cumsum(valid.long(), dim=1) - 1
        pos = pos.clamp_min(0)
        cos, sin = rope_cos_sin(pos, self.cfg.head_dim, self.cfg.rope_theta, self.embed.weight.dtype)
        x = self.embed(ids_BS.clamp(0, self.cfg.vocab_size - 1))
        mask = self._cache_mask(cache, valid, causal=True)
        image = torch.zeros_like(valid)
        hidden = self._layers(x, image, cos, sin, mask=mask, cache=cache, append=True)
        cache.valid[:, cache.length:cache.length + S] = valid
        cache.length += S
        cache.next_pos += valid.long().sum(1)
        return self._final_text(hidden)

    def _image_block(self, cache: KVCache, latents_BChw, sigma_B, append: bool, static_route: bool = True):
        """One image block after the cache. static_route: run it through `_image_layers` (no torch.nonzero);
        False takes the general `_layers` routing (tests compare the two)."""
        B = latents_BChw.shape[0]
        x = self.embed_images(latents_BChw, sigma_B)
        N = x.shape[1]
        if append:
            self._check_room(cache, N)
        pos = cache.next_pos[:, None].expand(B, N)
        cos, sin = rope_cos_sin(pos, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        valid = torch.ones(B, N, dtype=torch.bool, device=x.device)
        mask = self._cache_mask(cache, valid, causal=False)
        if static_route:
            hidden = self._image_layers(x, cos, sin, mask=mask, cache=cache, append=append)
        else:
            hidden = self._layers(x, valid, cos, sin, mask=mask, cache=cache, append=append)
        if append:
            cache.valid[:, cache.length:cache.length + N] = True
            cache.length += N
            cache.next_pos += 1
        return self.velocity_from_hidden(hidden, latents_BChw.shape[1:])

    def image_velocity(self, cache: KVCache, latents_BChw, sigma_B):
        """A denoising evaluation: v_θ(x, σ | cached context) [B, C, h, w]; the cache is not changed."""
        return self._image_block(cache, latents_BChw, sigma_B, append=False)

    def append_image(self, cache: KVCache, latents_BChw, sigma_B):
        """Append a clean ("full") image block to the cache; returns its velocity output."""
        return self._image_block(cache, latents_BChw, sigma_B, append=True)
