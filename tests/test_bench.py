"""The bench harness end to end on CPU at its --quick shapes (a smoke test: CPU figures are no claims).

- `flow step --quick` writes the JSON / markdown / PNG results with rows for the torch providers (eager and
  torch.compile for the ops; torch for the whole step), positive times and throughputs, and the ceilings.
- A deliberately wrong provider, injected through the documented test hook `bench.checks.TEST_PROVIDERS`
  (no library code is touched), fails its reference check: the run exits 1 and the row says why.
- Usage errors exit 2; `python -m bench --list` and `unigrpo bench --list` reach the same harness.
Runs main() in-process (one torch import); the torch.compile provider's first compile dominates the time.
"""
import json
import os
import subprocess
import sys

import pytest

from unigrpo_bench import checks, context, environment, harness, reporting, timing
from unigrpo_kernels.reference import flow as ref

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(out_dir):
    files = sorted(os.listdir(out_dir))
    js = [f for f in files if f.endswith(".json")]
    assert len(js) == 1, files
    stem = js[0][:-5]
    assert stem + ".md" in files
    with open(os.path.join(out_dir, js[0])) as f:
        return json.load(f), open(os.path.join(out_dir, stem + ".md")).read(), files


def test_flow_and_step_quick_write_results(tmp_path):
    rc = harness.main(["flow", "step", "--quick", "--out", str(tmp_path)])
    assert rc == 0
    res, md, files = _load(tmp_path)
    assert res["device_kind"] == "cpu" and res["suites"] == ["flow", "step"]
    assert res["ceilings"]["copy"]["value"] > 0 and res["ceilings"]["matmul"]["value"] > 0
    for key in ("torch", "triton", "commit", "device", "python"):
        assert key in res["environment"]
    rows = res["rows"]
    assert all(r["ok"] for r in rows)
    assert set(rows[0]) == set(context.ROW_FIELDS)
    for op, modes in (("sde_step", ("fwd",)), ("flow_grpo_loss", ("fwd", "bwd", "full"))):
        for prov in ("torch", "torch.compile"):
            for mode in modes:
                got = [r for r in rows if (r["suite"], r["op"], r["provider"], r["mode"]) == ("flow", op, prov, mode)]
                assert len(got) == 1, (op, prov, mode)
                r = got[0]
                assert 0 < r["ms_p20"] <= r["ms_p50"] <= r["ms_p80"]
                assert r["unit"] == "GB/s" and r["value"] > 0 and r["ceiling_frac"] > 0
                assert r["speedup_vs_torch"] > 0 and r["speedup_vs_compile"] > 0
                assert r["check_ratio"] <= 1.0
                assert r["kernel_ms"] is None          # no device timeline on CPU
    shapes = sorted({r["shape"] for r in rows if r["suite"] == "step"})
    assert len(shapes) == 2 and sum(" R=2 " in x for x in shapes) == 1, shapes   # one round and two
    for shape in shapes:
        step = {r["mode"]: r for r in rows if r["suite"] == "step" and r["provider"] == "torch" and r["shape"] == shape}
        assert set(step) == {"iteration", "rollout_text", "rollout_image", "reward", "train"}
        assert all(r["ms_p50"] > 0 for r in step.values())
        it = step["iteration"]
        assert it["unit"] == "TFLOP/s" and it["value"] > 0 and it["extra"]["samples/s"] > 0
        assert it["extra"]["tokens/s"] > 0 and it["peak_mem_mib"] > 0
    assert "| sde_step | torch.compile | fwd |" in md and "CPU figures" in md
    assert any(f.endswith("-flow.png") for f in files) and any(f.endswith("-step.png") for f in files)


def test_wrong_provider_fails_the_run(tmp_path, monkeypatch):
    def wrong_sde_step(x_BD, v_BD, **kw):  # the reference, off by 0.1% in x'
        x_next, logp = ref.sde_step(x_BD, v_BD, **kw)
        return x_next * 1.001, logp

    monkeypatch.setitem(checks.TEST_PROVIDERS, "sde_step", {"wrong": wrong_sde_step})
    rc = harness.main(["flow", "--quick", "--providers", "torch", "--out", str(tmp_path)])
    assert rc == 1
    res, md, _ = _load(tmp_path)
    bad = [r for r in res["rows"] if r["provider"] == "wrong"]
    assert len(bad) == 1 and not bad[0]["ok"] and bad[0]["ms_p50"] is None
    assert "x_next" in bad[0]["note"] and bad[0]["check_ratio"] > 1
    assert all(r["ok"] for r in res["rows"] if r["provider"] == "torch")
    assert "**FAIL**" in md


def test_usage_errors_and_entry_points(tmp_path, capsys):
    assert harness.main(["no-such-suite", "--out", str(tmp_path)]) == 2
    assert "unknown bench suite" in capsys.readouterr().err
    from unigrpo.cli import main as cli_main

    assert cli_main(["bench", "--list"]) == 0
    listed = capsys.readouterr().out
    assert "flow:" in listed and "step:" in listed and "sde_step B=8 D=3072" in listed
    p = subprocess.run([sys.executable, "-m", "bench", "--list"], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr
    assert "flow:" in p.stdout


@pytest.mark.parametrize("name", ["cpu", "cuda"])
def test_device_slug(name):
    import torch

    env = {"device": "NVIDIA H100 80GB HBM3", "cpu": "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"}
    slug = environment.device_slug(env, torch.device(name))
    assert slug == ("nvidia-h100-80gb-hbm3" if name == "cuda" else "cpu-intel-xeon-platinum-8481c")


def test_token_quick_checks_and_times_the_torch_providers(tmp_path):
    rc = harness.main(["token", "--quick", "--out", str(tmp_path)])
    assert rc == 0
    res, md, _ = _load(tmp_path)
    rows = [r for r in res["rows"] if r["suite"] == "token"]
    assert rows and all(r["ok"] for r in rows)
    provs = {r["provider"] for r in rows}
    assert {"torch", "torch.compile"} <= provs
    for r in rows:
        assert 0 < r["ms_p20"] <= r["ms_p50"] <= r["ms_p80"] and r["unit"] == "TFLOP/s" and r["value"] > 0
    assert "token_logprobs" in md
    ops = {r["op"] for r in rows}
    assert {"linear_text_grpo_loss", "linear_text_grpo_loss[gspo]", "linear_text_grpo_loss[dapo]"} <= ops


def test_attention_quick_checks_split_against_dense_sdpa(tmp_path):
    """The attention suite at its CPU --quick shapes: split is checked against the dense-mask SDPA reference
    and timed; the causal yardstick and the per-batch build rows exist; the FLOP count's useful pairs equal
    the dense mask's visible pairs between real tokens."""
    import torch

    from unigrpo_bench.suites import attention as suite
    from unigrpo.model.layout import PAD

    rc = harness.main(["attention", "--quick", "--providers", "torch,split", "--out", str(tmp_path)])
    assert rc == 0
    res, md, _ = _load(tmp_path)
    rows = [r for r in res["rows"] if r["suite"] == "attention"]
    assert rows and all(r["ok"] for r in rows)
    packed = {(r["provider"], r["mode"]) for r in rows if r["op"] == "packed_attention"}
    assert packed == {(p, m) for p in ("torch", "split") for m in ("fwd", "bwd", "full")}
    for r in rows:
        if r["op"] in ("packed_attention", "causal_attention"):
            assert r["unit"] == "TFLOP/s" and r["value"] > 0 and 0 < r["ms_p20"] <= r["ms_p50"] <= r["ms_p80"]
    assert {r["provider"] for r in rows if r["op"] == "packed_attention_inputs"} == {"torch", "split"}
    assert any(r["op"] == "causal_attention" for r in rows) and "packed_attention" in md
    assert any(r["op"] == "packed_attention" and r["shape"].startswith("rounds:") for r in rows)
    for spec in suite.shapes(context.Context(device=torch.device("cpu"), quick=True)):
        lay = suite.build_layout(spec["rows"], "cpu")
        real = lay.kind_BS != PAD
        visible = lay.dense_mask()[:, 0] & real[:, :, None] & real[:, None, :]
        pairs = suite.useful_pairs(lay)
        assert pairs == int(visible.sum())
        L = suite.causal_length(pairs)
        assert abs(L * (L + 1) // 2 - pairs) <= L


def test_quick_shrinks_the_gpu_shapes():
    """On a CUDA device --quick must fit a short lease: the token and attention suites run fewer and smaller
    GPU cases (the shapes are pure functions of the context: no GPU needed to read them)."""
    import torch

    from unigrpo_bench.suites import attention, token

    full, quick = (context.Context(device=torch.device("cuda"), quick=q) for q in (False, True))
    tv = lambda cases: sum(B * L * H * V for B, L, H, V, _ in cases)  # noqa: E731 - the GEMM work, ∝ T·H·V
    assert token.shapes(full)[0][2:4] == (3584, 152_064)          # the paper's model in the full run
    assert len(token.shapes(quick)) < len(token.shapes(full)) and tv(token.shapes(quick)) * 4 < tv(token.shapes(full))
    toks = lambda specs: sum(int((attention.build_layout(s["rows"], "cpu").kind_BS >= 0).sum())  # noqa: E731
                             for s in specs)   # real (non-padding) tokens of every case
    assert len(attention.shapes(quick)) < len(attention.shapes(full))
    assert toks(attention.shapes(quick)) * 2 < toks(attention.shapes(full))


def test_kernel_time_counts_only_the_timed_calls_device_events():
    """kernel_ms's attribution: device events starting inside a host marker range count (the GPU-side copy
    of the marker does not), events of the untimed setup outside every range do not; None on CPU."""
    import torch

    M = timing._MARK
    events = [("setup_fwd_kernel", True, 0.0, 50.0),        # the setup's kernel, before the range opens
              (M, False, 60.0, 200.0), (M, True, 61.0, 190.0),
              ("k1", True, 70.0, 100.0), ("memset", True, 100.0, 104.0), ("cpu_op", False, 65.0, 80.0),
              (M, False, 300.0, 400.0), ("k1", True, 310.0, 330.0),
              ("late", True, 500.0, 510.0)]
    total, n = timing.attribute_device_time(events)
    assert n == 2 and total == (30 + 4) + 20
    ctx = context.Context(device=torch.device("cpu"))
    assert timing.kernel_ms(ctx, lambda _: torch.ones(3).sum()) is None
    assert "| kernel ms |" in reporting.MD_HEADER and "kernel_ms" in context.ROW_FIELDS


@pytest.mark.parametrize("prompts, reasonings", [([9], [14]), ([9, 5], [14, 11]), ([3, 4, 6], [7, 2, 5])])
def test_step_flops_count_the_attention_pairs_of_the_packed_episode(prompts, reasonings):
    """The step suite's per-round attention pairs, summed as the training forward holds them (each round's text,
    W noise blocks, and a clean block for every round but the last), equal the visible pairs of the packed
    layout that `episode_document` builds, counted from its segment table by the attention suite."""
    from unigrpo.model.layout import PackedLayout, Segment, episode_document
    from unigrpo_bench.suites.attention import useful_pairs
    from unigrpo_bench.suites.step import round_pairs

    I, W = 16, 3
    per = round_pairs(prompts, reasonings, I)
    ours = sum(pt + W * pi + (pi if r < len(per) - 1 else 0) for r, (_, _, pt, pi) in enumerate(per))
    texts = [p + n for p, n in zip(prompts, reasonings)]
    doc = episode_document(texts, W, I) if len(texts) > 1 else [Segment("text", texts[0])] + [Segment("noise", I)] * W
    assert ours == useful_pairs(PackedLayout.build([[doc]], device="cpu"))
