"""Loading a local BAGEL checkpoint directory (the BAGEL-7B-MoT layout) into our model bundle.

The directory holds:
    llm_config.json   Qwen2 config (+ BAGEL's qk_norm / layer_module fields): the language model's dims
    ema.safetensors   the unified model's weights (keys as in BAGEL's `Bagel` module: language_model.*,
                      time_embedder.*, vae2llm.*, llm2vae.*, latent_pos_embed.*, vit_model.*, connector.*, ...)
    ae.safetensors    the FLUX VAE (unigrpo/model/flux_vae.py)
    tokenizer files   a Qwen2 tokenizer (vocab.json + merges.txt or tokenizer.json; tokenizer_config.json)
Nothing is downloaded; every file is read locally.

Mapping (the one table, `GLOBAL_KEYS` + `EXPERT_KEYS`; L = "language_model.model."; layer i; the text
expert 0 has BAGEL's plain names, the image expert 1 the "_moe_gen" ones):
    L.embed_tokens.weight                         → embed.weight
    language_model.lm_head.weight                 → lm_head.weight            (untied, as BAGEL forces)
    L.norm.weight / L.norm_moe_gen.weight         → final_norms.{0,1}.weight
    L.layers.i.input_layernorm{,_moe_gen}         → layers.i.experts.{0,1}.input_norm
    L.layers.i.post_attention_layernorm{,_moe_gen}→ ….post_attn_norm
    L.layers.i.self_attn.{q,k,v}_proj{,_moe_gen}  → ….{q,k,v}_proj (weight + bias)
    L.layers.i.self_attn.o_proj{,_moe_gen}        → ….o_proj
    L.layers.i.self_attn.{q,k}_norm{,_moe_gen}    → ….{q,k}_norm
    L.layers.i.mlp{,_moe_gen}.{gate,up,down}_proj → ….{gate,up,down}_proj
    time_embedder.mlp.{0,2}                       → time_embed.{0,2}          (Linear 256→H, SiLU, Linear H→H)
    vae2llm                                       → image_in                  (input columns permuted, below)
    llm2vae                                       → image_out                 (output rows permuted, below)
    latent_pos_embed.pos_embed                    → not loaded: checked equal to our fixed table
Ignored on purpose (listed in one log line): vit_model.* (SigLIP, understanding), connector.* and
vit_pos_embed.* (its projection and position table), language_model.model.rotary_emb.* (recomputed).
Any other key is an error, as is a missing key or a shape mismatch (each named, with expected vs found shape).

Where BAGEL's conventions differ from our model's defaults, and how this loader bridges them (so no weight
that matters for generation is dropped):
- Patch token layout: BAGEL flattens a p×p latent patch channel-last (p, q, c) ("chpwq->hwpqc"); ours is
  channel-first (c, p, q). Exact fix at load time: vae2llm's input columns and llm2vae's output rows (and
  bias) are permuted (`patch_permutation`); the model is unchanged.
- Timestep features: BAGEL feeds σ itself (t ∈ [0, 1], no ×1000) to [cos, sin] features → `time_scale` 1.0.
- 2D position table: BAGEL's (DiT's) table encodes the column in the first half of the channels →
  `pos_table_order` "col-row" (detected by comparing latent_pos_embed.pos_embed with both layouts; a table
  matching neither is an error). Its side is `max_latent_size` (64 for BAGEL-7B-MoT: 1024 px / 16); the
  index row·max_latent_size + col is the same as ours.
- Same as ours, checked from the source: x_t = (1−t)·x0 + t·ε, v = ε − x0; q/k/v bias, per-head q/k RMSNorm
  before RoPE (rotate-half, θ from the config); GQA; SwiGLU; RMSNorm in fp32; the image expert's final norm
  feeds llm2vae; every token of an image block shares one RoPE position.
Not bridged here — sequence-layout choices of the rollout/trainer, not weights (docs/DESIGN.md,
"BAGEL checkpoints"): BAGEL wraps each image block in <|vision_start|> … <|vision_end|> text tokens that take
the image's RoPE position and attend bidirectionally with it, advances the position by one per image, and
gives clean (conditioning) images t = 0.

Memory: the model is built on the meta device, materialised empty in the requested dtype (by default the
checkpoint's: bf16 for the real file, ~28 GB for 14B parameters), then filled tensor by tensor through
`safe_open`; the ~29 GB file is never loaded whole.
"""
from __future__ import annotations

import logging
import math
import os

import torch

from unigrpo.model.bundle import Bundle
from unigrpo.model.codec import FluxVAECodec
from unigrpo.model.config import ModelConfig
from unigrpo.checkpoint import read_json_object
from unigrpo.model.flux_vae import load_flux_vae, load_safetensors_strict
from unigrpo.model.tokenizer import build_tokenizer
from unigrpo.model.unified import UnifiedModel, sincos_2d_table
from unigrpo.model.flux_vae import FluxVAEParams

__all__ = ["load_bagel", "bagel_model_config", "bagel_key_map", "patch_permutation", "GLOBAL_KEYS", "EXPERT_KEYS",
           "IGNORED_PREFIXES", "POS_EMBED_KEY"]

log = logging.getLogger(__name__)

LLM_CONFIG, EMA_FILE, VAE_FILE = "llm_config.json", "ema.safetensors", "ae.safetensors"
POS_EMBED_KEY = "latent_pos_embed.pos_embed"
IGNORED_PREFIXES = ("vit_model.", "connector.", "vit_pos_embed.", "language_model.model.rotary_emb.")

_L = "language_model.model."
# (our name, BAGEL key, transform): transform "patch_in" permutes dim 1, "patch_out" dim 0 (patch_permutation)
GLOBAL_KEYS = (
    ("embed.weight", _L + "embed_tokens.weight", None),
    ("lm_head.weight", "language_model.lm_head.weight", None),
    ("final_norms.0.weight", _L + "norm.weight", None),
    ("final_norms.1.weight", _L + "norm_moe_gen.weight", None),
    ("time_embed.0.weight", "time_embedder.mlp.0.weight", None),
    ("time_embed.0.bias", "time_embedder.mlp.0.bias", None),
    ("time_embed.2.weight", "time_embedder.mlp.2.weight", None),
    ("time_embed.2.bias", "time_embedder.mlp.2.bias", None),
    ("image_in.weight", "vae2llm.weight", "patch_in"),
    ("image_in.bias", "vae2llm.bias", None),
    ("image_out.weight", "llm2vae.weight", "patch_out"),
    ("image_out.bias", "llm2vae.bias", "patch_out"),
)
# (ours under layers.{i}.experts.{e}., BAGEL's under language_model.model.layers.{i}.; {x} = EXPERT_SUFFIX[e])
EXPERT_KEYS = (
    ("input_norm.weight", "input_layernorm{x}.weight"),
    ("post_attn_norm.weight", "post_attention_layernorm{x}.weight"),
    ("q_proj.weight", "self_attn.q_proj{x}.weight"),
    ("q_proj.bias", "self_attn.q_proj{x}.bias"),
    ("k_proj.weight", "self_attn.k_proj{x}.weight"),
    ("k_proj.bias", "self_attn.k_proj{x}.bias"),
    ("v_proj.weight", "self_attn.v_proj{x}.weight"),
    ("v_proj.bias", "self_attn.v_proj{x}.bias"),
    ("o_proj.weight", "self_attn.o_proj{x}.weight"),
    ("q_norm.weight", "self_attn.q_norm{x}.weight"),
    ("k_norm.weight", "self_attn.k_norm{x}.weight"),
    ("gate_proj.weight", "mlp{x}.gate_proj.weight"),
    ("up_proj.weight", "mlp{x}.up_proj.weight"),
    ("down_proj.weight", "mlp{x}.down_proj.weight"),
)
EXPERT_SUFFIX = ("", "_moe_gen")  # expert 0: text ("und"), expert 1: image ("gen")

_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def bagel_key_map(cfg: ModelConfig) -> dict[str, tuple[str, str | None]]:
    """our parameter name → (BAGEL ema.safetensors key, transform or None), for every parameter of
    UnifiedModel(cfg)."""
    out = {ours: (theirs, tf) for ours, theirs, tf in GLOBAL_KEYS}
    for i in range(cfg.layers):
        for e, x in enumerate(EXPERT_SUFFIX):
            for ours, theirs in EXPERT_KEYS:
                if ours.endswith(".bias") and not cfg.qkv_bias:
                    continue
                out[f"layers.{i}.experts.{e}.{ours}"] = (f"{_L}layers.{i}.{theirs.format(x=x)}", None)
    return out


def patch_permutation(channels: int, patch: int) -> torch.Tensor:
    """perm [C·p²] long: ours[..., j] = BAGEL's[..., perm[j]] for a patch vector (ours (c, p, q), BAGEL's
    (p, q, c) order)."""
    return torch.arange(patch * patch * channels).view(patch, patch, channels).permute(2, 0, 1).reshape(-1)


def _read_llm_config(path: str) -> dict:
    """ModelConfig fields from a Qwen2-style llm_config.json; unsupported options are errors naming them."""
    llm = read_json_object(path, "cannot read")

    def need(field):
        if field not in llm:
            raise ValueError(f"{path}: required field {field!r} is missing")
        return llm[field]

    checks = [
        ("model_type", lambda v: v in (None, "qwen2"), "'qwen2'"),
        ("hidden_act", lambda v: v in (None, "silu"), "'silu' (SwiGLU)"),
        ("rope_scaling", lambda v: v is None, "null (plain RoPE)"),
        ("use_sliding_window", lambda v: not v, "false (full attention)"),
    ]
    for field, ok, expected in checks:
        if not ok(llm.get(field)):
            raise ValueError(f"{path}: {field} = {llm[field]!r} is not supported; expected {expected}")
    hidden, heads = need("hidden_size"), need("num_attention_heads")
    if llm.get("head_dim") not in (None, hidden // heads):
        raise ValueError(f"{path}: head_dim = {llm['head_dim']} is not supported; expected hidden_size / "
                         f"num_attention_heads = {hidden // heads}")
    return dict(hidden=hidden, heads=heads, layers=need("num_hidden_layers"),
                kv_heads=llm.get("num_key_value_heads", heads), intermediate=need("intermediate_size"),
                vocab_size=need("vocab_size"), rope_theta=float(llm.get("rope_theta", 10000.0)),
                norm_eps=float(llm.get("rms_norm_eps", 1e-6)),
                max_text_len=int(llm.get("max_position_embeddings", 32768)))


def _check_files(directory: str) -> None:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"BAGEL checkpoint directory not found: {directory}")
    missing = [f for f in (LLM_CONFIG, EMA_FILE, VAE_FILE) if not os.path.isfile(os.path.join(directory, f))]
    if missing:
        raise FileNotFoundError(f"BAGEL checkpoint {directory} is missing {', '.join(missing)} "
                                f"(expected {LLM_CONFIG}, {EMA_FILE}, {VAE_FILE} and tokenizer files)")


def _detect_pos_table(table: torch.Tensor, hidden: int, ema_path: str) -> tuple[int, str]:
    """(max_latent_size, pos_table_order) of BAGEL's fixed latent position table [G², H]."""
    rows = table.shape[0]
    side = math.isqrt(rows)
    if table.dim() != 2 or side * side != rows or table.shape[1] != hidden:
        raise ValueError(f"{ema_path}: {POS_EMBED_KEY} has shape {list(table.shape)}; expected [G², {hidden}] "
                         "(a G×G table of hidden-size rows)")
    atol = 1e-5 + 8 * torch.finfo(table.dtype).eps  # the stored precision (bf16: ~0.06) vs O(1) if wrong
    errors = {}
    for order in ("col-row", "row-col"):
        errors[order] = (table.double() - sincos_2d_table(side, hidden, order)).abs().max().item()
        if errors[order] <= atol:
            return side, order
    raise ValueError(f"{ema_path}: {POS_EMBED_KEY} matches neither 2D sin-cos layout (max |diff| col-row "
                     f"{errors['col-row']:.3g}, row-col {errors['row-col']:.3g}, tolerance {atol:.3g}); this model "
                     "computes the table and cannot take a learned one")


def bagel_model_config(directory: str | os.PathLike, *, image_size: int = 1024,
                       max_text_len: int | None = None) -> ModelConfig:
    """The ModelConfig of a BAGEL checkpoint directory: dims from llm_config.json, patch size and position
    table from ema.safetensors' shapes, latent channels / downsampling from ae.safetensors' shapes."""
    from safetensors import safe_open


    directory = os.path.abspath(os.fspath(directory))
    _check_files(directory)
    fields = _read_llm_config(os.path.join(directory, LLM_CONFIG))
    vae_path = os.path.join(directory, VAE_FILE)
    with safe_open(vae_path, framework="pt") as f:
        vae = FluxVAEParams.from_shapes({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    ema_path = os.path.join(directory, EMA_FILE)
    with safe_open(ema_path, framework="pt") as f:
        keys = set(f.keys())
        for key in ("vae2llm.weight", POS_EMBED_KEY):
            if key not in keys:
                raise ValueError(f"{ema_path}: missing key {key} (needed to read the image dims)")
        patch_dim = f.get_slice("vae2llm.weight").get_shape()[1]
        max_latent, order = _detect_pos_table(f.get_tensor(POS_EMBED_KEY), fields["hidden"], ema_path)
    patch = math.isqrt(patch_dim // vae.z_channels)
    if patch * patch * vae.z_channels != patch_dim:
        raise ValueError(f"{ema_path}: vae2llm.weight takes {patch_dim} values per token, not z·p² for the VAE's "
                         f"z = {vae.z_channels} channels")
    if image_size % (vae.downsample * patch):
        raise ValueError(f"image_size {image_size} must be a multiple of {vae.downsample * patch} (VAE "
                         f"{vae.downsample}× down, then {patch}×{patch} patches)")
    if max_text_len is not None:
        fields["max_text_len"] = max_text_len
    return ModelConfig(name="bagel", **fields, qkv_bias=True, tie_embeddings=False,
                       latent_channels=vae.z_channels, latent_size=image_size // vae.downsample, patch=patch,
                       image_size=image_size, codec="flux-vae", max_latent_size=max_latent, pos_table_order=order,
                       time_scale=1.0, vae_path=vae_path)


def load_bagel(directory: str | os.PathLike, *, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu", image_size: int = 1024, max_text_len: int | None = None,
               vae_dtype: torch.dtype = torch.float32, markers: dict | None = None) -> Bundle:
    """A Bundle (model, tokenizer, flux-vae codec) from a local BAGEL checkpoint directory.

    dtype: the model's parameter dtype (None: the checkpoint's, bf16 for BAGEL-7B-MoT); device: where the
    model and the VAE live; image_size: pixels per side of generated images (1024 → 128×128 latents → 4096
    tokens of 64 values); markers: HFTokenizer marker tokens (default BAGEL's: bos <|im_start|>,
    sor <|im_end|>, eos <|vision_start|>). Strict: see the module docstring."""
    from safetensors import safe_open

    directory = os.path.abspath(os.fspath(directory))
    cfg = bagel_model_config(directory, image_size=image_size, max_text_len=max_text_len)
    spec = {"kind": "hf", "path": directory, **(markers or {})}
    tok = build_tokenizer(**spec)  # before the weights: a bad tokenizer directory fails in seconds
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer at {directory} has {tok.vocab_size} tokens but the model's vocabulary "
                         f"(llm_config vocab_size) is {cfg.vocab_size}")
    ema_path = os.path.join(directory, EMA_FILE)
    key_map = bagel_key_map(cfg)
    if dtype is None:
        with safe_open(ema_path, framework="pt") as f:
            key = key_map["embed.weight"][0]
            stored = f.get_slice(key).get_dtype() if key in set(f.keys()) else "F32"
        dtype = _DTYPES.get(stored, torch.float32)
    with torch.device("meta"):
        model = UnifiedModel(cfg)
    model = model.to(dtype).to_empty(device=device)
    perm = patch_permutation(cfg.latent_channels, cfg.patch)
    transforms = {"patch_in": lambda t: t[:, perm], "patch_out": lambda t: t[perm]}
    ignored = load_safetensors_strict(
        model, ema_path, key_map={ours: theirs for ours, (theirs, _) in key_map.items()},
        transforms={ours: transforms[tf] for ours, (_, tf) in key_map.items() if tf},
        ignore_prefixes=IGNORED_PREFIXES, consumed=(POS_EMBED_KEY,), what="BAGEL weights")
    model.reset_buffers()
    counts = {p: sum(k.startswith(p) for k in ignored) for p in IGNORED_PREFIXES}
    log.info("BAGEL %s: loaded %d tensors (%s); ignored %d keys on purpose: %s", directory, len(key_map),
             dtype, len(ignored), ", ".join(f"{p}* ({n})" for p, n in counts.items() if n) or "none")

    vae = load_flux_vae(cfg.vae_path, dtype=vae_dtype, device=device)
    return Bundle(model, tok, FluxVAECodec(vae), spec)
