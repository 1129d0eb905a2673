"""The shapes world: a synthetic, fully verifiable text-to-image world (GenEval-like).

prompts (language and splits) -> layout (where objects go) -> plan (the layout as reasoning text)
-> render (layout to pixels) -> verify (pixels back to a score, never looking at plan or layout).
"""
from unigrpo.world.checks import Found, check_objects
from unigrpo.world.data import pretrain_example
from unigrpo.world.layout import (CANVAS, CELL, GAP, OBJ, Layout, PlacedObject, corrupt_layout, grid_range,
                                  layout_checks, sample_layout)
from unigrpo.world.plan import parse_plan, plan_text
from unigrpo.world.prompts import (CATEGORIES, COLORS, RELATIONS, SHAPES, ObjectSpec, Prompt, all_prompts,
                                   make_prompts, split_prompts)
from unigrpo.world.render import render, to_uint8
from unigrpo.world.verify import VerifyResult, detect, verify

__all__ = [
    "CANVAS", "CATEGORIES", "CELL", "COLORS", "GAP", "OBJ", "RELATIONS", "SHAPES",
    "Found", "Layout", "ObjectSpec", "PlacedObject", "Prompt", "VerifyResult",
    "all_prompts", "check_objects", "corrupt_layout", "detect", "grid_range",
    "layout_checks", "make_prompts", "parse_plan", "plan_text", "pretrain_example", "render",
    "sample_layout", "split_prompts", "to_uint8", "verify",
]
