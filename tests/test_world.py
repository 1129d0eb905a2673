"""Tests of the shapes world: prompts and splits, layouts, plans, renderer and the image verifier."""
import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _images import render_batch
from unigrpo.world.layout import center_px
from unigrpo.world import (CANVAS, CATEGORIES, CELL, COLORS, GAP, OBJ, SHAPES, PlacedObject, all_prompts,
                           corrupt_layout, grid_range, layout_checks, make_prompts, parse_plan,
                           plan_text, pretrain_example, render, sample_layout, to_uint8, verify)
from unigrpo.world.verify import components, segment

SPLIT_BY_TEXT = ("colors", "position", "color_attr")
seeds = st.integers(0, 2**31 - 1)
categories = st.sampled_from(CATEGORIES)


def prompt(text):
    """The world's prompt with this exact text."""
    for cat in CATEGORIES:
        for p in all_prompts(cat):
            if p.text == text:
                return p
    raise KeyError(text)


def score(layout, text):
    """(ta, geneval, checks) of the render of a hand-built layout against a prompt text."""
    r = verify(render_batch([tuple(PlacedObject(*o) for o in layout)]), [prompt(text)])
    return r.ta.item(), r.geneval.item(), r.checks[0]


def boxes_apart(layout, obj=OBJ):
    """Pixel gap between the closest two object boxes (inf for fewer than two objects)."""
    gaps = [max(abs(a.x - b.x), abs(a.y - b.y)) * CELL - obj for a, b in itertools.combinations(layout, 2)]
    return min(gaps, default=float("inf"))


# --- prompts -------------------------------------------------------------------------------------------

def test_make_prompts_deterministic_and_seeded():
    a = make_prompts("train", 50, 7)
    assert a == make_prompts("train", 50, 7)
    assert a != make_prompts("train", 50, 8)


def test_every_category_appears_evenly():
    ps = make_prompts("heldout", 60, 3)
    assert [p.category for p in ps] == list(CATEGORIES) * 10
    sub = make_prompts("train", 9, 3, categories=("counting", "position"))
    assert [p.category for p in sub] == ["counting", "position"] * 4 + ["counting"]


@pytest.mark.parametrize("bad", ["validation", "test", ""])
def test_bad_split_names_it(bad):
    with pytest.raises(ValueError) as err:
        make_prompts(bad, 4, 0)
    assert repr(bad) in str(err.value) and "heldout" in str(err.value)


@pytest.mark.parametrize("cat", SPLIT_BY_TEXT)
def test_heldout_disjoint_from_train(cat):
    train = {p.text for p in make_prompts("train", 2000, 1, categories=(cat,))}
    held = {p.text for p in make_prompts("heldout", 2000, 1, categories=(cat,))}
    assert train and held and not train & held
    assert train | held == {p.text for p in all_prompts(cat)}  # every text is reachable from one split
    assert 0.15 <= len(held) / (len(train) + len(held)) <= 0.35


def test_prompt_texts_short_ascii_lowercase_unique():
    for cat in CATEGORIES:
        texts = [p.text for p in all_prompts(cat)]
        assert len(set(texts)) == len(texts)
        for t in texts:
            assert t.isascii() and t == t.lower() and len(t) <= 40


def test_prompt_text_names_its_spec():
    for cat in CATEGORIES:
        for p in all_prompts(cat):
            for spec in p.objects:
                assert spec.shape in p.text and (spec.color is None or spec.color in p.text)
            if p.relation:
                assert p.relation in p.text


# --- layouts and rendering -----------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(seed=seeds, cat=categories)
def test_sampled_layouts_are_drawable_and_correct(seed, cat):
    rng = np.random.default_rng(seed)
    lo, hi = grid_range()
    for p in make_prompts("train", 4, seed, categories=(cat,)):
        lay = sample_layout(p, rng)
        assert all(lo <= o.x <= hi and lo <= o.y <= hi for o in lay)
        assert boxes_apart(lay) >= GAP
        assert all(layout_checks(p, lay).values())
        if cat == "counting":
            assert len(lay) == p.count and {o.shape for o in lay} == {p.objects[0].shape}


@settings(max_examples=40, deadline=None)
@given(seed=seeds)
def test_render_draws_each_object_inside_its_box_in_its_colour(seed):
    rng = np.random.default_rng(seed)
    lay = sample_layout(make_prompts("train", 1, seed, categories=("counting",))[0], rng)
    img = render(lay)
    assert img.shape == (CANVAS, CANVAS, 3) and img.dtype == np.uint8
    covered = np.zeros((CANVAS, CANVAS), bool)
    for o in lay:
        top, left = center_px(o.y) - OBJ // 2, center_px(o.x) - OBJ // 2
        box = img[top:top + OBJ, left:left + OBJ]
        lit = box.any(-1)
        assert (box[lit] == COLORS[o.color]).all()
        assert lit[0].any() and lit[-1].any() and lit[:, 0].any() and lit[:, -1].any()  # spans its box
        covered[top:top + OBJ, left:left + OBJ] = True
    assert not img[~covered].any()


def test_shape_fill_ratios():
    for shape, lo, hi in [("square", 1.0, 1.0), ("circle", 0.7, 0.9), ("triangle", 0.45, 0.7)]:
        img = render((PlacedObject(shape, "red", 2, 2),))
        assert lo <= img.any(-1).sum() / OBJ ** 2 <= hi
    widths = render((PlacedObject("triangle", "red", 2, 2),)).any(-1).sum(1)
    widths = widths[widths > 0]
    assert (np.diff(widths) >= 0).all() and widths[0] < widths[-1] == OBJ  # upward: widens to a full base


def test_render_batch_range_and_round_trip():
    rng = np.random.default_rng(0)
    lays = [sample_layout(p, rng) for p in make_prompts("train", 12, 0)]
    x = render_batch(lays)
    assert x.shape == (12, 3, CANVAS, CANVAS) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert np.array_equal(to_uint8(x), np.stack([render(lay) for lay in lays]))


def test_render_clips_out_of_canvas_objects():
    img = render((PlacedObject("square", "blue", 0, 0), PlacedObject("circle", "red", 99, 3)))
    assert img[:OBJ // 2, :OBJ // 2].any() and not img[CELL:].any()


# --- plans ---------------------------------------------------------------------------------------------

placed = st.builds(PlacedObject, st.sampled_from(SHAPES), st.sampled_from(tuple(COLORS)),
                   st.integers(0, 300), st.integers(0, 300))


@settings(max_examples=200, deadline=None)
@given(lay=st.lists(placed, max_size=6).map(tuple))
def test_plan_round_trip(lay):
    text = plan_text(lay)
    assert text.isascii() and "\n" not in text
    assert parse_plan(text) == lay
    assert plan_text(parse_plan(text)) == text


@pytest.mark.parametrize("bad", [
    "", "red circle", "red circle at 1", "purple circle at 1,2", "red hexagon at 1,2", "red circle at -1,2",
    "red circle at 01,2", "red circle at 1,2;blue square at 3,4", "red circle at 1,2; ", "Red circle at 1,2",
    "red circle at 1, 2", "red  circle at 1,2", "empty; red circle at 1,2",
])
def test_parse_plan_rejects_malformed(bad):
    assert parse_plan(bad) is None


def test_parse_plan_reads_fields():
    assert parse_plan(" red circle at 2,5; blue square at 6,1\n") == (
        PlacedObject("circle", "red", 2, 5), PlacedObject("square", "blue", 6, 1))


# --- verifier ------------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(seed=seeds, cat=categories, split=st.sampled_from(["train", "heldout"]))
def test_ground_truth_renders_score_one(seed, cat, split):
    rng = np.random.default_rng(seed)
    ps = make_prompts(split, 6, seed, categories=(cat,))
    r = verify(render_batch([sample_layout(p, rng) for p in ps]), ps)
    assert (r.ta == 1).all() and (r.geneval == 1).all(), r.checks


@settings(max_examples=40, deadline=None)
@given(seed=seeds, cat=categories)
def test_corrupt_layouts_fail_and_verifier_agrees_with_layout(seed, cat):
    rng = np.random.default_rng(seed)
    ps = make_prompts("train", 6, seed, categories=(cat,))
    bad = [corrupt_layout(p, sample_layout(p, rng), rng) for p in ps]
    assert all(boxes_apart(lay) >= GAP for lay in bad)
    r = verify(render_batch(bad), ps)
    assert (r.geneval == 0).all() and (r.ta < 1).all(), r.checks
    # what the verifier reads off the pixels is what the layout says
    assert r.checks == [layout_checks(p, lay) for p, lay in zip(ps, bad)]


def test_ground_truth_survives_mild_noise():
    rng = np.random.default_rng(5)
    ps = make_prompts("train", 120, 5)
    x = render_batch([sample_layout(p, rng) for p in ps])
    x = x + 0.15 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    assert (verify(x, ps).geneval == 1).all()


def test_wrong_colour():
    assert score([("square", "red", 2, 2)], "a red square")[:2] == (1.0, 1.0)
    ta, ge, checks = score([("square", "blue", 2, 2)], "a red square")
    assert ge == 0 and ta == 0.5 and checks == {"square present": True, "red square present": False}


def test_wrong_count_and_extra_objects():
    circles = [("circle", "red", 0, 0), ("circle", "green", 2, 0), ("circle", "blue", 0, 2), ("circle", "red", 2, 2)]
    assert score(circles[:3], "three circles")[:2] == (1.0, 1.0)
    for wrong in (circles[:2], circles[:4], circles[:1]):
        ta, ge, checks = score(wrong, "three circles")
        assert ge == 0 and ta == pytest.approx(2 / 3) and not checks["exactly 3 circles"]
    ta, ge, checks = score(circles[:3] + [("square", "red", 3, 3)], "three circles")
    assert ge == 0 and checks["exactly 3 circles"] and not checks["only circles"]


def test_wrong_position_swapped():
    left_right = [("circle", "red", 0, 1), ("triangle", "blue", 3, 1)]
    assert score(left_right, "a circle left of a triangle")[:2] == (1.0, 1.0)
    assert score(left_right, "a triangle right of a circle")[:2] == (1.0, 1.0)
    for text in ("a triangle left of a circle", "a circle right of a triangle", "a circle above a triangle"):
        ta, ge, _ = score(left_right, text)
        assert ge == 0 and ta == pytest.approx(2 / 3)
    up_down = [("square", "green", 1, 0), ("circle", "yellow", 1, 3)]
    assert score(up_down, "a square above a circle")[:2] == (1.0, 1.0)
    assert score(up_down, "a square below a circle")[1] == 0


def test_position_needs_a_clear_direction():
    # mostly vertical offset: neither left of nor right of
    diagonal = [("circle", "red", 1, 0), ("triangle", "blue", 2, 3)]
    assert score(diagonal, "a circle left of a triangle")[1] == 0
    assert score(diagonal, "a circle above a triangle")[1] == 1


def test_wrong_shape():
    assert score([("square", "red", 2, 2)], "a circle")[:2] == (0.0, 0.0)
    assert score([("triangle", "red", 2, 2)], "a triangle")[:2] == (1.0, 1.0)
    ta, ge, _ = score([("circle", "red", 0, 0), ("circle", "red", 3, 3)], "a circle and a square")
    assert (ta, ge) == (0.5, 0.0)


def test_attribute_binding_swap():
    good = [("circle", "red", 0, 0), ("square", "blue", 3, 3)]
    assert score(good, "a red circle and a blue square")[:2] == (1.0, 1.0)
    swapped = [("circle", "blue", 0, 0), ("square", "red", 3, 3)]
    assert score(swapped, "a red circle and a blue square")[:2] == (0.0, 0.0)


def test_touching_objects_do_not_count():
    # two same-colour squares side by side merge into one blob that is no square
    img = np.zeros((1, CANVAS, CANVAS, 3), np.uint8)
    img[0, 8:8 + OBJ, 8:8 + 2 * OBJ] = COLORS["red"]
    assert verify(img, [prompt("a square")]).geneval.item() == 0


def test_wrong_size_is_no_object_and_specks_are_ignored():
    ps = [prompt("a square"), prompt("a square"), prompt("a red square"), prompt("two circles")]
    img = np.zeros((4, CANVAS, CANVAS, 3), np.uint8)
    img[0, 4:24, 4:24] = COLORS["red"]  # a square 2.5x too large
    img[1, 4:7, 4:7] = COLORS["red"]    # a square 0.4x the size
    img[2] = render((PlacedObject("square", "red", 3, 3),))
    img[2, 1:3, 28:30] = COLORS["blue"]  # a 2x2 speck is noise, not an extra object
    img[3] = render((PlacedObject("circle", "red", 1, 1), PlacedObject("circle", "red", 3, 2)))
    img[3, 0, 28:30] = COLORS["green"]
    assert verify(img, ps).geneval.tolist() == [0.0, 0.0, 1.0, 1.0]


def test_blank_and_noise_score_zero_everywhere():
    ps = [p for cat in CATEGORIES for p in all_prompts(cat)]
    gen = torch.Generator().manual_seed(0)
    images = {
        "blank": torch.full((len(ps), 3, CANVAS, CANVAS), -1.0),
        "white": torch.ones(len(ps), 3, CANVAS, CANVAS),
        "noise": torch.rand(len(ps), 3, CANVAS, CANVAS, generator=gen) * 2 - 1,
        "noise_uint8": np.random.default_rng(0).integers(0, 256, (len(ps), CANVAS, CANVAS, 3), dtype=np.uint8),
    }
    for name, x in images.items():
        r = verify(x, ps)
        assert (r.ta == 0).all() and (r.geneval == 0).all(), name


def test_verify_accepts_uint8_and_float_alike():
    rng = np.random.default_rng(2)
    ps = make_prompts("train", 24, 2)
    bad = [corrupt_layout(p, sample_layout(p, rng), rng) if i % 2 else sample_layout(p, rng)
           for i, p in enumerate(ps)]
    a, b = verify(render_batch(bad), ps), verify(np.stack([render(lay) for lay in bad]), ps)
    assert torch.equal(a.ta, b.ta) and a.checks == b.checks
    with pytest.raises(ValueError):
        verify(render_batch(bad), ps[:-1])


def flood_fill_count(col):
    """Reference: number of 4-connected same-colour components in one int colour map (-1 background)."""
    seen = np.zeros(col.shape, bool)
    n = 0
    for y0, x0 in zip(*np.nonzero(col >= 0)):
        if seen[y0, x0]:
            continue
        n += 1
        stack = [(y0, x0)]
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= yy < col.shape[0] and 0 <= xx < col.shape[1] and not seen[yy, xx] \
                        and col[yy, xx] == col[y, x]:
                    seen[yy, xx] = True
                    stack.append((yy, xx))
    return n


@settings(max_examples=60, deadline=None)
@given(seed=seeds, density=st.floats(0.1, 0.9))
def test_components_match_flood_fill(seed, density):
    rng = np.random.default_rng(seed)
    col = np.where(rng.random((3, 12, 12)) < density, rng.integers(0, 2, (3, 12, 12)), -1).astype(np.int8)
    lab = components(col)
    for b in range(3):
        fg = col[b] >= 0
        assert len(np.unique(lab[b][fg])) == flood_fill_count(col[b])
        assert (lab[b][~fg] == col.size).all()
        # neighbours of one colour share a label
        same = fg[:, 1:] & (col[b][:, 1:] == col[b][:, :-1])
        assert (lab[b][:, 1:][same] == lab[b][:, :-1][same]).all()


def test_segment_thresholds():
    px = np.array([[[[255, 0, 0], [200, 40, 30], [128, 128, 0], [0, 0, 0], [250, 250, 20], [90, 90, 90]]]], np.uint8)
    assert segment(px).tolist() == [[[list(COLORS).index("red"), list(COLORS).index("red"), -1, -1,
                                      list(COLORS).index("yellow"), -1]]]


# --- pre-training data ---------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(seed=seeds, cat=categories)
def test_pretrain_example_image_follows_plan(seed, cat):
    rng = np.random.default_rng(seed)
    p = make_prompts("train", 1, seed, categories=(cat,))[0]
    good_plan, good_img = pretrain_example(p, rng, flaw_prob=0.0)
    bad_plan, bad_img = pretrain_example(p, rng, flaw_prob=1.0)
    for plan, img in ((good_plan, good_img), (bad_plan, bad_img)):
        assert np.array_equal(img, render(parse_plan(plan)))
    assert verify(np.stack([good_img, bad_img]), [p, p]).geneval.tolist() == [1.0, 0.0]


def test_strict_check_fails_extra_objects_that_geneval_accepts():
    """GenEval's presence semantics accept an extra object; the strict held-out check (a reward-hacking
    indicator) does not."""
    from unigrpo.world.verify import expected_objects
    p = prompt("a circle")
    alone = verify(render_batch([(PlacedObject("circle", "red", 1, 1),)]), [p])
    extra = verify(render_batch([(PlacedObject("circle", "red", 1, 1), PlacedObject("square", "blue", 3, 3))]), [p])
    assert expected_objects(p) == 1
    assert alone.geneval.item() == 1.0 and alone.strict.item() == 1.0
    assert extra.geneval.item() == 1.0 and extra.strict.item() == 0.0


def test_image_statistics_of_known_images():
    from unigrpo.evaluate import image_statistics
    black = np.zeros((2, 8, 8, 3), np.uint8)
    assert image_statistics(black) == {"saturation": 0.0, "edge_energy": 0.0, "lit_fraction": 0.0}
    img = black.copy()
    img[:, :, :2] = 255            # left quarter white: lit, bright, but saturation 0
    img[:, :, 4:] = (255, 0, 0)    # right half pure red: saturation 1
    st = image_statistics(img)
    assert st["saturation"] == pytest.approx(0.5) and st["lit_fraction"] == pytest.approx(0.75)
    # grey 1 | 0 | 1/3: |∂x| = 1 between columns 1 and 2, 1/3 between 3 and 4, over the 7×7 edge map
    assert st["edge_energy"] == pytest.approx((1 + 1 / 3) * 7 / 49)
