"""The reward interface: the verifier reward scores renders, and a reward that fails names the sample."""
import numpy as np
import pytest
import torch

from unigrpo.rewards.verifier import ShapesVerifierReward, score
from unigrpo.world import make_prompts, render_batch, sample_layout


def test_verifier_reward_scores_ground_truth_one_and_blank_zero():
    prompts = make_prompts("train", 12, seed=3)
    rng = np.random.default_rng(3)
    images = render_batch([sample_layout(p, rng) for p in prompts])
    for kind in ("ta", "geneval"):
        r = score(ShapesVerifierReward(kind), images, prompts)
        assert r.dtype == torch.float32 and r.shape == (12,) and bool((r == 1).all())
        assert bool((score(ShapesVerifierReward(kind), -torch.ones_like(images), prompts) == 0).all())


def test_a_failing_reward_names_the_sample():
    prompts = make_prompts("train", 6, seed=0)
    images = torch.zeros(6, 3, 32, 32)
    images[4] = float("nan")

    def picky(imgs, ps, meta):
        if torch.isnan(imgs).any():
            raise ValueError("NaN pixels")
        return torch.ones(len(ps))

    with pytest.raises(RuntimeError, match=rf"sample 4 \(prompt {prompts[4].text!r}\).*NaN pixels"):
        score(picky, images, prompts)


def test_non_finite_or_misshapen_scores_are_errors():
    prompts = make_prompts("train", 3, seed=0)
    images = torch.zeros(3, 3, 32, 32)
    with pytest.raises(RuntimeError, match="sample 1"):
        score(lambda i, p, m: torch.tensor([0.0, float("inf"), 1.0]), images, prompts)
    with pytest.raises(RuntimeError, match="2 scores for 3 samples"):
        score(lambda i, p, m: torch.zeros(2), images, prompts)


def test_unknown_reward_kind():
    with pytest.raises(ValueError, match="'clip'"):
        ShapesVerifierReward("clip")


def test_ta_exact_reward_stops_paying_for_extra_objects():
    from unigrpo.rewards.verifier import ShapesVerifierReward
    from unigrpo.world import PlacedObject, all_prompts, render_batch
    p = [q for q in all_prompts("single_object") if q.text == "a circle"][0]
    alone = render_batch([(PlacedObject("circle", "red", 1, 1),)])
    extra = render_batch([(PlacedObject("circle", "red", 1, 1), PlacedObject("square", "blue", 3, 3))])
    ta, exact = ShapesVerifierReward("ta"), ShapesVerifierReward("ta_exact")
    assert ta(extra, [p]).item() == ta(alone, [p]).item() == 1.0            # presence only: extras are free
    assert exact(alone, [p]).item() == 1.0 and exact(extra, [p]).item() == 0.5   # 1 check passed of 2
