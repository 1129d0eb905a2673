"""The command line and the evaluation: bad configs stop with an error naming the value; `eval` and
`sample` run end to end on a small checkpoint the test writes; the 95% intervals are the textbook ones."""
import json
import os

import numpy as np
import pytest
import torch

from unigrpo.checkpoint import save_checkpoint
from unigrpo.data import DataConfig
from unigrpo.cli import main
from unigrpo.evaluate import format_table, mean_ci, score_changes, summarize, wilson
from unigrpo.model import preset
from unigrpo.model.build import build_bundle, load_bundle


@pytest.fixture
def small_checkpoint(tmp_path):
    torch.manual_seed(0)
    b = build_bundle(preset("tiny", hidden=32, heads=2, kv_heads=1, intermediate=64, layers=1, max_text_len=48))
    path = str(tmp_path / "ckpt")
    save_checkpoint(path, model_state=b.model.state_dict(), config=b.checkpoint_config())
    return path


@pytest.mark.parametrize("argv,pattern", [
    (["pretrain", "steps=0"], "pretrain.steps must be >= 1"),
    (["pretrain", "model=huge"], "unknown model preset 'huge'"),
    (["pretrain", "stepz=5"], "stepz"),
    (["train", "--config", "tiny", "rollout.group_size=1"], "group_size must be >= 2"),
    (["train", "--config", "nonexistent"], "'nonexistent' is neither a file nor a bundled config"),
    (["eval", "samples=abc"], "samples"),
])
def test_bad_configs_stop_with_a_named_error(argv, pattern, capsys):
    assert main(argv) == 2
    assert pattern in capsys.readouterr().err


def test_eval_writes_scores_and_grid(small_checkpoint, tmp_path, capsys):
    out = str(tmp_path / "ev")
    assert main(["eval", f"checkpoint={small_checkpoint}", "samples=7", "steps=2", "batch=4", f"out={out}"]) == 0
    table = capsys.readouterr().out
    assert "overall" in table and "single_object" in table and "parses as a layout plan" in table
    data = json.load(open(os.path.join(out, "eval.json")))
    assert len(data["samples"]) == 7 and data["summary"]["overall"]["n"] == 7
    assert os.path.getsize(os.path.join(out, "grid.png")) > 0


def test_oracle_reasoning_conditions_on_the_correct_plan(small_checkpoint, tmp_path, monkeypatch):
    """eval.reasoning=oracle: every reasoning is a plan whose own render passes the prompt's checks."""
    from _images import render_batch
    from unigrpo.evaluate import EvalConfig, evaluate
    from unigrpo.world import make_prompts, parse_plan, verify

    torch.manual_seed(0)
    bundle = build_bundle(preset("tiny", hidden=32, heads=2, kv_heads=1, intermediate=64, layers=1, max_text_len=96))
    r = evaluate(bundle, EvalConfig(samples=12, steps=2, batch=5, reasoning="oracle"), progress=False)
    layouts = [parse_plan(t) for t in r.reasoning]
    assert all(lay is not None for lay in layouts)
    # the oracle's plans are exact by construction, a random model's sampled reasoning almost never
    assert r.summary["overall"]["plan_exact"] == 1.0
    sampled = evaluate(bundle, EvalConfig(samples=12, steps=1, batch=12), progress=False)
    assert sampled.summary["overall"]["plan_exact"] == 0.0
    truth = verify(render_batch(layouts), make_prompts("heldout", 12, seed=1234))
    assert [p.text for p in make_prompts("heldout", 12, seed=1234)] == r.prompts
    assert truth.strict.tolist() == [1.0] * 12
    with pytest.raises(ValueError, match="eval.reasoning must be one of 'sampled', 'oracle'; got 'gold'"):
        EvalConfig(reasoning="gold")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a cat\n")
    with pytest.raises(ValueError, match="makes the context longer than max_text_len=48"):
        evaluate(load_bundle(small_checkpoint), EvalConfig(samples=2, steps=1, reasoning="oracle"), progress=False)
    with pytest.raises(ValueError, match="p.txt"):
        evaluate(bundle, EvalConfig(samples=1, steps=1, reasoning="oracle",
                                                           data=DataConfig(eval=str(prompts))), progress=False)
    # plans that parse but are flawed (every oracle plan corrupted) count as valid, never as exact
    import unigrpo.evaluate as ev
    real = ev.pretrain_example
    monkeypatch.setattr(ev, "pretrain_example", lambda p, rng, flaw_prob: real(p, rng, flaw_prob=1.0))
    flawed = evaluate(bundle, EvalConfig(samples=12, steps=1, batch=12, reasoning="oracle"), progress=False)
    assert flawed.summary["overall"]["plan_valid"] == 1.0 and flawed.summary["overall"]["plan_exact"] == 0.0


def test_sample_writes_png(small_checkpoint, tmp_path, capsys):
    png = str(tmp_path / "s.png")
    assert main(["sample", "--checkpoint", small_checkpoint, "--prompt", "a red circle", "--out", png,
                 "--steps", "2", "--n", "2"]) == 0
    assert os.path.getsize(png) > 0 and "reasoning:" in capsys.readouterr().out


def test_prompt_longer_than_the_context_names_it(small_checkpoint):
    from unigrpo.rollout.generate import sample

    b = load_bundle(small_checkpoint)
    with pytest.raises(ValueError, match="max_text_len=48"):
        sample(b.model, b.tokenizer, b.codec, ["x" * 60], num_steps=1)


def test_wrong_shape_checkpoint_names_the_tensor(small_checkpoint):
    state_path = os.path.join(small_checkpoint, "config.json")
    cfg = json.load(open(state_path))
    cfg["model"]["intermediate"] = 96  # the weights on disk are for 64
    json.dump(cfg, open(state_path, "w"))
    with pytest.raises(ValueError, match=r"gate_proj.weight: checkpoint \[64, 32\] vs model \[96, 32\]"):
        load_bundle(small_checkpoint)


def test_wilson_and_mean_intervals_match_closed_forms():
    # 0 successes of n: the Wilson upper bound is z²/(n + z²)
    lo, hi = wilson(0, 43)
    assert lo == 0 and hi == pytest.approx(1.96 ** 2 / (43 + 1.96 ** 2), rel=1e-12)
    lo, hi = wilson(50, 100)  # symmetric around 1/2
    assert lo + hi == pytest.approx(1.0, abs=1e-12) and hi - lo == pytest.approx(2 * 1.96 * 0.5 / np.sqrt(100 + 1.96 ** 2), rel=1e-12)
    x = np.random.default_rng(0).random(50)
    lo, hi = mean_ci(x)
    assert (hi - lo) / 2 == pytest.approx(1.96 * x.std(ddof=1) / np.sqrt(50), rel=1e-12)


def test_summarize_counts_each_category():
    cats = ["colors", "colors", "position"]
    s = summarize(cats, np.array([1.0, 0.5, 0.0]), np.array([1.0, 0.0, 0.0]))
    assert s["colors"]["n"] == 2 and s["colors"]["ta"] == 0.75 and s["overall"]["geneval"] == pytest.approx(1 / 3)


def test_strict_stands_beside_geneval_and_ta_in_every_row_and_in_the_change_line():
    cats = ["colors", "colors", "position", "position"]
    ta, gen, strict = np.array([1.0, 0.5, 0.5, 0.0]), np.array([1.0, 1.0, 0.0, 0.0]), np.array([1.0, 0.0, 0.0, 0.0])
    after = summarize(cats, ta, gen, strict)
    table = format_table(after).splitlines()
    assert table[0].split()[-3:] == ["TA-style", "GenEval-style", "strict"]
    colors = next(r for r in table if r.startswith("colors"))
    lo, hi = wilson(1, 2)
    assert colors.split()[-2:] == [f"[{lo:.3f},", f"{hi:.3f}]"] and "0.500" in colors.split()[-3]
    before = summarize(cats, ta * 0, gen * 0, strict * 0)
    line = score_changes(before, after)
    assert [part.split()[0] for part in line.split("; ")] == ["strict", "GenEval-style", "TA-style"]
    assert line.startswith("strict 0.000 [0.000, ") and "-> 0.250 [" in line and "(+0.250)" in line


def test_velocity_drift_is_zero_for_the_reference_and_grows_with_a_perturbation():
    import copy

    from unigrpo.evaluate import velocity_drift

    torch.manual_seed(0)
    b = build_bundle(preset("tiny", hidden=32, heads=2, kv_heads=1, intermediate=64, layers=1, max_text_len=96))
    ref = copy.deepcopy(b.model)
    assert velocity_drift(b.model, ref, b.tokenizer, b.codec, samples=4) == 0.0
    drifts = []
    for scale in (0.01, 0.1):
        moved = copy.deepcopy(ref)
        with torch.no_grad():
            moved.image_out.weight.add_(scale * torch.randn_like(moved.image_out.weight))
        drifts.append(velocity_drift(moved, ref, b.tokenizer, b.codec, samples=4))
        assert drifts[-1] == velocity_drift(ref, moved, b.tokenizer, b.codec, samples=4)   # symmetric
    assert 0 < drifts[0] < drifts[1]
