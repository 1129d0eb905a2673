"""Supervised pre-training examples: a plan and the image that follows it.

Decision: with probability flaw_prob the plan is deliberately flawed (corrupt_layout), and the image still
follows the plan, so the image expert learns to draw what the plan says and the reward can credit a good
plan rather than an image that ignored a bad one.
"""
from __future__ import annotations

import numpy as np

from unigrpo.world.layout import CANVAS, OBJ, corrupt_layout, sample_layout
from unigrpo.world.plan import plan_text
from unigrpo.world.prompts import Prompt
from unigrpo.world.render import render


def pretrain_example(prompt: Prompt, rng: np.random.Generator, flaw_prob: float,
                     canvas: int = CANVAS, obj: int = OBJ) -> tuple[str, np.ndarray]:
    """(plan text, uint8 [canvas, canvas, 3] render of that plan)."""
    layout = sample_layout(prompt, rng, canvas, obj)
    if rng.random() < flaw_prob:
        layout = corrupt_layout(prompt, layout, rng, canvas, obj)
    return plan_text(layout), render(layout, canvas, obj)
