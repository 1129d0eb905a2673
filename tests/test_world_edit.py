"""The editing tasks of the shapes world (unigrpo/world/edit.py, ALGORITHM.md §12, issue 19 item 4).

Scores are exact (the verifier is deterministic on renders), so the checks are equalities, not tolerances.
"""
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from unigrpo.world import CATEGORIES, grid_range, sample_layout, split_prompts
from unigrpo.world.edit import (EDIT_KINDS, OPPOSITE, EditTask, all_edits, edit_layout, edit_pretrain_example,
                                make_edit_tasks, split_edits, verify_edit, verify_edit_plan)
from unigrpo.world.plan import parse_plan, plan_text
from unigrpo.world.render import render


def test_every_kind_has_tasks_on_both_sides_of_a_disjoint_fixed_split():
    for kind in EDIT_KINDS:
        train, held = split_edits(kind, "train"), split_edits(kind, "heldout")
        assert train and held, kind
        assert not set(train) & set(held), kind
        assert set(train) | set(held) == set(all_edits(kind)), kind
        assert len(held) >= max(1, round(0.25 * len(all_edits(kind)))), kind
        held_prompts = {p.text for c in CATEGORIES for p in split_prompts(c, "heldout")} - {
            p.text for c in CATEGORIES for p in split_prompts(c, "train")}
        assert not {x.text for t in train for x in (t.source, t.target)} & held_prompts, kind
    split_edits.cache_clear()
    again = {k: split_edits(k, "heldout") for k in EDIT_KINDS}
    split_edits.cache_clear()
    assert again == {k: split_edits(k, "heldout") for k in EDIT_KINDS}


def test_the_split_is_the_same_in_another_process_and_sampled_tasks_respect_it():
    """Another interpreter with another PYTHONHASHSEED draws the same held-out tasks (a split ranked by
    Python's salted hash() would not)."""
    code = ("from unigrpo.world.edit import EDIT_KINDS, split_edits\n"
            "for k in EDIT_KINDS:\n    for t in split_edits(k, 'heldout'): print(t.source.text, '|', t.instruction)")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    here = "".join(f"{t.source.text} | {t.instruction}\n" for k in EDIT_KINDS for t in split_edits(k, "heldout"))
    assert other == here and here
    for kind in EDIT_KINDS:
        held = split_edits(kind, "heldout")
        train = set(make_edit_tasks("train", 400, 1, kinds=[kind]))
        assert train and held and not train & set(make_edit_tasks("heldout", 400, 1, kinds=[kind]))


def _differs_as_said(t: EditTask) -> bool:
    src, tgt, words = t.source.objects, t.target.objects, t.instruction.split()
    if t.kind == "recolour":   # "make the <shape> <colour>"
        shape, color = words[2], words[3]
        return ([o for o in src if o.shape != shape] == [o for o in tgt if o.shape != shape]
                and [o.color for o in tgt if o.shape == shape] == [color]
                and [o.color for o in src if o.shape == shape] != [color])
    if t.kind == "remove":     # "remove the <shape>"
        return tgt == tuple(o for o in src if o.shape != words[-1]) and len(tgt) == len(src) - 1
    if t.kind == "add":        # "add a [<colour>] <shape>"
        return tgt[:-1] == src and tgt[-1].shape == words[-1] and tgt[-1].color == (
            words[2] if len(words) == 4 else None)
    return tgt == src and t.target.relation == OPPOSITE[t.source.relation] != t.source.relation


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_the_target_differs_from_the_source_exactly_as_the_instruction_says(kind):
    for t in all_edits(kind):
        assert t.kind == kind and _differs_as_said(t), t


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(EDIT_KINDS), split=st.sampled_from(["train", "heldout"]))
def test_the_exact_edit_scores_one_and_the_unedited_image_fails_strict(seed, kind, split):
    rng = np.random.default_rng(seed)
    t = make_edit_tasks(split, 1, seed, kinds=[kind])[0]
    plan1, img1, plan2, img2 = edit_pretrain_example(t, rng)
    assert parse_plan(plan1) is not None and parse_plan(plan2) is not None
    res = verify_edit(np.stack([img2, img1, np.zeros_like(img1)]), [t, t, t])
    assert res.strict[0] == 1 and res.geneval[0] == 1, (t, plan2)
    assert res.strict[1] == 0, (t, plan1)   # the edit is checkable: round 1's own image does not pass
    assert res.strict[2] == 0 and res.geneval[2] == 0   # a blank canvas


def test_every_move_places_the_moved_object_clear_of_the_relation_boundary():
    tasks, seed = all_edits("move"), np.random.SeedSequence().entropy
    rng = np.random.default_rng(seed)
    imgs = [edit_pretrain_example(t, rng)[3] for t in tasks for _ in range(20)]
    res = verify_edit(np.stack(imgs), [t for t in tasks for _ in range(20)])
    assert res.strict.tolist() == [1.0] * len(imgs), seed


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["recolour", "remove"]))
def test_recolour_and_remove_keep_the_other_objects_in_place(seed, kind):
    rng = np.random.default_rng(seed)
    t = make_edit_tasks("train", 1, seed, kinds=[kind])[0]
    first = sample_layout(t.source, rng)
    second = edit_layout(t, first, rng)
    shape = t.instruction.split()[2]
    assert [o for o in first if o.shape != shape] == [o for o in second if o.shape != shape]
    if kind == "recolour":
        assert [(o.x, o.y) for o in first] == [(o.x, o.y) for o in second]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(EDIT_KINDS))
def test_the_edited_plan_passes_and_the_round_1_plan_or_a_broken_one_fails(seed, kind):
    rng = np.random.default_rng(seed)
    t = make_edit_tasks("train", 1, seed, kinds=[kind])[0]
    plan1, _, plan2, _ = edit_pretrain_example(t, rng)
    second = parse_plan(plan2)
    hi = grid_range()[1]
    off_canvas = plan_text((replace(second[0], x=hi + 1),) + second[1:])
    plans = [plan2, plan1, "empty", "a red circle", off_canvas]
    if len(second) > 1:   # two objects in one cell touch
        plans.append(plan_text((second[0], replace(second[1], x=second[0].x, y=second[0].y)) + second[2:]))
    assert verify_edit_plan(plans, [t] * len(plans)).tolist() == [1] + [0] * (len(plans) - 1), plans


def test_make_edit_tasks_cycles_kinds_and_is_deterministic():
    a = make_edit_tasks("heldout", 12, seed=3)
    assert [t.kind for t in a] == list(EDIT_KINDS) * 3
    assert a == make_edit_tasks("heldout", 12, seed=3)
    assert all(t in set(split_edits(t.kind, "heldout")) for t in a)


def test_bad_inputs_name_the_bad_value():
    with pytest.raises(ValueError, match=r"unknown edit kind 'rotate'; expected one of"):
        all_edits("rotate")
    with pytest.raises(ValueError, match=r"unknown split 'test'"):
        split_edits("move", "test")
    with pytest.raises(ValueError, match=r"kinds is empty"):
        make_edit_tasks("train", 2, 0, kinds=[])
    t = all_edits("add")[0]
    with pytest.raises(ValueError, match=r"2 images but 1 prompts"):
        verify_edit(np.zeros((2, 32, 32, 3), np.uint8), [t])
    with pytest.raises(ValueError, match=r"2 plans but 1 tasks"):
        verify_edit_plan(["empty", "empty"], [t])
    with pytest.raises(ValueError, match=r"unknown edit kind 'rotate'"):
        EditTask(t.source, t.instruction, "rotate", t.target)
    with pytest.raises(ValueError, match=r"layout 'empty' is not an exact layout of the source 'a circle'"):
        edit_layout(t, (), np.random.default_rng(0))


def test_verify_plans_accepts_an_exact_layout_and_rejects_each_flaw():
    """A plan checker for single prompts (what eval's "exactly a correct plan" counts): the world's correct
    layout scores 1, every flawed layout of it 0, an unparsable text 0; the edit-plan check agrees with it."""
    from unigrpo.world import corrupt_layout, plan_text, make_prompts, sample_layout, verify_plans

    rng = np.random.default_rng(7)
    prompts = make_prompts("heldout", 60, seed=3)
    good = [plan_text(sample_layout(p, rng)) for p in prompts]
    assert verify_plans(good, prompts).tolist() == [1.0] * len(prompts)
    bad = [plan_text(corrupt_layout(p, sample_layout(p, rng), rng)) for p in prompts]
    assert verify_plans(bad, prompts).sum() == 0
    assert verify_plans(["not a plan"], prompts[:1]).tolist() == [0.0]
    with pytest.raises(ValueError, match="2 plans but 1 prompts"):
        verify_plans(good[:2], prompts[:1])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(EDIT_KINDS))
def test_a_flawed_edit_is_drawn_as_planned_and_never_exact_while_round_1_stays_exact(seed, kind):
    rng = np.random.default_rng(seed)
    t = make_edit_tasks("train", 1, seed, kinds=[kind])[0]
    plans = [edit_pretrain_example(t, rng, flaw_prob=1.0) for _ in range(8)]
    src = replace(t, target=t.source)   # round 1 judged against the source prompt
    assert verify_edit_plan([p[0] for p in plans], [src] * 8).tolist() == [1.0] * 8
    assert verify_edit_plan([p[2] for p in plans], [t] * 8).tolist() == [0.0] * 8, [p[2] for p in plans]
    for plan1, img1, plan2, img2 in plans:
        layout = parse_plan(plan2)
        assert layout is not None and all(lo <= v <= hi for o in layout for v in (o.x, o.y)
                                          for lo, hi in [grid_range()])
        assert np.array_equal(img2, render(layout)), plan2   # the image follows the (flawed) plan


def test_flawed_edits_come_at_the_asked_rate_in_both_kinds():
    seed = np.random.SeedSequence().entropy
    rng, n, p = np.random.default_rng(seed), 1200, 0.3
    tasks = make_edit_tasks("train", n, seed % 2**31)
    out = [edit_pretrain_example(t, rng, flaw_prob=p) for t in tasks]
    flawed = 1 - verify_edit_plan([o[2] for o in out], tasks).numpy()
    ignored = np.array([o[2] == o[0] for o in out])
    sd = (p * (1 - p) / n) ** 0.5   # binomial sd of the flawed fraction; 4 sd: a false alarm 1 run in ~16 000
    assert abs(flawed.mean() - p) < 4 * sd, (seed, flawed.mean())
    assert ignored.sum() > 0 and (flawed.astype(bool) & ~ignored).sum() > 0, seed   # both kinds of flaw occur
    assert not (ignored & ~flawed.astype(bool)).any(), seed   # an unchanged plan is always a flaw


def test_no_flaws_draws_nothing_extra_so_earlier_examples_are_unchanged():
    t = make_edit_tasks("train", 1, 3)[0]
    a, b = np.random.default_rng(11), np.random.default_rng(11)
    plan1, _, plan2, _ = edit_pretrain_example(t, a, flaw_prob=0.0)
    first = sample_layout(t.source, b)
    assert (plan1, plan2) == (plan_text(first), plan_text(edit_layout(t, first, b)))
    assert a.random() == b.random()


def test_pretrain_refuses_an_edit_flaw_probability_outside_0_1():
    from unigrpo.pretrain import PretrainConfig
    with pytest.raises(ValueError, match="edit_flaw_prob"):
        PretrainConfig(edit_flaw_prob=1.5)
