"""The prompt language of the shapes world: palette, shapes, categories and prompt sampling.

Decisions:
- Texts are short lowercase ASCII ("a red circle", "three squares", "a circle left of a triangle"): the
  model tokenises them byte by byte.
- Every category has a small, fully enumerated pool of prompts (`all_prompts`). Objects named in one
  prompt always have distinct shapes (and, in color_attr, distinct colours), so each check names one thing.
- Counting uses 2..4 objects (a count of one is single_object), like GenEval.
- Train/held-out split: colors (12 texts), position (24) and color_attr (72) are split by prompt text;
  the texts are ranked by a stable hash (sha256) and the first quarter is held out, so the split is fixed
  across runs and machines and both sides are never empty. single_object (3 texts), two_object (6) and
  counting (9) have too few texts to hold any out without starving training, so both splits share them;
  for those categories held-out only means fresh samples (layouts, noise), not unseen texts.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = {2: "two", 3: "three", 4: "four"}
SPLITS = ("train", "heldout")
SPLIT_BY_TEXT = ("colors", "position", "color_attr")
HELDOUT_FRACTION = 0.25


@dataclass(frozen=True)
class ObjectSpec:
    """One object a prompt asks for; color None means any colour."""
    shape: str
    color: str | None = None

    def describe(self) -> str:
        return self.shape if self.color is None else f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Prompt:
    """A prompt and its machine-readable spec; for position, objects[0] <relation> objects[1]."""
    text: str
    category: str
    objects: tuple[ObjectSpec, ...]
    count: int = 1
    relation: str | None = None


def _a(spec: ObjectSpec) -> str:
    return f"a {spec.describe()}"


@lru_cache(maxsize=None)
def all_prompts(category: str) -> tuple[Prompt, ...]:
    """Every prompt of a category, in a fixed order."""
    specs = [ObjectSpec(s) for s in SHAPES]
    pairs = [(a, b) for a in specs for b in specs if a != b]
    if category == "single_object":
        return tuple(Prompt(_a(s), category, (s,)) for s in specs)
    if category == "two_object":
        return tuple(Prompt(f"{_a(a)} and {_a(b)}", category, (a, b)) for a, b in pairs)
    if category == "counting":
        return tuple(Prompt(f"{word} {s.shape}s", category, (s,), count=n)
                     for s in specs for n, word in NUMBERS.items())
    if category == "colors":
        return tuple(Prompt(_a(ObjectSpec(s, c)), category, (ObjectSpec(s, c),)) for c in COLORS for s in SHAPES)
    if category == "position":
        return tuple(Prompt(f"{_a(a)} {r} {_a(b)}", category, (a, b), relation=r)
                     for a, b in pairs for r in RELATIONS)
    if category == "color_attr":
        colored = [ObjectSpec(s, c) for c in COLORS for s in SHAPES]
        return tuple(Prompt(f"{_a(a)} and {_a(b)}", category, (a, b))
                     for a in colored for b in colored if a.shape != b.shape and a.color != b.color)
    raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


@lru_cache(maxsize=None)
def split_prompts(category: str, split: str) -> tuple[Prompt, ...]:
    """The prompts of one category available to one split (see the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    pool = all_prompts(category)
    if category not in SPLIT_BY_TEXT:
        return pool
    ranked = sorted(pool, key=lambda p: (_stable_hash(p.text), p.text))
    n_held = max(1, round(HELDOUT_FRACTION * len(pool)))
    held = {p.text for p in ranked[:n_held]}
    return tuple(p for p in pool if (p.text in held) == (split == "heldout"))


def make_prompts(split: str, n: int, seed: int, categories=CATEGORIES) -> list[Prompt]:
    """n prompts for a split, categories cycled in order, texts drawn uniformly; deterministic in its args."""
    categories = tuple(categories)
    if not categories:
        raise ValueError("categories is empty")
    pools = [split_prompts(c, split) for c in categories]
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    out = []
    for i in range(n):
        pool = pools[i % len(pools)]
        out.append(pool[int(rng.integers(len(pool)))])
    return out
