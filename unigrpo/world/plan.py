"""The reasoning format: a layout plan the text expert writes before the image.

Format: objects joined by "; ", each "<color> <shape> at <x>,<y>" with grid coordinates as plain
non-negative integers (no leading zeros), e.g. "red circle at 2,5; blue square at 6,1". An empty layout is
written "empty". The grammar is strict so that parse_plan(plan_text(layout)) == layout and every parsed
plan has one spelling; only whitespace around the whole text is forgiven. Coordinates are not checked
against a canvas here (the renderer clips what falls outside).
"""
from __future__ import annotations

import re

from unigrpo.world.layout import Layout, PlacedObject
from unigrpo.world.prompts import COLORS, SHAPES

EMPTY = "empty"
_ITEM = re.compile(rf"({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) at (0|[1-9][0-9]*),(0|[1-9][0-9]*)")


def plan_text(layout: Layout) -> str:
    if not layout:
        return EMPTY
    return "; ".join(f"{o.color} {o.shape} at {o.x},{o.y}" for o in layout)


def parse_plan(text: str) -> Layout | None:
    """The layout a plan states, or None when the text is not a well-formed plan."""
    text = text.strip()
    if text == EMPTY:
        return ()
    out = []
    for item in text.split("; "):
        m = _ITEM.fullmatch(item)
        if m is None:
            return None
        out.append(PlacedObject(m[2], m[1], int(m[3]), int(m[4])))
    return tuple(out)
