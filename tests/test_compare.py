"""`unigrpo compare`: its config, the same budget for every method, the claim statistics, the report, and one
miniature end-to-end run through the worker processes."""
import dataclasses
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest

from unigrpo_experiments.compare import train_overrides
from unigrpo_experiments.config import BASE, METHODS, CompareConfig, run_dir
from unigrpo_experiments.report import DISCUSSION, command_line, load_results, paired, verdict, write_results
from unigrpo.config import load_config, resolve_config_path
from unigrpo.trainer import TrainConfig
from unigrpo.world import CATEGORIES


@pytest.mark.parametrize("override,pattern", [
    ("methods=[unigrpo,dpo]", "methods\\[\\] must be one of .*got 'dpo'"),
    ("seeds=[]", "seeds must be a non-empty list"),
    ("seeds=[1,1]", "distinct"),
    ("cfg_scale=1.0", "cfg_scale must be > 1"),
    ("jobs=0", "jobs must be >= 1"),
    ("methods=[refl,refl]", "methods must be distinct"),
    ("overrides=[iterations=5]", "overrides may not set 'iterations'"),
    ("overrides=[method=grpo]", "overrides may not set 'method'"),
    ("betas=[0.01,-1]", "betas\\[\\] must be numbers > 0.*got -1"),
    ("betas=[0.01,0.01]", "betas must be distinct"),
])
def test_bad_compare_configs_name_the_value(override, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_config(CompareConfig, None, [override])


def test_every_method_gets_the_same_budget_and_only_its_own_overrides():
    cfg = CompareConfig(out="o", iterations=7, overrides=["prompts_per_iter=4"])
    for m, spec in METHODS.items():
        ov = train_overrides(cfg, m, 2)
        own = [o.format(cfg_scale=cfg.cfg_scale) for o in spec.overrides]
        assert ov[len(ov) - len(own):] == own
        shared = ov[:len(ov) - len(own)]
        assert shared == [f"base={cfg.base}", f"out={run_dir(cfg, m, 2)}", "iterations=7", "seed=2",
                          "checkpoint_every=2", "prompts_per_iter=4"]
    assert "rollout.cfg_scale=3.0" in train_overrides(cfg, "cfg_rollouts", 0)


def test_the_beta_sweep_runs_velocity_mse_at_each_beta_after_the_methods():
    cfg = CompareConfig(out="o", methods=["unigrpo", "reg_none"], betas=[0.15, 1.5e-5, 0.015])
    assert cfg.all_methods == ["unigrpo", "reg_none", "beta=1.5e-05", "beta=0.015", "beta=0.15"]
    ov = train_overrides(cfg, "beta=0.015", 1)
    assert ov[-2:] == ["loss.reg=mse", "loss.beta=0.015"] and f"out={run_dir(cfg, 'beta=0.015', 1)}" in ov
    tc = load_config(TrainConfig, resolve_config_path("tiny"), [o for o in ov if not o.startswith(("base=", "out="))])
    assert tc.loss.beta == 0.015 and tc.loss.reg == "mse"
    with pytest.raises(ValueError, match="unknown method 'beta0.1'"):
        train_overrides(cfg, "beta0.1", 0)


def test_report_holds_the_beta_sweep_table_and_plot(tmp_path):
    rng = np.random.default_rng(3)
    cfg = CompareConfig(out=str(tmp_path), seeds=[0, 1], methods=["reg_none"], betas=[0.01, 1.0], eval_samples=60)
    runs = {BASE: _fake(rng, 60, 0.3, [None]), "reg_none": _fake(rng, 60, 0.1, [0, 1]),
            "beta=0.01": _fake(rng, 60, 0.5, [0, 1]), "beta=1": _fake(rng, 60, 0.3, [0, 1])}
    for m, rs in runs.items():
        for r in rs:
            os.makedirs(run_dir(cfg, m, r["seed"]))
            with open(os.path.join(run_dir(cfg, m, r["seed"]), "result.json"), "w") as f:
                json.dump(r, f)
    text = open(write_results(cfg, grid=False)).read()
    assert os.path.getsize(os.path.join(tmp_path, "results", "beta_sweep.png")) > 1000
    row = next(line for line in text.splitlines() if line.startswith("| 0.01 |"))
    # strict − no regulariser, by hand: per prompt, each side's strict averaged over its two seeds
    a = np.mean([r["nocfg"]["strict"] for r in runs["beta=0.01"]], axis=0)
    b = np.mean([r["nocfg"]["strict"] for r in runs["reg_none"]], axis=0)
    d = a - b
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    assert f"{d.mean():+.3f} [{d.mean() - half:+.3f}, {d.mean() + half:+.3f}]" in row
    assert row.split("|")[2].strip() == "2" and "| 1.00× |" in row   # seeds; lit fraction equal to the base's


def _fake(rng, n, p_geneval, seeds):
    """Result dicts as run_one writes them, with 0/1 GenEval-style scores drawn at rate p_geneval."""
    cats = [CATEGORIES[i % len(CATEGORIES)] for i in range(n)]
    out = []
    for s in seeds:
        g = (rng.random(n) < p_geneval).astype(float)
        ev = {"categories": cats, "ta": list((g + rng.random(n)) / 2), "geneval": list(g), "strict": list(g * 0.5),
              "summary": {"overall": {"plan_valid": 1.0, "images": {"saturation": 0.1, "edge_energy": 0.05,
                                                                     "lit_fraction": 0.3}}}}
        out.append({"method": "m", "seed": s, "nocfg": ev, "cfg": ev, "velocity_drift": 0.01, "total_s": 1.0,
                    "train_s": 10.0 + s if s is not None else 0.0,
                    "train_config": {"iterations": 30, "prompts_per_iter": 8,
                                     "rollout": {"group_size": 8, "steps": 25, "cfg_scale": 1.0},
                                     "optim": {"epochs": 2, "minibatch": 32}}})
    return out


def test_paired_difference_and_verdicts():
    rng = np.random.default_rng(0)
    a, b = _fake(rng, 600, 0.8, [0, 1, 2]), _fake(rng, 600, 0.2, [0, 1, 2])
    p = paired(a, b, "geneval")
    assert p["diff"] == pytest.approx(0.6, abs=0.05) and p["ci"][0] > 0.5 and p["agree"] == p["pairs"] == 3
    assert verdict(p, +1) == "holds" and verdict(p, -1) == "reversed"
    same = paired(a, a, "geneval")
    assert same["diff"] == 0.0 and verdict(same, +1).startswith("not supported")
    # the base (seed None) against three seeds: every seed compares with it
    base = [dict(b[0], seed=None)]
    assert paired(a, base, "geneval")["pairs"] == 3
    # seeds pair by seed, not by position: A lacks seed 1
    p = paired([a[0], a[2]], b, "geneval")
    assert p["pairs"] == 2
    b_shifted = [dict(b[0], seed=2), dict(b[2], seed=0)]   # B's seeds 0 and 2 swapped: the pairing follows
    assert paired([a[0], a[2]], b_shifted, "geneval")["pairs"] == 2
    assert paired([a[0]], [b[1]], "geneval")["pairs"] == 0   # no common seed


def test_report_from_runs_keeps_the_discussion(tmp_path):
    rng = np.random.default_rng(1)
    cfg = CompareConfig(out=str(tmp_path), seeds=[0, 1], methods=["unigrpo", "flowgrpo_only"], eval_samples=60)
    runs = {BASE: _fake(rng, 60, 0.2, [None]), "unigrpo": _fake(rng, 60, 0.7, [0, 1]),
            "flowgrpo_only": _fake(rng, 60, 0.4, [0, 1])}
    for m, rs in runs.items():
        for r in rs:
            d = run_dir(cfg, m, r["seed"])
            os.makedirs(d)
            with open(os.path.join(d, "result.json"), "w") as f:
                json.dump(r, f)
            if m != BASE:
                with open(os.path.join(d, "metrics.jsonl"), "w") as f:
                    f.writelines(json.dumps({"step": i, "reward/mean": 0.1 * i}) + "\n" for i in range(8))
    assert list(load_results(cfg)) == [BASE, "unigrpo", "flowgrpo_only"]
    path = write_results(cfg, grid=False)
    text = open(path).read()
    for name in ("base (pre-trained)", "UniGRPO", "FlowGRPO only", "UniGRPO beats FlowGRPO only"):
        assert name in text
    for png in ("curves", "categories", "hacking"):
        assert os.path.getsize(os.path.join(tmp_path, "results", f"{png}.png")) > 1000
    mine = f"{DISCUSSION[0]}\nwhy the numbers differ\n{DISCUSSION[1]}"
    with open(path, "w") as f:
        f.write(text.replace(text[text.index(DISCUSSION[0]):text.index(DISCUSSION[1]) + len(DISCUSSION[1])], mine))
    assert mine in open(write_results(cfg, grid=False)).read()


def test_edit_comparison_tables_the_edit_kinds_and_counts_model_evaluations(tmp_path):
    """Episodes: the category tables are per edit kind, and the cost table counts R·N image evaluations per
    episode CFG-free and 2·R·N with CFG rollouts, beside the measured time ratio."""
    rng = np.random.default_rng(4)
    kinds = ["recolour", "move", "add", "remove"]
    cfg = CompareConfig(out=str(tmp_path), seeds=[0, 1], methods=["unigrpo", "cfg_rollouts"], eval_samples=40,
                        train_config="tiny_edit")
    runs = {BASE: _fake(rng, 40, 0.2, [None]), "unigrpo": _fake(rng, 40, 0.4, [0, 1]),
            "cfg_rollouts": _fake(rng, 40, 0.4, [0, 1])}
    for m, rs in runs.items():
        for r in rs:
            r.update(rounds=2, eval_data="shapes_edit")
            r["nocfg"]["categories"] = [kinds[i % 4] for i in range(40)]
            if m == "cfg_rollouts":
                r["train_config"]["rollout"]["cfg_scale"] = 3.0
                r["train_s"] *= 1.5
            os.makedirs(run_dir(cfg, m, r["seed"]))
            with open(os.path.join(run_dir(cfg, m, r["seed"]), "result.json"), "w") as f:
                json.dump(r, f)
    text = open(write_results(cfg, grid=False)).read()
    assert "| method | recolour | move | add | remove |" in text and "2-round editing episodes" in text
    assert "| UniGRPO | 2 | 25 | 50 | 10 | 1.00× |" in text
    assert "| UniGRPO, CFG rollouts | 2 | 25 | 100 | 16 | 1.50× |" in text
    # the same runs in a single-round comparison's folder: refused, naming what they were evaluated on
    with pytest.raises(ValueError, match=r"evaluated on 'shapes_edit' \(2 round\(s\)\).*evaluates on 'shapes' \(1\)"):
        load_results(dataclasses.replace(cfg, train_config="tiny"))


def test_runs_from_another_budget_are_refused(tmp_path):
    rng = np.random.default_rng(2)
    cfg = CompareConfig(out=str(tmp_path), seeds=[0], methods=["unigrpo"], iterations=30, eval_samples=60)
    for m, r in ((BASE, _fake(rng, 60, 0.2, [None])[0]), ("unigrpo", _fake(rng, 60, 0.5, [0])[0])):
        r["train_config"]["iterations"] = 20 if m != BASE else 30
        os.makedirs(run_dir(cfg, m, r["seed"]))
        with open(os.path.join(run_dir(cfg, m, r["seed"]), "result.json"), "w") as f:
            json.dump(r, f)
    with pytest.raises(ValueError, match="trained for 20 iterations, this comparison for 30"):
        load_results(cfg)
    with pytest.raises(ValueError, match="holds 60 held-out samples, this comparison evaluates 256"):
        load_results(CompareConfig(out=str(tmp_path), seeds=[0], methods=["unigrpo"]))


def test_report_without_runs_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `unigrpo compare` first"):
        write_results(CompareConfig(out=str(tmp_path)), grid=False)


def test_miniature_compare_end_to_end(tmp_path):
    """Base + two methods × one seed, one iteration each, through the worker processes; then rerunning skips
    every finished run."""
    args = [sys.executable, "-m", "unigrpo.cli", "compare", f"out={tmp_path}", "iterations=1", "seeds=[0]",
            "methods=[unigrpo,refl]", "jobs=2", "eval_samples=6", "eval_steps=2", "probe_samples=2",
            "overrides=[prompts_per_iter=1,rollout.group_size=2,optim.epochs=1,rollout.max_new_tokens=40,"
            "skip_zero_std=false]"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = load_results(CompareConfig(out=str(tmp_path), seeds=[0], methods=["unigrpo", "refl"], iterations=1,
                                     eval_samples=6))
    assert set(res) == {BASE, "unigrpo", "refl"}
    assert "cfg" in res[BASE][0] and "cfg" in res["unigrpo"][0] and "cfg" not in res["refl"][0]
    assert res[BASE][0]["velocity_drift"] == 0.0 and res["unigrpo"][0]["velocity_drift"] > 0
    assert os.path.getsize(os.path.join(tmp_path, "results", "samples.png")) > 1000
    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "every run is finished" in again.stdout


def test_intervals_are_over_prompts_not_over_seed_copies():
    """Seeds share the held-out prompts: three identical seeds carry no more evidence than one, so the
    interval must not narrow (treating 3 × n scores as independent would shrink it by √3)."""
    from unigrpo_experiments.report import pooled
    from unigrpo.evaluate import mean_ci

    r = _fake(np.random.default_rng(3), 120, 0.5, [0])[0]
    one, three = pooled([r], "ta"), pooled([dict(r, seed=s) for s in range(3)], "ta")
    assert three == one and one[1] == pytest.approx(mean_ci(np.asarray(r["nocfg"]["ta"])))


def test_the_bundled_beta_sweep_spans_three_orders_of_magnitude_on_a_hackable_reward():
    cfg = load_config(CompareConfig, resolve_config_path("beta_sweep"), [])
    assert len(cfg.betas) >= 4 and max(cfg.betas) / min(cfg.betas) >= 1e3 and "reg_none" in cfg.methods
    assert cfg.overrides == ["rewards=[shapes_ta]"] and len(cfg.seeds) == 3
    # the report's "Generated by" line reproduces this comparison
    again = load_config(CompareConfig, None, shlex.split(command_line(cfg, cfg.report_path)))
    assert (again.all_methods, again.overrides, again.seeds, again.out) == (cfg.all_methods, cfg.overrides, cfg.seeds,
                                                                           cfg.out)
