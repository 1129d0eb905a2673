"""The differentiable verifier surrogate of the ReFL baseline (unigrpo/rewards/surrogate.py)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _images import render_batch
from unigrpo.rewards.surrogate import colour_masses, stray_light, surrogate_reward, target_masses
from unigrpo.world import PlacedObject, all_prompts, make_prompts, sample_layout
from unigrpo.world.prompts import COLORS
from unigrpo.world.render import shape_mask


def _prompt(text):
    return next(p for c in ("single_object", "two_object", "counting", "colors", "position", "color_attr")
                for p in all_prompts(c) if p.text == text)


def test_target_masses_count_rendered_areas():
    circle, tri = shape_mask("circle").mean(), shape_mask("triangle").mean()   # areas in box units, from the renderer
    assert target_masses(_prompt("three squares")) == (3.0, {})
    total, named = target_masses(_prompt("a red circle and a blue square"))
    assert total == pytest.approx(circle + 1.0) and named == pytest.approx({"red": circle, "blue": 1.0})
    assert target_masses(_prompt("a triangle left of a circle"))[0] == pytest.approx(tri + circle)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_colour_masses_match_the_hard_segmentation_of_renders(seed):
    """Renders hold exact palette colours on black: the soft mass equals the pixel count / 36 to within the
    sigmoid's tails (σ((96 − 0)/16) = 0.9975 on a colour, ≤ 5e-5 per black pixel: ≤ 0.3% + 0.06 boxes)."""
    rng = np.random.default_rng(seed)
    prompts = make_prompts("train", 6, seed=seed)
    layouts = [sample_layout(p, rng) for p in prompts]
    images = render_batch(layouts)
    M = colour_masses(images)
    u8 = ((images + 1) * 127.5).round().permute(0, 2, 3, 1)
    for i in range(len(prompts)):
        for c, name in enumerate(COLORS):
            px = (u8[i] == torch.tensor(COLORS[name], dtype=u8.dtype)).all(-1).sum().item()
            assert M[i, c].item() == pytest.approx(px / 36, rel=3e-3, abs=0.06)


def test_surrogate_prefers_the_asked_for_amount_over_blank_and_flooded_canvases():
    p = _prompt("a red circle")
    right = render_batch([(PlacedObject("circle", "red", 1, 1),)])
    flooded = render_batch([(PlacedObject("circle", "red", 1, 1), PlacedObject("square", "red", 3, 3),
                             PlacedObject("square", "green", 1, 3))])
    wrong_colour = render_batch([(PlacedObject("circle", "blue", 1, 1),)])
    blank = -torch.ones_like(right)
    s = {k: surrogate_reward(x, [p]).item() for k, x in
         dict(right=right, flooded=flooded, wrong=wrong_colour, blank=blank).items()}
    assert s["right"] > 0.98
    assert s["right"] > s["flooded"] and s["right"] > s["wrong"] and s["right"] > s["blank"]
    # a blank canvas scores 0 for every prompt, colours named or not: err = T + Σ t_c, the normaliser
    for q in (p, _prompt("two circles"), _prompt("a triangle left of a circle")):
        assert surrogate_reward(blank, [q]).item() == pytest.approx(0.0, abs=0.01)


def test_stray_light_costs_what_no_palette_colour_explains():
    """A dim texture over the right render (what an over-optimised policy drew) lowers the surrogate; the
    render alone has almost no stray light."""
    p = _prompt("a red circle")
    right = render_batch([(PlacedObject("circle", "red", 1, 1),)])
    gen = torch.Generator().manual_seed(0)
    texture = torch.where(right > -1, right, -1 + 0.6 * torch.rand(right.shape, generator=gen))   # dim, mixed colours
    assert stray_light(right).item() < 0.05
    assert stray_light(texture).item() > 3.0
    assert surrogate_reward(texture, [p]).item() < surrogate_reward(right, [p]).item() - 0.5


def test_surrogate_gradient_matches_finite_differences():
    torch.manual_seed(0)
    prompts = [_prompt("a red circle"), _prompt("two squares")]
    x = (torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda im: surrogate_reward(im, prompts), (x,), eps=1e-6, atol=1e-6)


def test_surrogate_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"B = 2 prompts.*\(1, 3, 8, 8\)"):
        surrogate_reward(torch.zeros(1, 3, 8, 8), [_prompt("a circle")] * 2)
