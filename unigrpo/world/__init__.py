"""The shapes world: a synthetic, fully verifiable text-to-image world (GenEval-like).

prompts (language and splits) -> layout (where objects go) -> plan (the layout as reasoning text)
-> render (layout to pixels) -> verify (pixels back to a score, never looking at plan or layout);
edit: round-2 tasks (instruction + composed target prompt) for multi-round episodes.
"""
from unigrpo.world.checks import Found, check_objects
from unigrpo.world.data import pretrain_example
from unigrpo.world.edit import (EDIT_KINDS, EditTask, all_edits, edit_layout, edit_pretrain_example, make_edit_tasks,
                                split_edits, verify_edit, verify_edit_plan, verify_plans)
from unigrpo.world.layout import (CANVAS, CELL, GAP, OBJ, Layout, PlacedObject, corrupt_layout, grid_range,
                                  layout_checks, sample_layout)
from unigrpo.world.plan import parse_plan, plan_text
from unigrpo.world.prompts import (CATEGORIES, COLORS, RELATIONS, SHAPES, ObjectSpec, Prompt, all_prompts,
                                   make_prompts, split_prompts)
from unigrpo.world.render import render, to_uint8
from unigrpo.world.verify import VerifyResult, detect, verify

__all__ = [
    "CANVAS", "CATEGORIES", "CELL", "COLORS", "EDIT_KINDS", "GAP", "OBJ", "RELATIONS", "SHAPES",
    "EditTask", "Found", "Layout", "ObjectSpec", "PlacedObject", "Prompt", "VerifyResult",
    "all_edits", "all_prompts", "check_objects", "corrupt_layout", "detect", "edit_layout",
    "edit_pretrain_example", "grid_range",
    "layout_checks", "make_edit_tasks", "make_prompts", "parse_plan", "plan_text", "pretrain_example", "render",
    "sample_layout", "split_edits", "split_prompts", "to_uint8", "verify", "verify_edit", "verify_edit_plan", "verify_plans",
]
