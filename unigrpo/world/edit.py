"""Editing tasks of the shapes world (round 2 of a multi-round episode, ALGORITHM.md §12).

An edit task is a source prompt, an instruction and the composed target: the prompt the edited image must
satisfy. Every target is itself a prompt of the world, so the verifier, its strict check and the rewards
score an edited image unchanged.

Decisions:
- Four kinds, each defined only where its result is a prompt of the world:
  recolour ("make the circle blue": colors → colors, color_attr → color_attr, a colour the prompt does not
  use), add ("add a triangle" / "add a blue triangle": single_object → two_object, colors → color_attr),
  remove ("remove the square": two_object → single_object, color_attr → colors), move ("move the circle
  to the right of the square": position → position with the opposite relation). "Move" is relative to
  the other object, because the verifier checks relations, not absolute places; and only to the opposite
  side, because a diagonal layout can hold "left of" and "above" at once, so an unedited image could pass.
- The pool is enumerated (`all_edits`); the train/held-out split ranks each kind's tasks by a stable hash
  of (source, instruction) and holds out the first quarter, as prompts.py does for prompt texts, so it is
  fixed across runs and both sides of every kind are non-empty. Every task whose source or target is a
  held-out prompt text is held out too: one advantage trains both rounds, so training on such a task would
  train on the held-out prompt.
- The round-2 plan is checked (`verify_edit_plan`) like the strict score, on cell centres: it parses, every
  centre is a valid cell, no two objects touch, the target's checks (layout_checks) pass and it places
  exactly the target's objects.
- Ground truth (`edit_pretrain_example`) keeps the untouched objects where round 1 put them: the edited
  layout is the round-1 layout with the edit applied; only an added or moved object gets a new cell. A moved
  object's cell keeps sample_layout's relation margin (min_sep cells along, no more across than along): a
  cell that only just passes layout_checks can fail on the render, whose triangle centroid sits below its
  cell centre. If no cell satisfies the target, the edited layout is sampled afresh for the target.
- Flawed round-2 plans (`edit_pretrain_example(flaw_prob=...)`), as flawed plans make the single-round base
  imperfect (data.py): half of them ignore the edit (the round-1 layout unchanged, the failure editing models
  are known for), half are the edited layout with one of corrupt_layout's flaws. Either is rendered as planned,
  so the image follows the plan and only the text is wrong; a flawed plan is never an exact layout of the target.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch

from unigrpo.world.layout import (CANVAS, OBJ, Layout, PlacedObject, _free, corrupt_layout, free_cells, grid_range,
                                  layout_checks, min_sep, relation_is_clear, sample_layout)
from unigrpo.world.plan import parse_plan, plan_text
from unigrpo.world.prompts import (CATEGORIES, COLORS, HELDOUT_FRACTION, SHAPES, SPLITS, ObjectSpec, Prompt,
                                   _stable_hash, all_prompts, split_prompts)
from unigrpo.world.render import render
from unigrpo.world.verify import VerifyResult, expected_objects, verify

EDIT_KINDS = ("recolour", "move", "add", "remove")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass(frozen=True)
class EditTask:
    """Round 1 draws `source`; round 2 gets `instruction`, and its image is scored against `target`."""
    source: Prompt
    instruction: str
    kind: str
    target: Prompt

    def __post_init__(self):
        if self.kind not in EDIT_KINDS:
            raise ValueError(f"unknown edit kind {self.kind!r}; expected one of {EDIT_KINDS}")


@lru_cache(maxsize=None)
def _prompt_index() -> dict[tuple, Prompt]:
    return {(p.category, p.objects, p.count, p.relation): p for c in CATEGORIES for p in all_prompts(c)}


def _target(category: str, objects: tuple[ObjectSpec, ...], relation: str | None = None) -> Prompt:
    key = (category, objects, 1, relation)
    if key not in _prompt_index():
        raise ValueError(f"no {category} prompt with objects {objects} and relation {relation!r}")
    return _prompt_index()[key]


def _edits_of(p: Prompt) -> list[EditTask]:
    out = []
    objs = p.objects
    if p.category in ("colors", "color_attr"):
        used = {o.color for o in objs}
        for i, o in enumerate(objs):
            for c in COLORS:
                if c not in used:
                    new = objs[:i] + (ObjectSpec(o.shape, c),) + objs[i + 1:]
                    out.append(EditTask(p, f"make the {o.shape} {c}", "recolour", _target(p.category, new)))
    if p.category == "single_object":
        for s in SHAPES:
            if s != objs[0].shape:
                out.append(EditTask(p, f"add a {s}", "add", _target("two_object", objs + (ObjectSpec(s),))))
    if p.category == "colors":
        for s in SHAPES:
            for c in COLORS:
                if s != objs[0].shape and c != objs[0].color:
                    out.append(EditTask(p, f"add a {c} {s}", "add",
                                        _target("color_attr", objs + (ObjectSpec(s, c),))))
    if p.category in ("two_object", "color_attr"):
        single = "single_object" if p.category == "two_object" else "colors"
        for i, o in enumerate(objs):
            out.append(EditTask(p, f"remove the {o.shape}", "remove", _target(single, objs[:i] + objs[i + 1:])))
    if p.category == "position":
        a, b = objs
        r = OPPOSITE[p.relation]
        out.append(EditTask(p, f"move the {a.shape} {'to the ' if r.endswith('of') else ''}{r} the {b.shape}",
                            "move", _target("position", objs, r)))
    return out


@lru_cache(maxsize=None)
def all_edits(kind: str) -> tuple[EditTask, ...]:
    """Every edit task of one kind over every prompt of the world, in a fixed order."""
    if kind not in EDIT_KINDS:
        raise ValueError(f"unknown edit kind {kind!r}; expected one of {EDIT_KINDS}")
    return tuple(t for c in CATEGORIES for p in all_prompts(c) for t in _edits_of(p) if t.kind == kind)


@lru_cache(maxsize=None)
def split_edits(kind: str, split: str) -> tuple[EditTask, ...]:
    """The edit tasks of one kind available to one split (see the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    pool = all_edits(kind)
    ranked = sorted(pool, key=lambda t: (_stable_hash(f"{t.source.text}|{t.instruction}"), t.source.text,
                                         t.instruction))
    held = set(ranked[:max(1, round(HELDOUT_FRACTION * len(pool)))])
    held |= {t for t in pool if _uses_heldout_prompt(t)}
    return tuple(t for t in pool if (t in held) == (split == "heldout"))


@lru_cache(maxsize=None)
def _heldout_texts() -> frozenset[str]:
    """Prompt texts only the held-out split has (shared texts are in both and do not count)."""
    return frozenset(p.text for c in CATEGORIES for p in split_prompts(c, "heldout")) - {
        p.text for c in CATEGORIES for p in split_prompts(c, "train")}


def _uses_heldout_prompt(t: EditTask) -> bool:
    """Whether the task's source or target is a held-out prompt text (the same advantage trains both rounds,
    so a training task must not touch one)."""
    return t.source.text in _heldout_texts() or t.target.text in _heldout_texts()


def make_edit_tasks(split: str, n: int, seed: int, kinds=EDIT_KINDS) -> list[EditTask]:
    """n edit tasks for a split, kinds cycled in order, tasks drawn uniformly; deterministic in its args."""
    kinds = tuple(kinds)
    if not kinds:
        raise ValueError("kinds is empty")
    pools = [split_edits(k, split) for k in kinds]
    rng = np.random.default_rng([seed, SPLITS.index(split), 1])
    return [pools[i % len(pools)][int(rng.integers(len(pools[i % len(pools)])))] for i in range(n)]


def verify_edit(images, tasks: list[EditTask], obj: int = OBJ) -> VerifyResult:
    """Score edited images (as `verify` takes them) against each task's composed target."""
    return verify(images, [t.target for t in tasks], obj)


def _exact(prompt: Prompt, layout: Layout, canvas: int, obj: int) -> bool:
    lo, hi = grid_range(canvas, obj)
    sep = min_sep(obj)
    return (all(lo <= o.x <= hi and lo <= o.y <= hi for o in layout)
            and all(_free(a.x, a.y, layout[i + 1:], sep) for i, a in enumerate(layout))
            and len(layout) == expected_objects(prompt) and all(layout_checks(prompt, layout, obj).values()))


def verify_plans(plans: list[str], prompts: list[Prompt], canvas: int = CANVAS, obj: int = OBJ) -> torch.Tensor:
    """float32 [B]: 1 where the plan text is an exact layout of the prompt (it parses, every object in the grid,
    none touching, exactly the asked-for objects, every check passing), else 0 (unparsable plans included).
    Judged on cell centres, as layout_checks judges them."""
    if len(plans) != len(prompts):
        raise ValueError(f"{len(plans)} plans but {len(prompts)} prompts")
    layouts = [parse_plan(p) for p in plans]
    return torch.tensor([float(lay is not None and _exact(p, lay, canvas, obj))
                         for lay, p in zip(layouts, prompts)], dtype=torch.float32)


def verify_edit_plan(plans: list[str], tasks: list[EditTask], canvas: int = CANVAS, obj: int = OBJ) -> torch.Tensor:
    """float32 [B]: 1 where the round-2 plan text is an exact layout of the task's target (verify_plans; see the
    module docstring), else 0."""
    if len(plans) != len(tasks):
        raise ValueError(f"{len(plans)} plans but {len(tasks)} tasks")
    return verify_plans(plans, [t.target for t in tasks], canvas, obj)


def edit_layout(task: EditTask, layout: Layout, rng: np.random.Generator, canvas: int = CANVAS,
                obj: int = OBJ) -> Layout:
    """The round-1 layout with the task's edit applied (untouched objects stay put); a fresh target layout
    when the edit cannot be placed. The layout must be an exact layout of the task's source."""
    if not _exact(task.source, layout, canvas, obj):
        raise ValueError(f"layout {plan_text(layout)!r} is not an exact layout of the source {task.source.text!r}")
    objs = list(layout)
    by_shape = {o.shape: i for i, o in enumerate(objs)}
    edited: Layout | None = None
    if task.kind == "recolour":
        i = by_shape[task.instruction.split()[2]]
        objs[i] = replace(objs[i], color=task.instruction.split()[3])
        edited = tuple(objs)
    elif task.kind == "remove":
        edited = tuple(o for o in objs if o.shape != task.instruction.split()[-1])
    else:
        moved = task.target.objects[0] if task.kind == "move" else task.target.objects[-1]
        keep = tuple(o for o in objs if o.shape != moved.shape) if task.kind == "move" else tuple(objs)
        old = [o for o in objs if o.shape == moved.shape]
        color = moved.color or (old[0].color if old else tuple(COLORS)[int(rng.integers(len(COLORS)))])
        cells = free_cells(keep, canvas, obj)
        rng.shuffle(cells)
        for x, y in cells:
            cand = keep + (PlacedObject(moved.shape, color, x, y),)
            if task.kind == "move":
                cand = (cand[-1],) + cand[:-1]
            if all(layout_checks(task.target, cand, obj).values()) and (
                    task.target.relation is None or relation_is_clear(cand, task.target.relation, obj)):
                edited = cand
                break
    if edited is None or not all(layout_checks(task.target, edited, obj).values()):
        edited = sample_layout(task.target, rng, canvas, obj)
    return edited


def flawed_edit(task: EditTask, first: Layout, edited: Layout, rng: np.random.Generator, canvas: int = CANVAS,
                obj: int = OBJ) -> Layout:
    """A drawable round-2 layout that is not an exact layout of the target: with probability 1/2 the round-1
    layout `first` (the edit ignored), else `edited` with one of corrupt_layout's flaws."""
    if rng.random() < 0.5 and not _exact(task.target, first, canvas, obj):
        return first
    return corrupt_layout(task.target, edited, rng, canvas, obj)


def edit_pretrain_example(task: EditTask, rng: np.random.Generator, canvas: int = CANVAS, obj: int = OBJ,
                          flaw_prob: float = 0.0) -> tuple[str, np.ndarray, str, np.ndarray]:
    """(round-1 plan, uint8 [canvas, canvas, 3] round-1 render, edited plan, edited render); with probability
    flaw_prob the edited plan (and its render) is flawed (`flawed_edit`). flaw_prob 0 draws nothing extra from
    rng, so examples are those of earlier versions."""
    first = sample_layout(task.source, rng, canvas, obj)
    second = edit_layout(task, first, rng, canvas, obj)
    if flaw_prob > 0 and rng.random() < flaw_prob:
        second = flawed_edit(task, first, second, rng, canvas, obj)
    return plan_text(first), render(first, canvas, obj), plan_text(second), render(second, canvas, obj)
