"""Prompt sources: the built-in shapes world, or the user's own `.jsonl`, `.txt` or `.csv` file.

A prompt is a `PromptRecord`: its text, its tag (the category that per-tag metrics and tables use) and its
metadata, every other field of its line, which reaches the rewards unchanged.

Formats:
- `.jsonl`: one JSON object a line with a `prompt` string; GenEval's `evaluation_metadata.jsonl` loads as it is
  (`tag`, `include` / `exclude` lists of {class, count, color, position} are metadata, `tag` the tag);
- `.txt`: one prompt a line (no metadata);
- `.csv`: a header with a `prompt` column; the other columns are metadata (strings), `tag` the tag.
Blank lines are skipped. Records without a tag get the tag "untagged". The shapes world's records carry its
prompts' GenEval metadata (unigrpo/world/geneval.py), so every reward sees the same kind of input.

Multi-round episodes (ALGORITHM.md §12): a `.jsonl` record with a `rounds` list makes an episode. Each entry
is {"instruction": the round's instruction, "prompt": what the round's image must show (its reward's
prompt), ...the round's reward metadata}; the record's own prompt and metadata are round 1's. Every record of
a source has the same number of rounds. "shapes_edit" is the built-in world's editing tasks
(unigrpo/world/edit.py) in that form, tagged with the edit kind.

Order (training): a file source visits its records in epochs; epoch e is the permutation
`default_rng([seed, e]).permutation(N)`, and iteration t takes the global positions [t·n, (t+1)·n). So the
prompts of an iteration are a function of (seed, t, n) alone and a resumed run sees exactly what an
uninterrupted one would. The shapes source keeps its original draw (n uniform picks from a 4096-prompt pool,
from the iteration's generator), so the demo's numbers do not change.

Every error names the file, the line and what was expected.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from unigrpo.io import write_text_atomic
from unigrpo.world import CATEGORIES, make_edit_tasks, make_prompts
from unigrpo.world.geneval import to_geneval

__all__ = ["PROMPT_SUFFIXES", "DataConfig", "PromptRecord", "PromptFileError", "load_prompt_file",
           "write_prompt_file", "FilePromptSource", "ShapesPromptSource", "ShapesEditSource", "build_prompt_source",
           "shapes_record", "edit_record", "episode_rounds", "instructions_of", "check_rounds",
           "shapes_records", "check_prompt_lengths", "tag_order"]

PROMPT_SUFFIXES = (".jsonl", ".txt", ".csv")
SHAPES = "shapes"
SHAPES_EDIT = "shapes_edit"
BUILTIN = (SHAPES, SHAPES_EDIT)
UNTAGGED = "untagged"


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names the file and the line."""


@dataclass
class DataConfig:
    train: str = SHAPES
    """training prompts: "shapes" (the built-in world's train split), "shapes_edit" (its two-round editing
    episodes) or a .jsonl / .txt / .csv file"""
    eval: str = SHAPES
    """held-out prompts: "shapes" / "shapes_edit" (the built-in world's held-out split) or a prompt file"""

    def __post_init__(self):
        for name in ("train", "eval"):
            _check_spec(f"data.{name}", getattr(self, name))


def _check_spec(key: str, spec: str) -> None:
    if spec not in BUILTIN and not spec.lower().endswith(PROMPT_SUFFIXES):
        raise ValueError(f"{key}={spec!r}: expected 'shapes', 'shapes_edit' or a prompt file ending in "
                         f"{', '.join(PROMPT_SUFFIXES)}")


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: text, tag, metadata (the line's other fields, unchanged) and where it came from."""
    text: str
    tag: str = UNTAGGED
    metadata: dict = field(default_factory=dict, hash=False, compare=True)
    where: str = ""
    """"file:line" (or "shapes:<split>") for error messages"""


# ------------------------------------------------------------------------------------------------- reading
def _record(text: Any, meta: dict, where: str) -> PromptRecord:
    if not isinstance(text, str):
        raise PromptFileError(f"{where}: 'prompt' must be a string, got {type(text).__name__} {text!r}")
    if not text.strip():
        raise PromptFileError(f"{where}: 'prompt' is empty")
    tag = meta.get("tag", UNTAGGED)
    if not isinstance(tag, str) or not tag:
        raise PromptFileError(f"{where}: 'tag' must be a non-empty string, got {tag!r}")
    return PromptRecord(text, tag, meta, where)


def _read_jsonl(path: str) -> list[PromptRecord]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise PromptFileError(f"{where}: bad JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(obj, dict):
                raise PromptFileError(f"{where}: expected a JSON object with a 'prompt' string, got "
                                      f"{type(obj).__name__}")
            if "prompt" not in obj:
                keys = ", ".join(map(repr, obj)) or "none"
                raise PromptFileError(f"{where}: no 'prompt' field (fields: {keys})")
            meta = {k: v for k, v in obj.items() if k != "prompt"}
            out.append(_record(obj["prompt"], meta, where))
    return out


def _read_txt(path: str) -> list[PromptRecord]:
    with open(path, encoding="utf-8") as f:
        return [PromptRecord(line.strip(), UNTAGGED, {}, f"{path}:{n}") for n, line in enumerate(f, 1) if line.strip()]


def _read_csv(path: str) -> list[PromptRecord]:
    out = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            return []
        if "prompt" not in reader.fieldnames:
            raise PromptFileError(f"{path}:1: the header has no 'prompt' column (columns: "
                                  f"{', '.join(map(repr, reader.fieldnames))})")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:
                raise PromptFileError(f"{where}: more fields than the header's {len(reader.fieldnames)}")
            if all(not (v or "").strip() for v in row.values()):
                continue
            meta = {k: v for k, v in row.items() if k != "prompt" and v is not None and not (k == "tag" and not v)}
            out.append(_record(row["prompt"] or "", meta, where))
    return out


def load_prompt_file(path: str) -> list[PromptRecord]:
    """The records of a .jsonl / .txt / .csv prompt file, in file order (PromptFileError on any problem)."""
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    readers = {".jsonl": _read_jsonl, ".txt": _read_txt, ".csv": _read_csv}
    if suffix not in readers:
        raise PromptFileError(f"{path}: unknown prompt file type {suffix!r}; expected one of {PROMPT_SUFFIXES}")
    if not os.path.isfile(path):
        raise PromptFileError(f"{path}: prompt file not found")
    try:
        records = readers[suffix](path)
    except UnicodeDecodeError as err:
        raise PromptFileError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not records:
        raise PromptFileError(f"{path}: the file holds no prompts")
    return records


def write_prompt_file(path: str, records: Iterable[PromptRecord]) -> str:
    """Write records as JSONL ({"prompt": text, **metadata} a line), atomically. Returns path."""
    lines = [json.dumps({"prompt": r.text, **r.metadata}) for r in records]
    return write_text_atomic(path, "\n".join(lines) + "\n")


def check_prompt_lengths(records: Sequence[PromptRecord], tokenizer, max_len: int) -> None:
    """Every prompt, and every later round's instruction, must leave room for reasoning in the model's text
    context of `max_len` tokens (each round's text holds max_len tokens, ALGORITHM.md §12)."""
    for r in records:
        for what, text in [("prompt", r.text)] + [("instruction", x) for x in instructions_of(r)]:
            n = len(tokenizer.encode_prompt(text))
            if n >= max_len:
                raise PromptFileError(f"{r.where}: the {what} is {n} tokens, longer than the model's text context "
                                      f"allows (max_text_len={max_len}, which includes the reasoning): "
                                      f"{text[:80]!r}{'...' if len(text) > 80 else ''}")


def tag_order(tags: Sequence[str]) -> list[str]:
    """The shapes categories in their fixed order, then other tags in order of first appearance."""
    seen = list(dict.fromkeys(tags))
    return [c for c in CATEGORIES if c in seen] + [t for t in seen if t not in CATEGORIES]


# ------------------------------------------------------------------------------------------------- sources
def shapes_records(split: str, n: int, seed: int) -> list[PromptRecord]:
    """n prompts of the shapes world's split as records (make_prompts' order), with GenEval metadata."""
    return [shapes_record(p, split) for p in make_prompts(split, n, seed=seed)]


def shapes_record(prompt, split: str = "") -> PromptRecord:
    """One shapes-world Prompt as a record: its text, its category as the tag, its GenEval metadata."""
    meta = to_geneval(prompt)
    del meta["prompt"]
    return PromptRecord(prompt.text, prompt.category, meta, f"shapes:{split}" if split else "")


class ShapesPromptSource:
    """The built-in world: a pool of 4096 prompts of the split, drawn uniformly each iteration."""

    name = SHAPES

    def __init__(self, split: str, seed: int, pool: int = 4096):
        self.records = shapes_records(split, pool, seed)
        self.split = split

    def batch(self, step: int, n: int, rng: np.random.Generator) -> list[PromptRecord]:
        """n records for iteration `step`, from the iteration's generator `rng` (seeded with (seed, step))."""
        return [self.records[int(i)] for i in rng.integers(0, len(self.records), n)]

    def eval_records(self, n: int, seed: int) -> list[PromptRecord]:
        return shapes_records(self.split, n, seed)


class FilePromptSource:
    """A prompt file: shuffled epochs from (seed, epoch) for training, file order for evaluation."""

    def __init__(self, path: str, seed: int = 0):
        self.name = path
        self.records = load_prompt_file(path)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def batch(self, step: int, n: int, rng: np.random.Generator | None = None) -> list[PromptRecord]:
        """The records at global positions [step·n, (step+1)·n) of the epoch sequence (module docstring);
        `rng` is not used (the order is a function of (seed, step, n) alone)."""
        N = len(self.records)
        out, perms = [], {}
        for i in range(step * n, (step + 1) * n):
            epoch = i // N
            if epoch not in perms:
                perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(N)
            out.append(self.records[int(perms[epoch][i % N])])
        return out

    def eval_records(self, n: int, seed: int = 0) -> list[PromptRecord]:
        """n records in file order, cycling when n exceeds the file (several images per prompt)."""
        return [self.records[i % len(self.records)] for i in range(n)]


class ShapesEditSource(ShapesPromptSource):
    """The built-in world's two-round editing episodes: a pool of 4096 tasks of the split (edit kinds in turn),
    drawn uniformly each iteration; tagged with the edit kind."""

    name = SHAPES_EDIT

    def __init__(self, split: str, seed: int, pool: int = 4096):
        self.records = [edit_record(t, split) for t in make_edit_tasks(split, pool, seed)]
        self.split = split

    def eval_records(self, n: int, seed: int) -> list[PromptRecord]:
        return [edit_record(t, self.split) for t in make_edit_tasks(self.split, n, seed)]


def edit_record(task, split: str = "") -> PromptRecord:
    """An EditTask as a two-round record: round 1 the source prompt (its GenEval metadata), round 2 the
    instruction and the target (its text and GenEval metadata); tag = the edit kind."""
    src = shapes_record(task.source, split)
    tgt = shapes_record(task.target, split)
    meta = {**src.metadata, "rounds": [{"instruction": task.instruction, "prompt": tgt.text, **tgt.metadata}]}
    return PromptRecord(src.text, task.kind, meta, src.where)


def episode_rounds(record: PromptRecord) -> list[PromptRecord]:
    """The rounds of a record as the records their rewards score against: round 1 is the record itself; round
    r ≥ 2 has the round's `prompt` as text and its other fields but `instruction` (`instructions_of`) as
    metadata. A record without `rounds` has one round. PromptFileError names the line."""
    rounds = record.metadata.get("rounds")
    if rounds is None:
        return [record]
    if not isinstance(rounds, list) or not rounds:
        raise PromptFileError(f"{record.where}: 'rounds' must be a non-empty list of {{instruction, prompt, ...}}, "
                              f"got {rounds!r}")
    out = [record]
    for k, rd in enumerate(rounds, 2):
        at = f"{record.where}: rounds[{k - 2}]"
        if not isinstance(rd, dict):
            raise PromptFileError(f"{at} must be an object {{instruction, prompt, ...}}, got {rd!r}")
        for key in ("instruction", "prompt"):
            if not isinstance(rd.get(key), str) or not rd[key].strip():
                raise PromptFileError(f"{at}: '{key}' must be a non-empty string, got {rd.get(key)!r}")
        meta = {k2: v for k2, v in rd.items() if k2 not in ("instruction", "prompt")}
        out.append(PromptRecord(rd["prompt"], record.tag, meta, f"{record.where} round {k}"))
    return out


def instructions_of(record: PromptRecord) -> list[str]:
    """The R − 1 later instructions of an episode record ([] for a single-round one)."""
    episode_rounds(record)   # validates
    return [rd["instruction"] for rd in record.metadata.get("rounds") or []]


def check_rounds(records: Sequence[PromptRecord]) -> int:
    """The number of rounds R every record of a source has (PromptFileError naming a record that differs)."""
    counts = [len(episode_rounds(r)) for r in records]
    for r, c in zip(records, counts):
        if c != counts[0]:
            raise PromptFileError(f"{r.where}: {c} rounds, but {records[0].where} has {counts[0]}; every record "
                                  "of a prompt source needs the same number of rounds")
    return counts[0] if counts else 1


def build_prompt_source(spec: str, split: str, seed: int):
    """"shapes" / "shapes_edit" → the world's split; a path → FilePromptSource."""
    _check_spec(f"data.{split}", spec)
    which = "train" if split == "train" else "heldout"
    if spec == SHAPES:
        return ShapesPromptSource(which, seed)
    if spec == SHAPES_EDIT:
        return ShapesEditSource(which, seed)
    return FilePromptSource(spec, seed)
