"""bench/device_check.sh, the prepared GPU check (issue 17), exercised on the CPU:

- `--dry-run` lists the plan: install, CUDA library build and load check, the GPU test files (flow and token
  kernels first), bench flow / token at full shapes and attention / rollout / step with --quick, and the
  summary, with budgets that add up to the printed total and fit 9 minutes;
- without a CUDA device it exits 2 at once with a clear message and creates nothing;
- the runner itself (through its test hook: a plan file and DEVICE_CHECK_NO_GPU=1) times out a slow step,
  records a failing one, merges a real CPU bench run into one JSON/markdown, prints the summary, exits 1, and
  --pack leaves at most 8 files;
- the summary's verdict: a row that disagrees with its reference fails it, and all-ok passes.
"""
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "device_check.sh")


def _run(*args, env=None, timeout=120):
    e = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    e.pop("OUT", None)
    e.update(env or {})
    return subprocess.run(["bash", SCRIPT, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=e)


def test_dry_run_lists_a_plan_that_fits_nine_minutes(tmp_path):
    p = _run("--dry-run", str(tmp_path / "never"))
    assert p.returncode == 0, p.stderr
    steps = re.findall(r"^(\d+)\s+(\S+)\s+(\S+)\s+(\d+)s\s+(.*)$", p.stdout, re.M)
    names = [s[1] for s in steps]
    budgets = [int(s[3]) for s in steps]
    total = int(re.search(r"total budget: (\d+) s of 540 s", p.stdout).group(1))
    assert sum(budgets) == total <= 540 and all(b > 0 for b in budgets)
    assert names[:4] == ["preflight", "install", "build_cuda_lib", "load_cuda_lib"] and names[-1] == "summary"
    tests = [n for n, s in zip(names, steps) if s[2] == "test"]
    assert tests[:3] == ["test_ops_flow_cuda", "test_ops_flow_kernels", "test_ops_token_kernels"]
    cmd = {s[1]: s[4] for s in steps}
    assert "pip install --no-deps" in cmd["install"] and "cmake" in cmd["build_cuda_lib"]
    for suite in ("flow", "token"):
        assert f"-m bench {suite} " in cmd[f"bench_{suite}"] and "--quick" not in cmd[f"bench_{suite}"]
    for suite in ("attention", "rollout", "step"):
        assert f"-m bench {suite} --quick" in cmd[f"bench_{suite}"]
    assert not (tmp_path / "never").exists()


def test_without_cuda_it_exits_at_once_with_a_clear_message(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    p = _run(str(tmp_path / "out"), timeout=60)
    assert p.returncode == 2
    assert "no CUDA device" in p.stderr and "--dry-run" in p.stderr
    assert not (tmp_path / "out").exists()


def test_bad_usage_exits_2():
    p = _run("--no-such-flag")
    assert p.returncode == 2 and "unknown option --no-such-flag" in p.stderr


@pytest.fixture(scope="module")
def check_run(tmp_path_factory):
    """One run of the runner on the CPU: a passing 'test', a failing one, one past its budget, and a real
    (torch-only, --quick) flow bench; packed."""
    d = tmp_path_factory.mktemp("device_check")
    plan = d / "plan.txt"
    plan.write_text("# test plan\n"
                    "good|5|test|echo '3 passed, 1 skipped in 0.10s'\n"
                    "bad|5|test|echo '1 failed, 2 passed in 0.20s'; exit 1\n"
                    "slow|1|setup|sleep 10\n"
                    "bench_flow|120|bench|$PY -m bench flow --quick --providers torch --out $RESULTS\n")
    out = d / "out"
    p = _run("--pack", str(out), env=dict(DEVICE_CHECK_PLAN=str(plan), DEVICE_CHECK_NO_GPU="1"), timeout=300)
    return p, out


def test_runner_records_failures_timeouts_and_merges_the_bench(check_run):
    p, out = check_run
    assert p.returncode == 1, p.stdout + p.stderr
    summary = (out / "summary.txt").read_text()
    assert summary == p.stdout[p.stdout.index("== device check summary =="):]
    lines = {ln.split()[0]: ln for ln in summary.splitlines() if ln and not ln.startswith(("==", "--"))}
    assert "ok" in lines["good"] and "3 passed, 1 skipped" in lines["good"]
    assert "FAIL rc=1" in lines["bad"] and "1 failed" in lines["bad"]
    assert "TIMEOUT" in lines["slow"] and "ok" in lines["bench_flow"]
    assert "flow/sde_step fwd B=8 D=3072: torch" in summary
    assert "RESULT: FAIL (2 step(s): bad, slow; 0 row(s)" in summary
    files = sorted(os.listdir(out))
    assert len(files) <= 8 and "device_check.tar.gz" in files, files
    merged = [f for f in files if f.endswith(".json")]
    assert len(merged) == 1 and merged[0].replace(".json", ".md") in files
    res = json.loads((out / merged[0]).read_text())
    assert res["suites"] == ["flow"] and res["rows"] and all(r["suite"] == "flow" for r in res["rows"])
    listing = subprocess.run(["tar", "tzf", str(out / "device_check.tar.gz")], capture_output=True, text=True).stdout
    assert "logs/status.tsv" in listing and "logs/bench_flow.log" in listing and "-flow.png" in listing


def test_summary_fails_on_a_disagreeing_row(check_run, tmp_path, capsys):
    from unigrpo_bench import device_summary as S

    _, out = check_run
    merged = next(f for f in os.listdir(out) if f.endswith(".json"))
    res = json.loads((out / merged).read_text())
    status = tmp_path / "status.tsv"
    status.write_text(f"t\ttest\t0\t1\t5\t{tmp_path / 'none.log'}\n")
    results = tmp_path / "results"
    results.mkdir()
    (results / "a.json").write_text(json.dumps(res))
    assert S.main([str(status), str(results), "--merge-to", str(tmp_path / "m1")]) == 0
    assert "RESULT: PASS" in capsys.readouterr().out
    res["rows"][1].update(ok=False, note="check failed: x_next: rel err 1e-3 vs tol 1e-6")
    (results / "a.json").write_text(json.dumps(res))
    assert S.main([str(status), str(results), "--merge-to", str(tmp_path / "m2")]) == 1
    text = capsys.readouterr().out
    assert "DISAGREES: flow/" in text and "1 row(s) disagree" in text
    with pytest.raises(ValueError, match="6 tab-separated fields"):
        status.write_text("only\ttwo\n")
        S.load_status(str(status))
