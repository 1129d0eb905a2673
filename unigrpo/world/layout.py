"""Layouts: where each object of a scene sits, sampled to satisfy a prompt or corrupted to fail it.

Decisions:
- Object centres sit in the middle of grid cells of CELL px (centre pixel = grid·CELL + CELL/2), so a short
  text plan states a layout exactly. With CELL = 8 and 6-px objects every object lies inside one 8×8 cell,
  which is exactly one image token of the tiny model (see docs/LOG.md: with objects spread over 2×2 tokens
  the tiny model never learned to draw them coherently). A centre is valid when its box is inside the canvas.
- Objects never touch: centres are at least `min_sep` cells apart in x or y (Chebyshev distance), which
  keeps boxes at least GAP px apart.
- A position relation is sampled with a clear margin: at least min_sep cells along its axis and no more
  across it than along it (the verifier asks for far less).
- corrupt_layout picks one flaw among those that apply to the prompt (missing object, wrong shape, wrong
  colour, wrong count, swapped positions, swapped colours) and keeps it only if the prompt's checks
  (checks.py) then fail; the flawed layout still obeys the no-touch rule, so it stays drawable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from unigrpo.world.checks import Found, along_across, check_objects
from unigrpo.world.prompts import COLORS, SHAPES, Prompt

CANVAS = 32  # canvas side, px
OBJ = 6      # object bounding-box side, px
CELL = 8     # grid cell, px (object centres at cell middles)
GAP = 2      # minimum empty px between two object boxes

_COLOR_NAMES = tuple(COLORS)
_MAX_TRIES = 1000


@dataclass(frozen=True)
class PlacedObject:
    """An object of a layout; x, y are the grid cell of its centre (pixel centre = center_px(grid))."""
    shape: str
    color: str
    x: int
    y: int


Layout = tuple[PlacedObject, ...]


def center_px(g: int) -> int:
    """Pixel coordinate of the centre of grid cell g."""
    return g * CELL + CELL // 2


def grid_range(canvas: int = CANVAS, obj: int = OBJ) -> tuple[int, int]:
    """Inclusive (lo, hi) of valid centre grid coordinates on either axis (the object's box inside the canvas)."""
    lo = math.ceil((obj // 2 - CELL // 2) / CELL)
    hi = (canvas - (obj - obj // 2) - CELL // 2) // CELL
    if lo > hi:
        raise ValueError(f"an object of {obj} px does not fit a {canvas} px canvas")
    return lo, hi


def min_sep(obj: int = OBJ) -> int:
    """Least centre distance, in cells on one axis, that keeps two boxes GAP px apart."""
    return math.ceil((obj + GAP) / CELL)


def relation_margin(obj: int = OBJ) -> float:
    """Pixels the verifier requires along a relation's axis (half an object)."""
    return obj / 2


def layout_checks(prompt: Prompt, layout: Layout, obj: int = OBJ) -> dict[str, bool]:
    """The prompt's checks applied to a layout directly (what a perfect render would score)."""
    found = [Found(o.shape, o.color, center_px(o.x), center_px(o.y)) for o in layout]
    return check_objects(prompt, found, relation_margin(obj))


def _free(x: int, y: int, placed, sep: int) -> bool:
    return all(max(abs(x - o.x), abs(y - o.y)) >= sep for o in placed)


def free_cells(placed, canvas: int = CANVAS, obj: int = OBJ) -> list[tuple[int, int]]:
    """Every valid grid cell (x, y) whose object would not touch any placed object, x-major."""
    lo, hi = grid_range(canvas, obj)
    sep = min_sep(obj)
    return [(x, y) for x in range(lo, hi + 1) for y in range(lo, hi + 1) if _free(x, y, placed, sep)]


def relation_is_clear(layout: Layout, relation: str, obj: int = OBJ) -> bool:
    """layout[0] <relation> layout[1] with sample_layout's margin: ≥ min_sep cells along, no more across."""
    a, b = layout[:2]
    along, across = along_across(b.x - a.x, b.y - a.y, relation)
    return along >= min_sep(obj) and abs(across) <= along


def _random_cell(rng: np.random.Generator, placed, canvas: int, obj: int) -> tuple[int, int] | None:
    """A uniformly random grid cell whose object would not touch any placed object, or None."""
    cells = free_cells(placed, canvas, obj)
    return cells[int(rng.integers(len(cells)))] if cells else None


def _scatter(rng, shapes_colors, canvas: int, obj: int) -> Layout:
    """Place objects one by one at random free cells; restart when a scene paints itself into a corner."""
    for _ in range(_MAX_TRIES):
        placed: list[PlacedObject] = []
        for shape, color in shapes_colors:
            cell = _random_cell(rng, placed, canvas, obj)
            if cell is None:
                break
            placed.append(PlacedObject(shape, color, *cell))
        else:
            return tuple(placed)
    raise ValueError(f"cannot place {len(shapes_colors)} objects of {obj} px on a {canvas} px canvas")


def _color(rng, color: str | None) -> str:
    return color if color is not None else _COLOR_NAMES[int(rng.integers(len(_COLOR_NAMES)))]


def sample_layout(prompt: Prompt, rng: np.random.Generator, canvas: int = CANVAS, obj: int = OBJ) -> Layout:
    """A random layout that satisfies every check of the prompt."""
    specs = prompt.objects * prompt.count if prompt.category == "counting" else prompt.objects
    items = [(s.shape, _color(rng, s.color)) for s in specs]
    if prompt.relation is None:
        return _scatter(rng, items, canvas, obj)
    for _ in range(_MAX_TRIES):
        layout = _scatter(rng, items, canvas, obj)
        if relation_is_clear(layout, prompt.relation, obj):
            return layout
    raise ValueError(f"cannot place {prompt.text!r} on a {canvas} px canvas with {obj} px objects")


def _other(rng, options, current):
    rest = [o for o in options if o != current]
    return rest[int(rng.integers(len(rest)))]


def _flaws(prompt: Prompt) -> list[str]:
    flaws = ["missing", "shape"]
    if any(s.color is not None for s in prompt.objects):
        flaws.append("color")
    if prompt.category == "counting":
        flaws.append("extra")
    if prompt.relation is not None:
        flaws.append("swap_positions")
    if prompt.category == "color_attr":
        flaws.append("swap_colors")
    return flaws


def _apply_flaw(flaw: str, layout: Layout, rng, canvas: int, obj: int) -> Layout | None:
    objs = list(layout)
    if not objs:
        return None
    i = int(rng.integers(len(objs)))
    if flaw == "missing":
        del objs[i]
    elif flaw == "shape":
        objs[i] = replace(objs[i], shape=_other(rng, SHAPES, objs[i].shape))
    elif flaw == "color":
        objs[i] = replace(objs[i], color=_other(rng, _COLOR_NAMES, objs[i].color))
    elif flaw == "extra":
        cell = _random_cell(rng, objs, canvas, obj)
        if cell is None:
            return None
        objs.append(replace(objs[i], x=cell[0], y=cell[1]))
    elif flaw == "swap_positions":
        a, b = objs[0], objs[1]
        objs[0], objs[1] = replace(a, x=b.x, y=b.y), replace(b, x=a.x, y=a.y)
    elif flaw == "swap_colors":
        a, b = objs[0], objs[1]
        objs[0], objs[1] = replace(a, color=b.color), replace(b, color=a.color)
    return tuple(objs)


def corrupt_layout(prompt: Prompt, layout: Layout, rng: np.random.Generator,
                   canvas: int = CANVAS, obj: int = OBJ) -> Layout:
    """A drawable layout that fails at least one of the prompt's checks (a flawed plan)."""
    flaws = _flaws(prompt)
    for _ in range(_MAX_TRIES):
        bad = _apply_flaw(flaws[int(rng.integers(len(flaws)))], layout, rng, canvas, obj)
        if bad is not None and not all(layout_checks(prompt, bad, obj).values()):
            return bad
    raise ValueError(f"cannot corrupt layout {layout} for {prompt.text!r}")
