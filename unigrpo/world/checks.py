"""The named checks of each prompt category, scored over a list of found objects.

One implementation serves both the image verifier (objects found by segmentation) and layouts (objects
placed by plan), so a flawed plan is flawed by exactly the rule the reward applies.

Checks per category (each a bool; TA score = fraction passed, GenEval score = all passed):
- single_object: "<shape> present" (presence only, as in GenEval).
- two_object: "<shape1> present", "<shape2> present".
- counting: "<shape> present"; "exactly n <shape>s"; "only <shape>s" (at least one, and no object of any
  other shape).
- colors: "<shape> present" (any colour); "<color> <shape> present".
- position: "<A> present", "<B> present", "<A> <relation> <B>": true when both are present and every
  (A, B) pair of instances satisfies the relation between centroids: the offset along the relation's axis
  is at least `margin` px in the right direction and at least half the offset across it (within ~63 deg).
- color_attr: "<color1> <shape1> present", "<color2> <shape2> present".
Unclassified components never count as objects. Every check is false on an empty list of objects.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from unigrpo.world.prompts import ObjectSpec, Prompt


@dataclass(frozen=True)
class Found:
    """An object seen in an image or placed in a layout; x, y are its centroid in pixels (y down)."""
    shape: str
    color: str
    x: float
    y: float
    box: tuple[int, int, int, int] | None = field(default=None, compare=False)
    """pixel bounding box (x0, y0, x1, y1), inclusive, of an object seen in an image; None for a layout's"""


def _matches(obj: Found, spec: ObjectSpec) -> bool:
    return obj.shape == spec.shape and (spec.color is None or obj.color == spec.color)


def _presence(objects: list[Found], specs) -> dict[str, bool]:
    """One check per distinct spec: at least as many matches as the prompt names it."""
    return {f"{s.describe()} present": sum(_matches(o, s) for o in objects) >= k
            for s, k in Counter(specs).items()}


def along_across(dx: float, dy: float, relation: str) -> tuple[float, float]:
    """Offset b - a split into (along the relation's axis, positive when it holds; across it)."""
    return {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]


def relation_holds(a: Found, b: Found, relation: str, margin: float) -> bool:
    """a <relation> b, judged on centroids with a margin in pixels."""
    along, across = along_across(b.x - a.x, b.y - a.y, relation)
    return along >= margin and along >= abs(across) / 2


def check_objects(prompt: Prompt, objects: list[Found], margin: float) -> dict[str, bool]:
    """The prompt's named checks over the found objects; margin (px) is the position-relation margin."""
    objects = [o for o in objects if o.shape != "unknown"]
    cat, specs = prompt.category, prompt.objects
    if cat in ("single_object", "two_object", "color_attr"):
        return _presence(objects, specs)
    if cat == "counting":
        shape = specs[0].shape
        n = sum(o.shape == shape for o in objects)
        return {f"{shape} present": n >= 1, f"exactly {prompt.count} {shape}s": n == prompt.count,
                f"only {shape}s": n >= 1 and n == len(objects)}
    if cat == "colors":
        return {**_presence(objects, [ObjectSpec(specs[0].shape)]), **_presence(objects, specs)}
    if cat == "position":
        a_spec, b_spec = specs
        checks = _presence(objects, specs)
        a_objs = [o for o in objects if _matches(o, a_spec)]
        b_objs = [o for o in objects if _matches(o, b_spec)]
        ok = bool(a_objs) and bool(b_objs) and all(
            relation_holds(a, b, prompt.relation, margin) for a in a_objs for b in b_objs)
        checks[f"{a_spec.describe()} {prompt.relation} {b_spec.describe()}"] = ok
        return checks
    raise ValueError(f"unknown category {cat!r}")
