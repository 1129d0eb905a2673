"""The unified model: packed == cached, expert routing, mask properties, presets, bad inputs.

Tolerances: float64 comparisons of the packed and the cached paths use atol 1e-10 — both compute the same
sums in a different association order; float64 rounding through a 2-layer model stays near 1e-15, so 1e-10
leaves room while still catching any real difference (a wrong mask or position moves outputs by > 1e-3).
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unigrpo.model import PackedLayout, Segment, UnifiedModel, preset
from unigrpo.model.layout import FULL, NOISE, PAD, TEXT

ATOL64 = 1e-10


def small_cfg(**kw):
    base = dict(hidden=32, heads=4, kv_heads=2, intermediate=64, layers=2, latent_channels=12, latent_size=4,
                max_latent_size=8, max_text_len=64)
    base.update(kw)
    return preset("tiny", **base)


def make_model(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    m = UnifiedModel(small_cfg(**kw)).to(dtype)
    torch.nn.init.normal_(m.image_out.weight, std=0.5)  # zero-init would hide the image path
    return m


@st.composite
def documents(draw, n_img_tokens):
    """A document: text first, then a random mix of text / noise / full segments."""
    segs = [Segment("text", draw(st.integers(1, 9)))]
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["text", "noise", "full"]))
        segs.append(Segment(kind, draw(st.integers(1, 6)) if kind == "text" else n_img_tokens))
    return segs


def layouts(n_img_tokens):
    return st.lists(st.lists(documents(n_img_tokens), min_size=1, max_size=2), min_size=1, max_size=3)


def packed_inputs(model, layout, seed):
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    ids = torch.randint(0, 256, layout.shape, generator=g)
    M = len(layout.block_starts)
    lat = torch.randn(M, cfg.latent_channels, cfg.latent_size, cfg.latent_size, generator=g, dtype=torch.float64)
    sig = torch.rand(M, generator=g, dtype=torch.float64)
    return ids, lat, sig


# packed == cached segment by segment, for every attention backend: tests/test_attention.py


def test_batched_left_padded_decode_equals_single_rows():
    model = make_model(seed=1)
    seqs = [[3, 5, 7, 9, 11], [4, 6], [8, 1, 2]]
    P = max(map(len, seqs))
    ids = torch.zeros(3, P, dtype=torch.long)
    valid = torch.zeros(3, P, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, P - len(s):] = torch.tensor(s)
        valid[i, P - len(s):] = True
    lat = torch.randn(3, 12, 4, 4, dtype=torch.float64)
    sig = torch.rand(3, dtype=torch.float64)
    with torch.no_grad():
        cache = model.new_cache(3, P + 2)
        h = model.append_text(cache, ids, valid)
        nxt = torch.tensor([[20], [21], [22]])
        h2 = model.append_text(cache, nxt, torch.tensor([[True], [False], [True]]))  # row 1 finished
        v = model.image_velocity(cache, lat, sig)
        for i, s in enumerate(seqs):
            c = model.new_cache(1, 8)
            hi = model.append_text(c, torch.tensor([s]))
            torch.testing.assert_close(h[i, P - len(s):], hi[0], atol=ATOL64, rtol=0)
            if i != 1:
                hi2 = model.append_text(c, nxt[i:i + 1])
                torch.testing.assert_close(h2[i], hi2[0], atol=ATOL64, rtol=0)
            torch.testing.assert_close(v[i], model.image_velocity(c, lat[i:i + 1], sig[i:i + 1])[0],
                                       atol=ATOL64, rtol=0)


def test_image_velocity_leaves_cache_unchanged():
    model = make_model()
    with torch.no_grad():
        cache = model.new_cache(2, 10)
        model.append_text(cache, torch.randint(0, 256, (2, 6)))
        before = [k.clone() for k in cache.k], cache.valid.clone(), cache.next_pos.clone(), cache.length
        model.image_velocity(cache, torch.randn(2, 12, 4, 4, dtype=torch.float64), torch.rand(2, dtype=torch.float64))
        assert cache.length == before[3]
        assert torch.equal(cache.valid, before[1]) and torch.equal(cache.next_pos, before[2])
        assert all(torch.equal(a, b) for a, b in zip(cache.k, before[0]))


@pytest.mark.parametrize("expert", [0, 1])
def test_each_token_uses_its_expert(expert):
    """Perturbing one expert's last-layer MLP changes exactly the tokens routed to that expert."""
    model = make_model()
    layout = PackedLayout.build([[[Segment("text", 7), Segment("noise", 4), Segment("full", 4), Segment("text", 3)]]])
    ids, lat, sig = packed_inputs(model, layout, 0)
    with torch.no_grad():
        hidden0, vel0 = model.forward_packed(layout, ids, lat, sig)
        model.layers[-1].experts[expert].down_proj.weight.add_(0.1)
        hidden1, vel1 = model.forward_packed(layout, ids, lat, sig)
    text_changed = (hidden1 - hidden0).abs().amax(-1)[0][layout.is_text_BS[0]] > 1e-8
    img_changed = (vel1 - vel0).flatten(1).abs().amax(-1) > 1e-8
    assert bool(text_changed.all()) == (expert == 0) and bool(text_changed.any()) == (expert == 0)
    assert bool(img_changed.all()) == (expert == 1) and bool(img_changed.any()) == (expert == 1)


def test_image_expert_never_reaches_text_when_text_sees_no_image():
    model = make_model()
    layout = PackedLayout.build([[[Segment("text", 7), Segment("noise", 4), Segment("noise", 4)]]])
    ids, lat, sig = packed_inputs(model, layout, 1)
    with torch.no_grad():
        h0, _ = model.forward_packed(layout, ids, lat, sig)
        for p in model.layers[0].experts[1].parameters():
            p.add_(0.3)
        h1, _ = model.forward_packed(layout, ids, lat, sig)
    assert torch.equal(h0[0, :7], h1[0, :7])


@settings(max_examples=40, deadline=None)
@given(rows=layouts(3), pad=st.integers(0, 3))
def test_mask_properties(rows, pad):
    layout = PackedLayout.build(rows, pad_to=max(sum(s.length for d in r for s in d) for r in rows) + pad)
    mask = layout.dense_mask()[:, 0]
    kind, doc, seg = layout.kind_BS, layout.doc_BS, layout.seg_BS
    B, S = layout.shape
    for b in range(B):
        for q in range(S):
            for k in range(S):
                vis = bool(mask[b, q, k])
                if kind[b, q] == PAD or kind[b, k] == PAD:
                    assert vis == (q == k and kind[b, q] == PAD)  # padding sees itself only, is seen by none
                    continue
                if doc[b, q] != doc[b, k]:
                    assert not vis  # nothing crosses documents
                elif kind[b, k] == NOISE:
                    assert vis == (seg[b, q] == seg[b, k])  # a noise block: only itself
                elif kind[b, q] == TEXT and kind[b, k] == TEXT:
                    assert vis == (k <= q)  # text is causal
                elif kind[b, q] in (NOISE, FULL) and kind[b, k] == TEXT:
                    assert vis == (k < q)  # an image block sees all earlier text of its document
                elif kind[b, k] == FULL:
                    assert vis == (k <= q or seg[b, q] == seg[b, k])


def test_rope_positions_one_per_image_block():
    layout = PackedLayout.build([[[Segment("text", 3), Segment("noise", 4), Segment("noise", 4),
                                   Segment("full", 4), Segment("text", 2)]]])
    pos = layout.pos_BS[0].tolist()
    assert pos == [0, 1, 2] + [3] * 4 + [3] * 4 + [3] * 4 + [4, 5]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention backward needs a GPU")
def test_flex_matches_sdpa_with_grad_on_gpu():
    model = make_model(dtype=torch.float32).cuda()
    layout = PackedLayout.build([[[Segment("text", 9), Segment("noise", 4), Segment("noise", 4)]],
                                 [[Segment("text", 5), Segment("noise", 4)]]], device="cuda")
    ids, lat, sig = packed_inputs(model, layout, 2)
    ids, lat, sig = ids.cuda(), lat.float().cuda(), sig.float().cuda()
    outs = []
    for backend in ("sdpa", "flex"):
        model.zero_grad()
        h, v = model.forward_packed(layout, ids, lat, sig, backend=backend)
        (h.pow(2).mean() + v.pow(2).mean()).backward()
        outs.append((h, v, model.layers[0].experts[0].q_proj.weight.grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-4)  # fp32: different reduction order


def test_flex_matches_sdpa_forward_on_cpu():
    """FlexAttention has no CPU backward, but its forward runs (eagerly) on CPU: same numbers as SDPA."""
    model = make_model(dtype=torch.float32)
    layout = PackedLayout.build([[[Segment("text", 5), Segment("noise", 4), Segment("noise", 4)]]])
    ids, lat, sig = packed_inputs(model, layout, 3)
    with torch.no_grad():
        a = model.forward_packed(layout, ids, lat.float(), sig.float())
        b = model.forward_packed(layout, ids, lat.float(), sig.float(), backend="flex")
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-4)  # fp32, different summation order
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=1e-4)


def test_output_projection_starts_at_zero():
    torch.manual_seed(0)
    model = UnifiedModel(small_cfg())
    cache = model.new_cache(1, 4)
    with torch.no_grad():
        model.append_text(cache, torch.tensor([[1, 2, 3]]))
        v = model.image_velocity(cache, torch.randn(1, 12, 4, 4), torch.rand(1))
    assert torch.count_nonzero(v) == 0


def test_bagel_7b_shape_parameter_count_on_meta():
    """BAGEL-7B-MoT: ~14B parameters in all, ~7B used per token (Qwen2-7B decoder duplicated per expert)."""
    with torch.device("meta"):
        model = UnifiedModel(preset("bagel-7b"))
    total, active = model.num_params(), model.num_params(active=True)
    assert 13.5e9 < total < 14.7e9, total
    assert 7.0e9 < active < 8.0e9, active
    assert math.isclose(total - active, active - model.embed.weight.numel() - model.lm_head.weight.numel(),
                        rel_tol=0.01)


def test_parameter_groups_split_experts():
    model = make_model()
    groups = model.parameter_groups()
    ids = {k: {id(p) for p in v} for k, v in groups.items()}
    assert not ids["text"] & ids["image"]
    assert len(ids["text"]) + len(ids["image"]) == len(list(model.parameters()))
    assert id(model.layers[0].experts[1].q_proj.weight) in ids["image"]
    assert id(model.image_out.weight) in ids["image"] and id(model.time_embed[0].weight) in ids["image"]
    assert id(model.layers[0].experts[0].q_proj.weight) in ids["text"] and id(model.lm_head.weight) in ids["text"]


def test_unknown_preset_names_it():
    with pytest.raises(ValueError, match=r"unknown model preset 'huge'.*tiny"):
        preset("huge")


@pytest.mark.parametrize("field,value,pattern", [("heads", 5, "divisible"), ("kv_heads", 4, "divisible"),
                                                  ("layers", 0, "layers"), ("codec", "jpeg", "codec")])
def test_bad_model_config_names_the_field(field, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        preset("tiny", **{field: value})


def test_layout_and_input_errors():
    with pytest.raises(ValueError, match="segment kind 'video'"):
        Segment("video", 3)
    with pytest.raises(ValueError, match="pad_to=2"):
        PackedLayout.build([[[Segment("text", 5)]]], pad_to=2)
    model = make_model()
    layout = PackedLayout.build([[[Segment("text", 3), Segment("noise", 4)]]])
    with pytest.raises(ValueError, match="1 image blocks"):
        model.forward_packed(layout, torch.zeros(1, 7, dtype=torch.long))
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="capacity 4"):
        model.append_text(cache, torch.zeros(1, 5, dtype=torch.long))
