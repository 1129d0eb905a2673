"""The shapes world's prompts in GenEval's metadata format, both ways.

GenEval's `evaluation_metadata.jsonl` holds one object a line: `prompt` (the text), `tag` (the category) and
`include` (and for counting `exclude`), lists of `{class, count[, color][, position]}`. Per category:
- single_object / two_object: one include per object, count 1;
- counting: include [{class, count: n}], exclude [{class, count: n + 1}] ("exactly n");
- colors: include [{class, count: 1, color}];
- color_attr: one include per object with its colour;
- position: include [B, A] with A's `position: [relation, 0]` ("A <relation> the object at index 0"),
  which is how GenEval writes "a photo of an A left of a B".

`to_geneval` writes that format for a shapes Prompt; `from_geneval` reads it back into a Prompt whatever the
text says ("a photo of two red circles" is as good as "two circles"), and refuses metadata that names anything
the world does not have (another class, colour, relation or tag), with an error that says which field.
"""
from __future__ import annotations

from typing import Any, Mapping

from unigrpo.world.prompts import CATEGORIES, COLORS, RELATIONS, SHAPES, ObjectSpec, Prompt

__all__ = ["from_geneval", "to_geneval", "is_shapes_metadata"]


def _item(spec: ObjectSpec, count: int = 1) -> dict:
    d: dict[str, Any] = {"class": spec.shape, "count": count}
    if spec.color is not None:
        d["color"] = spec.color
    return d


def to_geneval(prompt: Prompt) -> dict:
    """A shapes Prompt as a GenEval metadata object (with `prompt` and `tag`)."""
    cat, objs = prompt.category, prompt.objects
    if cat == "counting":
        meta = {"include": [_item(objs[0], prompt.count)], "exclude": [_item(objs[0], prompt.count + 1)]}
    elif cat == "position":
        a, b = objs
        meta = {"include": [_item(b), {**_item(a), "position": [prompt.relation, 0]}]}
    else:
        meta = {"include": [_item(o) for o in objs]}
    return {"tag": cat, **meta, "prompt": prompt.text}


def is_shapes_metadata(meta: Mapping) -> bool:
    """True when `from_geneval` can read the metadata (it names only this world's tags, shapes and colours)."""
    try:
        from_geneval("", meta)
    except ValueError:
        return False
    return True


def _spec(item: Any, where: str) -> tuple[ObjectSpec, int]:
    if not isinstance(item, Mapping):
        raise ValueError(f"{where} must be an object {{class, count, ...}}, got {item!r}")
    unknown = set(item) - {"class", "count", "color", "position"}
    if unknown:
        raise ValueError(f"{where} has unknown fields {sorted(unknown)}; expected class, count, color, position")
    cls = item.get("class")
    if cls not in SHAPES:
        raise ValueError(f"{where}.class={cls!r} is not a shape of this world; expected one of {list(SHAPES)}")
    color = item.get("color")
    if color is not None and color not in COLORS:
        raise ValueError(f"{where}.color={color!r} is not a colour of this world; expected one of {list(COLORS)}")
    count = item.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"{where}.count={count!r} must be an integer >= 1")
    return ObjectSpec(cls, color), count


def from_geneval(text: str, meta: Mapping) -> Prompt:
    """The shapes Prompt that GenEval metadata `meta` describes (its `tag` is the category); ValueError naming
    the field when the metadata is not about this world."""
    tag = meta.get("tag")
    if tag not in CATEGORIES:
        raise ValueError(f"tag={tag!r} is not a shapes-world category; expected one of {list(CATEGORIES)}")
    include = meta.get("include")
    if not isinstance(include, list) or not include:
        raise ValueError(f"include must be a non-empty list of {{class, count, ...}}, got {include!r}")
    specs = [_spec(x, f"include[{i}]") for i, x in enumerate(include)]
    exclude = meta.get("exclude", [])
    if not isinstance(exclude, list):
        raise ValueError(f"exclude must be a list, got {exclude!r}")
    ex = [_spec(x, f"exclude[{i}]") for i, x in enumerate(exclude)]
    positions = [x.get("position") for x in include]

    def need(cond: bool, what: str):
        if not cond:
            raise ValueError(f"tag {tag!r} expects {what}; got include={include!r}"
                             + (f", exclude={exclude!r}" if exclude else ""))

    if tag != "position":
        need(all(p is None for p in positions), "no position fields")
    if tag != "counting":
        need(not ex, "no exclude list")
        need(all(c == 1 for _, c in specs), "count 1 for every object")
    colored = [s.color is not None for s, _ in specs]
    if tag in ("single_object", "two_object", "counting", "position"):
        need(not any(colored), "no colours")
    if tag == "single_object":
        need(len(specs) == 1, "one include item")
        return Prompt(text, tag, (specs[0][0],))
    if tag == "counting":
        need(len(specs) == 1, "one include item")
        spec, n = specs[0]
        need(n >= 2, "a count of at least 2 (a count of one is single_object)")
        need(all(e.shape == spec.shape and c == n + 1 for e, c in ex), f"exclude [{{class, count: {n + 1}}}] or none")
        return Prompt(text, tag, (spec,), count=n)
    if tag == "colors":
        need(len(specs) == 1 and colored[0], "one include item with a color")
        return Prompt(text, tag, (specs[0][0],))
    need(len(specs) == 2, "two include items")
    a, b = specs[0][0], specs[1][0]
    need(a.shape != b.shape, "two different shapes")
    if tag == "two_object":
        return Prompt(text, tag, (a, b))
    if tag == "color_attr":
        need(all(colored) and a.color != b.color, "two items with different colors")
        return Prompt(text, tag, (a, b))
    # position: include [B, A{position: [relation, 0]}] means "A <relation> B"
    pos = positions[1]
    need(positions[0] is None and isinstance(pos, list) and len(pos) == 2 and pos[1] == 0,
         "the second item to carry position: [relation, 0]")
    need(pos[0] in RELATIONS, f"a relation in {list(RELATIONS)}")
    return Prompt(text, tag, (b, a), relation=pos[0])
