"""Prompt sources: every file format and its errors, the epoch order, and the GenEval round trip with the shapes
world (export → load → the same prompts and the same scores)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from _images import render_batch
from unigrpo.data import (FilePromptSource, PromptFileError, build_prompt_source, check_prompt_lengths,
                          load_prompt_file, shapes_records)
from unigrpo.model.tokenizer import ByteTokenizer
from unigrpo.rewards.verifier import ShapesVerifierReward
from unigrpo.world import CATEGORIES, all_prompts, sample_layout
from unigrpo.world.geneval import from_geneval, to_geneval

# a few lines of GenEval's own evaluation_metadata.jsonl, as GenEval writes them (classes from its COCO list)
GENEVAL_LINES = [
    '{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}',
    '{"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}], '
    '"prompt": "a photo of two clocks"}',
    '{"tag": "position", "include": [{"class": "bear", "count": 1}, {"class": "bench", "count": 1, '
    '"position": ["left of", 0]}], "prompt": "a photo of a bench left of a bear"}',
]


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_geneval_file_loads_as_it_is(tmp_path):
    recs = load_prompt_file(_write(tmp_path, "evaluation_metadata.jsonl", "\n".join(GENEVAL_LINES) + "\n\n"))
    assert [r.text for r in recs] == ["a photo of a bench", "a photo of two clocks", "a photo of a bench left of a bear"]
    assert [r.tag for r in recs] == ["single_object", "counting", "position"]
    for r, line in zip(recs, GENEVAL_LINES):   # every other field reaches the reward unchanged
        want = json.loads(line)
        del want["prompt"]
        assert r.metadata == want
    assert recs[2].where.endswith("evaluation_metadata.jsonl:3")


def test_txt_and_csv(tmp_path):
    recs = load_prompt_file(_write(tmp_path, "p.txt", "a cat\n\n  a dog on a mat  \n"))
    assert [(r.text, r.tag, r.metadata) for r in recs] == [("a cat", "untagged", {}), ("a dog on a mat", "untagged", {})]
    recs = load_prompt_file(_write(tmp_path, "p.csv", 'prompt,tag,style\n"a cat, sitting",animals,photo\na car,,\n'))
    assert recs[0].text == "a cat, sitting" and recs[0].tag == "animals" and recs[0].metadata == {"tag": "animals",
                                                                                                  "style": "photo"}
    assert recs[1].where.endswith("p.csv:3")


@pytest.mark.parametrize("name, text, match", [
    ("e.jsonl", "", r"e.jsonl: the file holds no prompts"),
    ("e.txt", "\n  \n", r"e.txt: the file holds no prompts"),
    ("b.jsonl", '{"prompt": "ok"}\n{"prompt": "a", \n', r"b.jsonl:2: bad JSON"),
    ("n.jsonl", '{"prompt": "ok"}\n{"caption": "x", "tag": "t"}\n', r"n.jsonl:2: no 'prompt' field \(fields: 'caption', 'tag'\)"),
    ("l.jsonl", '["a prompt"]\n', r"l.jsonl:1: expected a JSON object"),
    ("s.jsonl", '{"prompt": 3}\n', r"s.jsonl:1: 'prompt' must be a string"),
    ("z.jsonl", '{"prompt": "  "}\n', r"z.jsonl:1: 'prompt' is empty"),
    ("t.jsonl", '{"prompt": "x", "tag": 5}\n', r"t.jsonl:1: 'tag' must be a non-empty string"),
    ("h.csv", "caption\nx\n", r"h.csv:1: the header has no 'prompt' column"),
    ("r.csv", "prompt,tag\nok,t\n,\n", None),
    ("w.csv", "prompt,tag\nok,t,extra\n", r"w.csv:2: more fields than the header"),
    ("x.yaml", "prompt: x\n", r"unknown prompt file type '.yaml'"),
])
def test_file_errors_name_file_line_and_problem(tmp_path, name, text, match):
    path = _write(tmp_path, name, text)
    if match is None:   # a blank csv row is skipped like a blank line
        assert [r.text for r in load_prompt_file(path)] == ["ok"]
        return
    with pytest.raises(PromptFileError, match=match):
        load_prompt_file(path)


def test_missing_file_and_bad_spec(tmp_path):
    with pytest.raises(PromptFileError, match="prompt file not found"):
        load_prompt_file(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match=r"data.train='prompts.parquet': expected 'shapes', 'shapes_edit' or a prompt file"):
        build_prompt_source("prompts.parquet", "train", 0)


def test_prompt_longer_than_the_context_names_the_line(tmp_path):
    path = _write(tmp_path, "long.jsonl", '{"prompt": "short"}\n{"prompt": "' + "x" * 300 + '"}\n')
    with pytest.raises(PromptFileError, match=r"long.jsonl:2: the prompt is \d+ tokens.*max_text_len=160"):
        check_prompt_lengths(load_prompt_file(path), ByteTokenizer(), 160)


def test_instruction_longer_than_the_context_names_the_line(tmp_path):
    lines = [json.dumps({"prompt": "a red circle", "rounds": [{"instruction": ins, "prompt": "a blue circle"}]})
             for ins in ("make it blue", "y" * 300)]
    path = _write(tmp_path, "edit.jsonl", "\n".join(lines) + "\n")
    check_prompt_lengths(load_prompt_file(path)[:1], ByteTokenizer(), 160)
    with pytest.raises(PromptFileError, match=r"edit.jsonl:2: the instruction is \d+ tokens.*max_text_len=160"):
        check_prompt_lengths(load_prompt_file(path), ByteTokenizer(), 160)


def test_epochs_are_permutations_and_a_function_of_seed_and_step(tmp_path):
    path = _write(tmp_path, "p.txt", "\n".join(f"prompt {i}" for i in range(10)) + "\n")
    src = FilePromptSource(path, seed=5)
    seen = [r.text for t in range(5) for r in src.batch(t, 4, np.random.default_rng(t))]   # 20 = two epochs
    assert sorted(seen[:10]) == sorted(seen[10:]) == sorted(f"prompt {i}" for i in range(10))
    assert seen[:10] != seen[10:]                              # each epoch its own order
    again = FilePromptSource(path, seed=5)                     # a resumed run: step 3 alone, fresh object
    assert [r.text for r in again.batch(3, 4)] == seen[12:16]
    assert [r.text for r in FilePromptSource(path, seed=6).batch(0, 10)] != seen[:10]


def test_geneval_metadata_of_every_shapes_prompt_round_trips():
    for c in CATEGORIES:
        for p in all_prompts(c):
            assert from_geneval("any text", to_geneval(p)) == type(p)("any text", *list(vars(p).values())[1:])


@pytest.mark.parametrize("meta, match", [
    ({"tag": "food", "include": [{"class": "circle", "count": 1}]}, "tag='food'"),
    ({"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "purple"}]}, "'purple'"),
    ({"tag": "counting", "include": [{"class": "circle", "count": 1}]}, "at least 2"),
    ({"tag": "position", "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1,
                                                                       "position": ["behind", 0]}]}, "relation"),
    ({"tag": "two_object", "include": [{"class": "circle", "count": 1}]}, "two include items"),
    ({"tag": "single_object", "include": [{"class": "circle", "count": 1, "size": 3}]}, "unknown fields"),
])
def test_non_shapes_metadata_is_refused_with_the_field(meta, match):
    with pytest.raises(ValueError, match=match):
        from_geneval("x", meta)


def test_export_load_round_trip_same_prompts_same_scores(tmp_path):
    """`unigrpo export-prompts` → load the JSONL → the same prompts and the same verifier scores."""
    out = tmp_path / "heldout.jsonl"
    subprocess.run([sys.executable, "-m", "unigrpo", "export-prompts", "--split", "heldout", "--n", "40",
                    "--seed", "9", f"out={out}"], check=True, capture_output=True)
    loaded = load_prompt_file(str(out))
    direct = shapes_records("heldout", 40, 9)
    assert [(r.text, r.tag, r.metadata) for r in loaded] == [(r.text, r.tag, r.metadata) for r in direct]
    rng = np.random.default_rng(0)
    from unigrpo.world import make_prompts

    prompts = make_prompts("heldout", 40, seed=9)
    layouts = [sample_layout(p, rng) for p in prompts]
    images = render_batch(layouts)
    images[::3] = -1.0                        # some blank: scores are not all 1
    for kind in ("ta", "geneval", "ta_exact"):
        fn = ShapesVerifierReward(kind)
        from unigrpo.world import verify
        res = verify(images, prompts)          # the world's verifier on its own Prompt objects
        want = {"ta": res.ta, "geneval": res.geneval}.get(kind)
        got = fn(images, [r.text for r in loaded], [r.metadata for r in loaded])
        if want is not None:
            assert got.tolist() == want.tolist()
        assert got.tolist() == fn(images, [r.text for r in direct], [r.metadata for r in direct]).tolist()
    rephrased = [r.__class__(f"a photo of {r.text}", r.tag, r.metadata, r.where) for r in loaded]
    assert fn(images, [r.text for r in rephrased], [r.metadata for r in rephrased]).tolist() == got.tolist()
