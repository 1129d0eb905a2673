"""BAGEL checkpoint loading (unigrpo/model/bagel.py) and the FLUX VAE (unigrpo/model/flux_vae.py), CPU only.

The test writes its own tiny BAGEL directory in BAGEL's key layout — hidden 32, 2 layers, 4 heads / 2 KV
heads, vocab 300, a 4×4 latent position table, a FLUX VAE with 2 levels (32/64 channels, 4 latent channels),
ViT/connector keys that must be ignored, and a small byte-level Qwen2 tokenizer — all from names written
here, not from the loader's table, so the table is checked rather than echoed. Nothing is downloaded.

Independent references: `ref_bagel_forward` recomputes, from the raw tensors and in float64, BAGEL's math as
read from its source (patchify "chpwq->hwpqc", unscaled-t timestep features, the DiT 2D sin-cos table,
und/gen expert routing, qk-norm, rotate-half RoPE, GQA, one shared RoPE position per image, llm2vae after
norm_moe_gen, unpatchify "hwpqc->chpwq"); `ref_vae` does the same for the FLUX encoder/decoder with
functional ops, and one decoder.conv_in output is also summed by hand.

Tolerances: float64 model vs float64 reference, atol 1e-10 (same sums, different association order; a
wrong permutation, scale or table moves outputs by > 1e-2). The float32 VAE vs its float64 reference:
atol 1e-4 on O(1) outputs (float32 rounding through ~20 convolutions stays near 1e-6).
"""
from __future__ import annotations

import json
import logging
import math
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from unigrpo.model import PackedLayout, Segment, preset
from unigrpo.model.bagel import load_bagel
from unigrpo.model.codec import FluxVAECodec, build_codec
from unigrpo.model.config import ModelConfig
from unigrpo.model.flux_vae import load_flux_vae

H, LAYERS, HEADS, KV, INTER, VOCAB, THETA, EPS = 32, 2, 4, 2, 48, 300, 1e6, 1e-6
Z, P, GRID = 4, 2, 4  # latent channels, latent patch, max_latent_size
VAE_CH, VAE_MULT, VAE_BLOCKS = 32, (1, 2), 1
IMAGE = 16  # px: 2 VAE levels → 8×8 latent → 4×4 = 16 tokens of 16 values
SCALE, SHIFT = 0.3611, 0.1159
L = "language_model.model."


# ------------------------------------------------------------------------------------------ the tiny checkpoint
def dit_sincos_table(dim, grid):
    """DiT/MAE get_2d_sincos_pos_embed as BAGEL uses it: meshgrid(w, h), first half from grid[0] (= column)."""
    gh, gw = np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)
    g = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, grid, grid)

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one(dim // 2, g[0]), one(dim // 2, g[1])], axis=1)


def bagel_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    hd = H // HEADS
    t = {L + "embed_tokens.weight": r(VOCAB, H, std=1.0), "language_model.lm_head.weight": r(VOCAB, H)}
    for x in ("", "_moe_gen"):
        t[f"{L}norm{x}.weight"] = 1 + r(H)
        for i in range(LAYERS):
            pre = f"{L}layers.{i}."
            t[f"{pre}input_layernorm{x}.weight"] = 1 + r(H)
            t[f"{pre}post_attention_layernorm{x}.weight"] = 1 + r(H)
            for name, rows in (("q", HEADS * hd), ("k", KV * hd), ("v", KV * hd)):
                t[f"{pre}self_attn.{name}_proj{x}.weight"] = r(rows, H)
                t[f"{pre}self_attn.{name}_proj{x}.bias"] = r(rows)
            t[f"{pre}self_attn.o_proj{x}.weight"] = r(H, HEADS * hd)
            t[f"{pre}self_attn.q_norm{x}.weight"] = 1 + r(hd)
            t[f"{pre}self_attn.k_norm{x}.weight"] = 1 + r(hd)
            t[f"{pre}mlp{x}.gate_proj.weight"] = r(INTER, H)
            t[f"{pre}mlp{x}.up_proj.weight"] = r(INTER, H)
            t[f"{pre}mlp{x}.down_proj.weight"] = r(H, INTER)
    t.update({"time_embedder.mlp.0.weight": r(H, 256), "time_embedder.mlp.0.bias": r(H),
              "time_embedder.mlp.2.weight": r(H, H), "time_embedder.mlp.2.bias": r(H),
              "vae2llm.weight": r(H, P * P * Z), "vae2llm.bias": r(H),
              "llm2vae.weight": r(P * P * Z, H), "llm2vae.bias": r(P * P * Z),
              "latent_pos_embed.pos_embed": torch.from_numpy(dit_sincos_table(H, GRID)).float()})
    # understanding-only parts the loader must skip
    t.update({"vit_model.vision_model.embeddings.patch_embedding.weight": r(8, 3 * 14 * 14),
              "vit_model.vision_model.post_layernorm.weight": r(8), "connector.fc1.weight": r(H, 8),
              "connector.fc1.bias": r(H), "connector.fc2.weight": r(H, H), "connector.fc2.bias": r(H),
              "vit_pos_embed.pos_embed": r(16, H)})
    return t


def vae_tensors(seed=1):
    g = torch.Generator().manual_seed(seed)
    a = {}

    def conv(k, cin, cout, ks):
        a[k + ".weight"] = torch.randn(cout, cin, ks, ks, generator=g) / math.sqrt(cin * ks * ks)
        a[k + ".bias"] = torch.randn(cout, generator=g) * 0.05

    def norm(k, c):
        a[k + ".weight"] = 1 + torch.randn(c, generator=g) * 0.1
        a[k + ".bias"] = torch.randn(c, generator=g) * 0.1

    def res(k, cin, cout):
        norm(k + ".norm1", cin), conv(k + ".conv1", cin, cout, 3), norm(k + ".norm2", cout)
        conv(k + ".conv2", cout, cout, 3)
        if cin != cout:
            conv(k + ".nin_shortcut", cin, cout, 1)

    def mid(k, c):
        res(k + ".block_1", c, c), norm(k + ".attn_1.norm", c), res(k + ".block_2", c, c)
        for n in ("q", "k", "v", "proj_out"):
            conv(f"{k}.attn_1.{n}", c, c, 1)

    chans = [VAE_CH * m for m in VAE_MULT]
    conv("encoder.conv_in", 3, VAE_CH, 3)
    c = VAE_CH
    for i, co in enumerate(chans):
        for j in range(VAE_BLOCKS):
            res(f"encoder.down.{i}.block.{j}", c, co)
            c = co
        if i != len(chans) - 1:
            conv(f"encoder.down.{i}.downsample.conv", c, c, 3)
    mid("encoder.mid", c), norm("encoder.norm_out", c), conv("encoder.conv_out", c, 2 * Z, 3)
    conv("decoder.conv_in", Z, c, 3), mid("decoder.mid", c)
    for i in reversed(range(len(chans))):
        for j in range(VAE_BLOCKS + 1):
            res(f"decoder.up.{i}.block.{j}", c, chans[i])
            c = chans[i]
        if i:
            conv(f"decoder.up.{i}.upsample.conv", c, c, 3)
    norm("decoder.norm_out", c), conv("decoder.conv_out", c, 3, 3)
    return a


LLM_CONFIG = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": H,
              "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV,
              "intermediate_size": INTER, "vocab_size": VOCAB, "rope_theta": THETA, "rms_norm_eps": EPS,
              "max_position_embeddings": 128, "hidden_act": "silu", "tie_word_embeddings": False,
              "use_sliding_window": False, "rope_scaling": None, "qk_norm": True,
              "layer_module": "Qwen2MoTDecoderLayer", "torch_dtype": "bfloat16"}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]


def write_tokenizer(path):
    """A byte-level BPE Qwen2 tokenizer: the 256 byte symbols, three merges, BAGEL's special tokens."""
    from tokenizers import pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("Ġ", "a"), ("r", "e"), ("Ġa", "re")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    added = {str(len(vocab) + i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                   "single_word": False, "special": True} for i, s in enumerate(SPECIALS)}
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added, "eos_token": "<|im_end|>",
         "pad_token": "<|endoftext|>", "bos_token": None, "model_max_length": 128, "errors": "replace"}))


def write_checkpoint(path, ema=None, ae=None, llm=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "llm_config.json").write_text(json.dumps(LLM_CONFIG if llm is None else llm))
    save_file(bagel_tensors() if ema is None else ema, str(path / "ema.safetensors"))
    save_file(vae_tensors() if ae is None else ae, str(path / "ae.safetensors"))
    write_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("bagel") / "BAGEL-tiny")


@pytest.fixture(scope="module")
def bundle(ckpt):
    return load_bagel(ckpt, dtype=torch.float64, image_size=IMAGE)


def variant(tmp_path, ckpt, **edits):
    """A copy of the checkpoint with edited tensors / config: ema=fn(dict), ae=fn(dict), llm=fn(dict)."""
    out = tmp_path / "variant"
    shutil.copytree(ckpt, out)
    if "ema" in edits:
        save_file(edits["ema"](load_file(str(ckpt / "ema.safetensors"))), str(out / "ema.safetensors"))
    if "ae" in edits:
        save_file(edits["ae"](load_file(str(ckpt / "ae.safetensors"))), str(out / "ae.safetensors"))
    if "llm" in edits:
        (out / "llm_config.json").write_text(json.dumps(edits["llm"](dict(LLM_CONFIG))))
    return out


# ------------------------------------------------------------------------------------------ references
def ref_bagel_forward(t, ids, latent_Chw, tstep):
    """BAGEL (gen mode, no cache) over [text ids][one noisy image block] from the raw tensors, float64.
    Returns (text logits [T, V], velocity [C, h, w])."""
    t = {k: v.double() for k, v in t.items()}
    hd, T = H // HEADS, len(ids)
    C, h, w = latent_Chw.shape
    lat = latent_Chw.double().reshape(C, h // P, P, w // P, P)
    tokens = torch.einsum("chpwq->hwpqc", lat).reshape(-1, P * P * C)
    N = tokens.shape[0]
    pos_ids = (torch.arange(h // P)[:, None] * GRID + torch.arange(w // P)).flatten()
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
    feat = torch.cat([torch.cos(tstep * freqs), torch.sin(tstep * freqs)])[None]
    temb = F.linear(F.silu(F.linear(feat, t["time_embedder.mlp.0.weight"], t["time_embedder.mlp.0.bias"])),
                    t["time_embedder.mlp.2.weight"], t["time_embedder.mlp.2.bias"])
    table = torch.from_numpy(dit_sincos_table(H, GRID))  # the stored table before its float32 rounding
    x_img = F.linear(tokens, t["vae2llm.weight"], t["vae2llm.bias"]) + temb + table[pos_ids]
    x = torch.cat([t[L + "embed_tokens.weight"][torch.tensor(ids)], x_img])
    img = torch.tensor([False] * T + [True] * N)
    pos = torch.tensor(list(range(T)) + [T] * N, dtype=torch.float64)
    S = T + N
    i_, j_ = torch.arange(S)[:, None], torch.arange(S)[None, :]
    allowed = (j_ <= i_) | (img[:, None] & img[None, :])

    def rms(v, wt):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + EPS) * wt

    def routed(fn):  # text rows through the und weights, image rows through the _moe_gen ones
        return torch.where(img[:, None], fn("_moe_gen").reshape(S, -1), fn("").reshape(S, -1))

    inv = 1.0 / THETA ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.cat([pos[:, None] * inv] * 2, dim=-1)[:, None, :]  # [S, 1, hd]

    def rope(v):
        v1, v2 = v[..., :hd // 2], v[..., hd // 2:]
        return v * ang.cos() + torch.cat([-v2, v1], dim=-1) * ang.sin()

    for i in range(LAYERS):
        pre = f"{L}layers.{i}."
        a = f"{pre}self_attn."
        hN = routed(lambda x_: rms(x, t[f"{pre}input_layernorm{x_}.weight"]))

        def proj(name, heads):  # q/k get the per-head RMSNorm (qk_norm) before RoPE, v does not
            def fn(x_):
                y = F.linear(hN, t[f"{a}{name}_proj{x_}.weight"], t[f"{a}{name}_proj{x_}.bias"]).view(S, heads, hd)
                return y if name == "v" else rms(y, t[f"{a}{name}_norm{x_}.weight"])
            return fn

        q = rope(routed(proj("q", HEADS)).view(S, HEADS, hd))
        k = rope(routed(proj("k", KV)).view(S, KV, hd)).repeat_interleave(HEADS // KV, dim=1)
        v = routed(proj("v", KV)).view(S, KV, hd).repeat_interleave(HEADS // KV, dim=1)
        scores = torch.einsum("shd,uhd->hsu", q, k) / math.sqrt(hd)
        attn = torch.einsum("hsu,uhd->shd", scores.masked_fill(~allowed, -math.inf).softmax(-1), v).reshape(S, -1)
        x = x + routed(lambda x_: F.linear(attn, t[f"{a}o_proj{x_}.weight"]))
        mlp = f"{pre}mlp"
        x = x + routed(lambda x_: F.linear(
            F.silu(F.linear(rms(x, t[f"{pre}post_attention_layernorm{x_}.weight"]), t[f"{mlp}{x_}.gate_proj.weight"]))
            * F.linear(rms(x, t[f"{pre}post_attention_layernorm{x_}.weight"]), t[f"{mlp}{x_}.up_proj.weight"]),
            t[f"{mlp}{x_}.down_proj.weight"]))
    final = routed(lambda x_: rms(x, t[f"{L}norm{x_}.weight"]))
    logits = F.linear(final[:T], t["language_model.lm_head.weight"])
    v_tok = F.linear(final[T:], t["llm2vae.weight"], t["llm2vae.bias"])
    v = torch.einsum("hwpqc->chpwq", v_tok.reshape(h // P, w // P, P, P, C)).reshape(C, h, w)
    return logits, v


def ref_vae(a, *, images=None, latents=None):
    """FLUX encoder (→ normalised posterior mean) or decoder (normalised latents →) from raw tensors, float64."""
    a = {k: v.double() for k, v in a.items()}
    levels = len(VAE_MULT)

    def conv(x, k, pad=1, stride=1):
        return F.conv2d(x, a[k + ".weight"], a[k + ".bias"], padding=pad, stride=stride)

    def gn(x, k):
        return F.group_norm(x, 32, a[k + ".weight"], a[k + ".bias"], eps=1e-6)

    def res(x, k):
        hh = conv(F.silu(gn(conv(F.silu(gn(x, k + ".norm1")), k + ".conv1"), k + ".norm2")), k + ".conv2")
        return (conv(x, k + ".nin_shortcut", 0) if k + ".nin_shortcut.weight" in a else x) + hh

    def attn(x, k):
        B, C, Hh, W = x.shape
        n = gn(x, k + ".norm")
        q, kk, v = (conv(n, f"{k}.{c}", 0).flatten(2) for c in "qkv")  # [B, C, HW]
        wts = (q.transpose(1, 2) @ kk / math.sqrt(C)).softmax(-1)
        return x + conv((wts @ v.transpose(1, 2)).transpose(1, 2).reshape(B, C, Hh, W), k + ".proj_out", 0)

    def mid(x, k):
        return res(attn(res(x, k + ".block_1"), k + ".attn_1"), k + ".block_2")

    if images is not None:
        x = conv(images.double(), "encoder.conv_in")
        for i in range(levels):
            for j in range(VAE_BLOCKS):
                x = res(x, f"encoder.down.{i}.block.{j}")
            if i != levels - 1:
                x = conv(F.pad(x, (0, 1, 0, 1)), f"encoder.down.{i}.downsample.conv", pad=0, stride=2)
        x = conv(F.silu(gn(mid(x, "encoder.mid"), "encoder.norm_out")), "encoder.conv_out")
        return SCALE * (x[:, :Z] - SHIFT)
    x = mid(conv(latents.double() / SCALE + SHIFT, "decoder.conv_in"), "decoder.mid")
    for i in reversed(range(levels)):
        for j in range(VAE_BLOCKS + 1):
            x = res(x, f"decoder.up.{i}.block.{j}")
        if i:
            x = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"), f"decoder.up.{i}.upsample.conv")
    return conv(F.silu(gn(x, "decoder.norm_out")), "decoder.conv_out")


# ------------------------------------------------------------------------------------------ tests
def test_config_read_from_files(bundle, ckpt):
    cfg = bundle.model.cfg
    assert (cfg.hidden, cfg.layers, cfg.heads, cfg.kv_heads, cfg.intermediate, cfg.vocab_size) == \
        (H, LAYERS, HEADS, KV, INTER, VOCAB)
    assert (cfg.rope_theta, cfg.norm_eps, cfg.max_text_len, cfg.qkv_bias, cfg.tie_embeddings) == \
        (THETA, EPS, 128, True, False)
    assert (cfg.latent_channels, cfg.patch, cfg.latent_size, cfg.image_size, cfg.image_tokens) == (Z, P, 8, IMAGE, 16)
    assert (cfg.max_latent_size, cfg.pos_table_order, cfg.time_scale, cfg.codec) == (GRID, "col-row", 1.0, "flux-vae")
    assert cfg.vae_path == str(ckpt / "ae.safetensors")
    assert next(bundle.model.parameters()).dtype == torch.float64
    tok = bundle.tokenizer
    assert tok.vocab_size == 256 + 3 + len(SPECIALS) <= VOCAB
    assert tok.tok.convert_ids_to_tokens([tok.bos_id, tok.sor_id, tok.eos_id]) == \
        ["<|im_start|>", "<|im_end|>", "<|vision_start|>"]
    assert tok.decode(tok.encode("a red square are")) == "a red square are"
    assert bundle.tokenizer_spec == {"kind": "hf", "path": str(ckpt)}


def test_forward_matches_bagel_math_from_raw_tensors(bundle):
    """Text logits (und expert, lm_head) and the velocity of a noisy image block (gen expert, vae2llm /
    llm2vae permutation, time features, position table) equal an independent BAGEL forward."""
    model, raw = bundle.model, bagel_tensors()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (7,), generator=g).tolist()
    latent = torch.randn(1, Z, 8, 8, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.37], dtype=torch.float64)
    layout = PackedLayout.build([[[Segment("text", len(ids)), Segment("noise", 16)]]])
    text_ids = torch.tensor([ids + [0] * 16])
    with torch.no_grad():
        hidden, vel = model.forward_packed(layout, text_ids, latent, sigma)
        logits = model.logits(hidden[0, :len(ids)])
    ref_logits, ref_v = ref_bagel_forward(raw, ids, latent[0], 0.37)
    torch.testing.assert_close(logits, ref_logits, atol=1e-10, rtol=0)
    torch.testing.assert_close(vel[0], ref_v, atol=1e-10, rtol=0)
    assert vel.abs().max() > 0.1  # a real signal, not a zero output layer
    # the embedding row of a token → the first layer's q projection (text expert), by hand
    x0 = raw[L + "embed_tokens.weight"][ids[0]].double()
    w_norm = raw[L + "layers.0.input_layernorm.weight"].double()
    q_hand = raw[L + "layers.0.self_attn.q_proj.weight"].double() @ (x0 / (x0.pow(2).mean() + EPS).sqrt() * w_norm) \
        + raw[L + "layers.0.self_attn.q_proj.bias"].double()
    ex = model.layers[0].experts[0]
    with torch.no_grad():
        q_ours = ex.q_proj(ex.input_norm(model.embed.weight[ids[0]]))
    torch.testing.assert_close(q_ours, q_hand, atol=1e-12, rtol=0)


def test_vae_matches_reference_and_first_conv_by_hand(bundle):
    codec, raw = bundle.codec, vae_tensors()
    assert isinstance(codec, FluxVAECodec) and codec.downsample == 2
    g = torch.Generator().manual_seed(4)
    images = torch.rand(2, 3, IMAGE, IMAGE, generator=g) * 2 - 1
    latents = torch.randn(2, Z, 8, 8, generator=g)
    vae = codec.vae
    seen = {}
    hook = vae.decoder.conv_in.register_forward_hook(lambda m, i, o: seen.update(inp=i[0], out=o))
    with torch.no_grad():
        enc, dec = vae.encode(images), vae.decode(latents)
    hook.remove()
    assert enc.shape == (2, Z, 8, 8) and dec.shape == (2, 3, IMAGE, IMAGE)
    torch.testing.assert_close(enc.double(), ref_vae(raw, images=images), atol=1e-4, rtol=0)
    torch.testing.assert_close(dec.double(), ref_vae(raw, latents=latents), atol=1e-4, rtol=0)
    # decoder.conv_in at output channel 5, pixel (0, 3): bias + Σ_c Σ_dy Σ_dx w · (z/scale + shift), zero-padded
    zin = latents.double() / SCALE + SHIFT
    w, b = raw["decoder.conv_in.weight"].double(), raw["decoder.conv_in.bias"].double()
    total = b[5].item()
    for c in range(Z):
        for dy in range(3):
            for dx in range(3):
                y, x = 0 + dy - 1, 3 + dx - 1
                if 0 <= y < 8 and 0 <= x < 8:
                    total += w[5, c, dy, dx].item() * zin[1, c, y, x].item()
    assert abs(seen["out"][1, 5, 0, 3].item() - total) < 1e-4
    # the codec: same numbers, clamped to [-1, 1], in the input's dtype
    out = codec.decode(latents.double())
    assert out.dtype == torch.float64 and out.abs().max() <= 1
    torch.testing.assert_close(out.float(), dec.clamp(-1, 1))
    torch.testing.assert_close(codec.encode(images), enc)


def test_codec_from_config_and_bundle_round_trip(bundle, tmp_path):
    from unigrpo.checkpoint import save_checkpoint
    from unigrpo.model.build import load_bundle

    codec = build_codec(bundle.model.cfg)
    assert isinstance(codec, FluxVAECodec) and codec.vae.params.z_channels == Z
    with pytest.raises(ValueError, match="vae_path"):
        build_codec(preset("small"))
    with pytest.raises(ValueError, match="latent_channels 16"):
        build_codec(preset("small", vae_path=bundle.model.cfg.vae_path))
    # our own checkpoint of a BAGEL-loaded model rebuilds the same model (config fields included)
    save_checkpoint(tmp_path / "ck", model_state=bundle.model.state_dict(), config=bundle.checkpoint_config())
    again = load_bundle(str(tmp_path / "ck"))
    assert again.model.cfg == bundle.model.cfg and isinstance(again.codec, FluxVAECodec)
    torch.testing.assert_close(again.model.pos_table, bundle.model.pos_table.float())
    layout = PackedLayout.build([[[Segment("text", 3), Segment("noise", 16)]]])
    lat, sig = torch.randn(1, Z, 8, 8, dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    again.model.double().reset_buffers()  # the table is built in float32; recompute it in float64
    with torch.no_grad():
        v1 = bundle.model.forward_packed(layout, torch.zeros(1, 19, dtype=torch.long), lat, sig)[1]
        v2 = again.model.forward_packed(layout, torch.zeros(1, 19, dtype=torch.long), lat, sig)[1]
    torch.testing.assert_close(v1, v2, atol=1e-10, rtol=0)


def test_ignored_keys_are_logged(ckpt, caplog):
    with caplog.at_level(logging.INFO, logger="unigrpo.model.bagel"):
        load_bagel(ckpt, image_size=IMAGE)
    line = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(line) == 1 and "vit_model.* (2)" in line[0] and "connector.* (4)" in line[0] \
        and "vit_pos_embed.* (1)" in line[0]


def test_bf16_checkpoint_loads_in_its_dtype(ckpt, tmp_path):
    out = variant(tmp_path, ckpt, ema=lambda t: {k: v.bfloat16() for k, v in t.items()})
    b = load_bagel(out, image_size=IMAGE)
    assert next(b.model.parameters()).dtype == torch.bfloat16
    assert b.model.cfg.pos_table_order == "col-row"  # detected through bf16 rounding


def test_missing_key_names_it(ckpt, tmp_path):
    key = L + "layers.1.mlp_moe_gen.up_proj.weight"
    out = variant(tmp_path, ckpt, ema=lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(ValueError, match=re.escape(f"1 missing key(s): {key}")):
        load_bagel(out, image_size=IMAGE)


def test_shape_mismatch_names_key_and_shapes(ckpt, tmp_path):
    key = L + "layers.0.self_attn.k_proj_moe_gen.bias"

    def edit(t):
        t[key] = torch.zeros(12)
        return t

    out = variant(tmp_path, ckpt, ema=edit)
    msg = f"{key}: expected [16] (our layers.0.experts.1.k_proj.bias), found [12]"
    with pytest.raises(ValueError, match=re.escape(msg)):
        load_bagel(out, image_size=IMAGE)


def test_unexpected_key_names_it(ckpt, tmp_path):
    key = L + "layers.0.self_attn.extra_moe_gen.weight"

    def edit(t):
        t[key] = torch.zeros(3)
        return t

    out = variant(tmp_path, ckpt, ema=edit)
    with pytest.raises(ValueError, match=re.escape(f"1 unexpected key(s): {key}")):
        load_bagel(out, image_size=IMAGE)


def test_vae_errors_name_the_key(ckpt, tmp_path):
    gone = "decoder.up.0.block.1.conv2.weight"
    out = variant(tmp_path, ckpt, ae=lambda t: {**{k: v for k, v in t.items() if k != gone}, "decoder.extra": t[gone]})
    with pytest.raises(ValueError, match=r"missing key\(s\): decoder\.up\.0\.block\.1\.conv2\.weight.*"
                                         r"unexpected key\(s\): decoder\.extra"):
        load_flux_vae(out / "ae.safetensors")
    with pytest.raises(FileNotFoundError, match="ae.safetensors"):
        load_flux_vae(tmp_path / "nope" / "ae.safetensors")


def test_position_table_and_config_errors(ckpt, tmp_path):
    def learned(t):
        t["latent_pos_embed.pos_embed"] = torch.randn(GRID * GRID, H)
        return t

    with pytest.raises(ValueError, match="latent_pos_embed.pos_embed matches neither"):
        load_bagel(variant(tmp_path / "a", ckpt, ema=learned), image_size=IMAGE)
    with pytest.raises(ValueError, match="hidden_act = 'gelu' is not supported"):
        load_bagel(variant(tmp_path / "b", ckpt, llm=lambda c: {**c, "hidden_act": "gelu"}), image_size=IMAGE)
    with pytest.raises(ValueError, match="'num_hidden_layers' is missing"):
        load_bagel(variant(tmp_path / "c", ckpt, llm=lambda c: {k: v for k, v in c.items()
                                                               if k != "num_hidden_layers"}), image_size=IMAGE)
    with pytest.raises(ValueError, match="image_size 18 must be a multiple of 4"):
        load_bagel(ckpt, image_size=18)
    with pytest.raises(ValueError, match="latent grid 8 exceeds max_latent_size 4"):
        load_bagel(ckpt, image_size=32)
    with pytest.raises(FileNotFoundError, match="missing ema.safetensors"):
        empty = tmp_path / "empty"
        empty.mkdir()
        (empty / "llm_config.json").write_text("{}")
        load_bagel(empty)


def test_new_config_fields_keep_old_defaults():
    cfg = preset("tiny")
    assert (cfg.time_scale, cfg.pos_table_order, cfg.vae_path) == (1000.0, "row-col", "")
    big = preset("bagel-7b")
    assert (big.time_scale, big.pos_table_order) == (1.0, "col-row")
    with pytest.raises(ValueError, match="pos_table_order"):
        ModelConfig(pos_table_order="diag")


def test_load_bundle_takes_a_bagel_directory_in_fp32(ckpt):
    """The trainer's `base` may be a BAGEL directory: load_bundle routes it to load_bagel, in fp32 master
    weights, with the same values as a direct load."""
    from unigrpo.model.build import load_bundle
    b = load_bundle(str(ckpt), image_size=IMAGE)
    direct = load_bagel(ckpt, dtype=torch.float32, image_size=IMAGE)
    assert all(p.dtype == torch.float32 for p in b.model.parameters())
    for (n, p), (_, q) in zip(b.model.state_dict().items(), direct.model.state_dict().items()):
        assert torch.equal(p, q), n
