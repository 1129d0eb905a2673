"""The reward interface and registry: the verifier rewards score renders from GenEval metadata, a failing reward
names itself and the sample, the weighted sum and the per-reward scores, spec validation."""
import numpy as np
import pytest
import torch

from _images import render_batch
from unigrpo.data import shapes_records
from unigrpo.rewards.base import RewardError, score
from unigrpo.rewards.registry import RewardSet, RewardSpec, normalise_rewards
from unigrpo.rewards.verifier import ShapesVerifierReward
from unigrpo.world import PlacedObject, all_prompts, make_prompts, sample_layout
from unigrpo.world.geneval import to_geneval


def _meta(p):
    m = to_geneval(p)
    del m["prompt"]
    return m


def _batch(n=12, seed=3):
    prompts = make_prompts("train", n, seed=seed)
    rng = np.random.default_rng(seed)
    return prompts, render_batch([sample_layout(p, rng) for p in prompts])


def test_verifier_reward_scores_ground_truth_one_and_blank_zero():
    prompts, images = _batch()
    texts, metas = [p.text for p in prompts], [_meta(p) for p in prompts]
    for kind in ("ta", "geneval", "ta_exact"):
        r = score(ShapesVerifierReward(kind), images, texts, metas)
        assert r.dtype == torch.float32 and r.shape == (12,) and bool((r == 1).all())
        assert bool((score(ShapesVerifierReward(kind), -torch.ones_like(images), texts, metas) == 0).all())


def test_verifier_reads_the_spec_from_metadata_not_the_text():
    """'a photo of two red circles' phrased any way: the metadata decides what is checked."""
    p = [q for q in all_prompts("single_object") if q.text == "a circle"][0]
    circle = render_batch([(PlacedObject("circle", "red", 1, 1),)])
    square_meta = {"tag": "single_object", "include": [{"class": "square", "count": 1}]}
    fn = ShapesVerifierReward("geneval")
    assert fn(circle, ["anything at all"], [_meta(p)]).item() == 1.0
    assert fn(circle, ["a circle"], [square_meta]).item() == 0.0


def test_a_failing_reward_names_the_sample():
    prompts = [p.text for p in make_prompts("train", 6, seed=0)]
    images = torch.zeros(6, 3, 32, 32)
    images[4] = float("nan")

    def picky(imgs, ps, meta):
        if torch.isnan(imgs).any():
            raise ValueError("NaN pixels")
        return torch.ones(len(ps))

    with pytest.raises(RewardError, match=rf"reward 'picky' failed on sample 4 \(prompt {prompts[4]!r}\).*NaN pixels"):
        score(picky, images, prompts, label="picky")


def test_non_finite_or_misshapen_scores_are_errors():
    prompts = ["a", "b", "c"]
    images = torch.zeros(3, 3, 32, 32)
    with pytest.raises(RewardError, match="sample 1"):
        score(lambda i, p, m: torch.tensor([0.0, float("inf"), 1.0]), images, prompts)
    with pytest.raises(RewardError, match="2 scores for 3 samples"):
        score(lambda i, p, m: torch.zeros(2), images, prompts)
    with pytest.raises(RewardError, match="nan for sample 2"):
        score(lambda i, p, m: [0.0, 1.0, float("nan")], images, prompts)


def test_ta_exact_reward_stops_paying_for_extra_objects():
    p = [q for q in all_prompts("single_object") if q.text == "a circle"][0]
    alone = render_batch([(PlacedObject("circle", "red", 1, 1),)])
    extra = render_batch([(PlacedObject("circle", "red", 1, 1), PlacedObject("square", "blue", 3, 3))])
    ta, exact = ShapesVerifierReward("ta"), ShapesVerifierReward("ta_exact")
    m = [_meta(p)]
    assert ta(extra, [p.text], m).item() == ta(alone, [p.text], m).item() == 1.0      # presence only: extras are free
    assert exact(alone, [p.text], m).item() == 1.0 and exact(extra, [p.text], m).item() == 0.5   # 1 of 2 checks


def _half(images, prompts, metadata, scale=1.0):
    return torch.full((len(prompts),), 0.5 * scale)


def test_weighted_sum_and_per_reward_scores():
    prompts, images = _batch(8)
    recs = shapes_records("train", 8, 3)
    assert [r.text for r in recs] == [p.text for p in prompts]
    blank = images.clone()
    blank[::2] = -1.0   # even samples blank: the verifier gives them 0
    rs = RewardSet([RewardSpec("shapes_ta", weight=2.0), RewardSpec("shapes_geneval", weight=0.0),
                    RewardSpec("python", function=f"{__name__}:_half", options={"scale": 3.0}, weight=-1.0,
                               label="const")])
    total, each, _ = rs(blank, [r.text for r in recs], [r.metadata for r in recs])
    ta = ShapesVerifierReward("ta")(blank, [r.text for r in recs], [r.metadata for r in recs])
    assert list(each) == ["shapes_ta", "shapes_geneval", "const"]
    assert torch.equal(each["shapes_ta"], ta) and torch.allclose(each["const"], torch.full((8,), 1.5))
    assert torch.allclose(total, 2.0 * ta - 1.5)          # weight 0 is logged, not summed
    assert bool((each["shapes_ta"][::2] == 0).all()) and bool((each["shapes_ta"][1::2] == 1).all())


def test_shapes_rewards_refuse_other_metadata_naming_the_line():
    from unigrpo.data import PromptRecord

    rs = RewardSet(["shapes_ta"])
    bad = [PromptRecord("a dog", "single_object", {"tag": "single_object", "include": [{"class": "dog", "count": 1}]},
                        "prompts.jsonl:7")]
    with pytest.raises(ValueError, match=r"prompts.jsonl:7: .*'dog' is not a shape"):
        rs.check_records(bad)


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="nope"), "not registered"),
    (dict(name="shapes_ta", url="http://x"), "does not take 'url'.*remote, vlm_judge"),
    (dict(name="clip"), "needs path"),
    (dict(name="remote"), "needs url"),
    (dict(name="python", function="no_colon"), "module:function"),
    (dict(name="remote", url="http://x", retries=-1), "retries >= 0"),
    (dict(name="shapes_ta", label="mean"), "reserved"),
    (dict(name="shapes_ta", weight=float("nan")), "finite"),
])
def test_bad_reward_specs_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RewardSpec(**kwargs)


def test_reward_list_rules():
    with pytest.raises(ValueError, match="unique"):
        normalise_rewards(["shapes_ta", "shapes_ta"])
    with pytest.raises(ValueError, match="empty"):
        normalise_rewards([])
    with pytest.raises(ValueError, match="weight 0"):
        normalise_rewards([RewardSpec("shapes_ta", weight=0.0)])
    assert [s.label for s in normalise_rewards(["shapes_ta", RewardSpec("shapes_ta", label="b")])] == ["shapes_ta", "b"]


def test_python_reward_import_errors_are_named():
    with pytest.raises(ValueError, match="cannot import 'no_such_module_xyz:f'"):
        RewardSet([RewardSpec("python", function="no_such_module_xyz:f")])


def test_abstained_samples_take_their_group_mean():
    from unigrpo.rewards.registry import _fill_abstained

    s = torch.tensor([1.0, float("nan"), 0.0, 0.5, float("nan"), float("nan")])
    out = _fill_abstained(s, 3)
    assert torch.allclose(out, torch.tensor([1.0, 0.5, 0.0, 0.5, 0.5, 0.5]))


# ---------------------------------------------------------------------------------------------- shapes_clean
def _prompt(text):
    from unigrpo.world import CATEGORIES
    return next(p for c in CATEGORIES for p in all_prompts(c) if p.text == text)


def _clean(layout_or_images, p):
    images = layout_or_images if isinstance(layout_or_images, torch.Tensor) else render_batch([layout_or_images])
    return ShapesVerifierReward("clean")(images, [p.text], [_meta(p)]).item()


def test_clean_reward_exact_render_scores_one_blank_and_noise_zero():
    rng = np.random.default_rng(0)
    for text in ("a circle", "a red square", "three triangles", "a circle left of a square",
                 "a blue circle and a yellow triangle"):
        p = _prompt(text)
        for _ in range(3):
            assert _clean(sample_layout(p, rng), p) == 1.0, text
        assert _clean(-torch.ones(1, 3, 32, 32), p) == 0.0
        noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
        assert _clean(noise, p) == 0.0


def test_clean_reward_takes_credit_for_extra_objects_blobs_and_doubled_counts():
    p = _prompt("a circle")
    exact = (PlacedObject("circle", "red", 1, 1),)
    assert _clean(exact, p) == 1.0
    extra = _clean(exact + (PlacedObject("square", "blue", 3, 3),), p)
    assert extra == pytest.approx(0.5)                   # one extra object: 1 / (1 + 1)
    same_kind = _clean(exact + (PlacedObject("circle", "green", 3, 3),), p)
    assert same_kind == pytest.approx(0.5)                # an extra circle is still an extra object
    # a noise blob: a 3×3 speck of light, below the verifier's object size, costs its area (9/36 of a box)
    img = render_batch([exact])
    img[0, :, 28:31, 28:31] = 1.0
    assert _clean(img, p) == pytest.approx(1 - 9 / 36)
    # a doubled count: four squares for "two squares" fails "exactly 2" and has two extra objects
    two = _prompt("two squares")
    pair = (PlacedObject("square", "red", 0, 0), PlacedObject("square", "red", 2, 2))
    assert _clean(pair, two) == 1.0
    four = pair + (PlacedObject("square", "blue", 0, 2), PlacedObject("square", "blue", 2, 0))
    ta = ShapesVerifierReward("ta")(render_batch([four]), [two.text], [_meta(two)]).item()
    assert ta == pytest.approx(2 / 3)                     # "exactly 2" fails, presence and "only" pass
    assert _clean(four, two) == pytest.approx(ta / 3)     # and 1 / (1 + 2) for the two extra


def test_geneval_style_stays_true_to_geneval():
    """The reported GenEval-style score keeps GenEval's own rules: presence only, extras are free."""
    p = _prompt("a circle")
    flood = render_batch([(PlacedObject("circle", "red", 1, 1), PlacedObject("square", "blue", 3, 3))])
    assert ShapesVerifierReward("geneval")(flood, [p.text], [_meta(p)]).item() == 1.0
