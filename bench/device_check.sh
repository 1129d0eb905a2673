#!/usr/bin/env bash
# The prepared first-contact check for a CUDA machine (issue 17): one script, one lease, inside 9 minutes.
#
#   bash bench/device_check.sh [--dry-run] [--pack] [OUT_DIR]
#
# On a CUDA machine with torch and triton preinstalled and no network it, in this order:
#   1. installs the project (pip install --no-deps --no-build-isolation -e .) and builds the CUDA library
#      with CMake for this GPU's architecture only, then checks that unigrpo_kernels loads it: a library that
#      cannot be built or loaded FAILS the run loudly (the GPU tests of the CUDA backend would only skip);
#   2. runs the GPU tests, flow and token kernels first, each file under its own `timeout`;
#   3. runs `python -m bench`: the flow and token suites at the paper's shapes, attention, rollout and step
#      with --quick, one invocation per suite (a suite that runs out of time loses only its own results);
#   4. prints a one-screen summary (bench/device_summary.py) and writes it (summary.txt), every log (logs/),
#      each bench run's files (results/), and the merged results <device>-<date>.{json,md} with one plot per
#      suite into OUT_DIR (default: $OUT, else ./device_check_out).
# Exit status: 0 when every step passed; 1 when any step failed or timed out — a test failure, a provider
# disagreeing with its reference (bench exits 1), or the CUDA library missing; 2 without a CUDA device (at
# once, before anything is installed) or on a usage error. --dry-run lists the steps and their time budgets
# (seconds; each is that step's `timeout`) and runs nothing, on any machine. --pack leaves four files in
# OUT_DIR (summary.txt, the merged JSON and markdown, device_check.tar.gz with the logs, the per-run files and
# the plots), for transports that return a few files only (the device tool returns at most 8).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

TOTAL_BUDGET=540          # 9 minutes: the sum of the step budgets below must stay inside it
DRY=0 PACK=0 OUT_DIR=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --pack) PACK=1 ;;
    -h|--help) sed -n '2,/^set /p' "$0" | sed -n 's/^# \{0,1\}//p'; exit 0 ;;
    -*) echo "device_check: unknown option $arg (expected --dry-run, --pack or an output folder)" >&2; exit 2 ;;
    *) [ -z "$OUT_DIR" ] || { echo "device_check: one output folder only, got $OUT_DIR and $arg" >&2; exit 2; }
       OUT_DIR="$arg" ;;
  esac
done
OUT_DIR="${OUT_DIR:-${OUT:-./device_check_out}}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"

# name | budget s | kind | command (run from the repository root; $PY, $CUDA_ARCH, $RESULTS are set)
STEPS=(
  "preflight|15|setup|\$PY -c 'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))' && (nvidia-smi -L || true)"
  "install|30|setup|UNIGRPO_BUILD_CUDA=0 \$PY -m pip install --no-deps --no-build-isolation -e ."
  "build_cuda_lib|75|setup|cmake -S . -B build/cuda -DCMAKE_CUDA_ARCHITECTURES=\$CUDA_ARCH && cmake --build build/cuda -j"
  "load_cuda_lib|10|setup|\$PY -c 'import sys; from unigrpo_kernels.cuda_lib import cuda_library_available as ok, cuda_library_status as st; print(st()); sys.exit(0 if ok() else 1)'"
  "test_ops_flow_cuda|35|test|\$PY -m pytest -q -p no:cacheprovider tests/test_ops_flow_cuda.py"
  "test_ops_flow_kernels|45|test|\$PY -m pytest -q -p no:cacheprovider tests/test_ops_flow_kernels.py"
  "test_ops_token_kernels|75|test|\$PY -m pytest -q -p no:cacheprovider tests/test_ops_token_kernels.py"
  "test_attention|30|test|\$PY -m pytest -q -p no:cacheprovider tests/test_attention.py"
  "test_rollout_fast|20|test|\$PY -m pytest -q -p no:cacheprovider tests/test_rollout_fast.py"
  "test_model_flex|15|test|\$PY -m pytest -q -p no:cacheprovider tests/test_model.py -k flex"
  "bench_flow|40|bench|\$PY -m bench flow --out \$RESULTS"
  "bench_token|60|bench|\$PY -m bench token --out \$RESULTS"
  "bench_attention|25|bench|\$PY -m bench attention --quick --out \$RESULTS"
  "bench_rollout|25|bench|\$PY -m bench rollout --quick --out \$RESULTS"
  "bench_step|15|bench|\$PY -m bench step --quick --out \$RESULTS"
)
SUMMARY_BUDGET=20       # torch import, the merge and one plot per suite
# Test hook (tests/test_device_check.py): DEVICE_CHECK_PLAN names a file of step lines in the format above that
# replaces STEPS, and DEVICE_CHECK_NO_GPU=1 skips the CUDA requirement, so CI can run the runner on a CPU.
if [ -n "${DEVICE_CHECK_PLAN:-}" ]; then
  mapfile -t STEPS < <(grep -v '^[[:space:]]*\(#\|$\)' "$DEVICE_CHECK_PLAN") || exit 2
fi

total=$SUMMARY_BUDGET
for s in "${STEPS[@]}"; do IFS='|' read -r _ b _ _ <<<"$s"; total=$((total + b)); done

if [ "$DRY" = 1 ]; then
  echo "device_check plan (dry run: nothing runs); output folder: $OUT_DIR"
  printf '%-3s %-24s %-6s %7s  %s\n' "#" "step" "kind" "budget" "command"
  i=0
  for s in "${STEPS[@]}"; do
    IFS='|' read -r name b kind cmd <<<"$s"; i=$((i + 1))
    printf '%-3s %-24s %-6s %6ss  %s\n' "$i" "$name" "$kind" "$b" "$cmd"
  done
  printf '%-3s %-24s %-6s %6ss  %s\n' "$((i + 1))" "summary" "report" "$SUMMARY_BUDGET" "\$PY -m bench.device_summary"
  echo "total budget: ${total} s of ${TOTAL_BUDGET} s (9 min)"
  [ "$total" -le "$TOTAL_BUDGET" ] || { echo "device_check: the plan exceeds ${TOTAL_BUDGET} s" >&2; exit 1; }
  exit 0
fi

if [ "${DEVICE_CHECK_NO_GPU:-0}" != 1 ] && \
   ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "device_check: no CUDA device visible to torch ($PY): this check needs a GPU; nothing was run." >&2
  echo "device_check: 'bash bench/device_check.sh --dry-run' lists what it would do." >&2
  exit 2
fi

mkdir -p "$OUT_DIR/logs" "$OUT_DIR/results" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOGS="$OUT_DIR/logs" RESULTS="$OUT_DIR/results" STATUS="$OUT_DIR/logs/status.tsv"
CUDA_ARCH="$("$PY" -c 'import torch; a, b = torch.cuda.get_device_capability(0); print(f"{a}{b}" + ("a" if a == 9 else ""))' 2>/dev/null)"
# the library just built, not a stale copy elsewhere (kernels/cuda/ is git-ignored and may hold an old one)
export UNIGRPO_CUDA_LIB="$PWD/build/cuda/lib/libunigrpo_cuda.so" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
export PY CUDA_ARCH RESULTS
: >"$STATUS"
echo "device_check: ${#STEPS[@]} steps, budget ${total} s; logs in $LOGS"
started=$(date +%s)
for s in "${STEPS[@]}"; do
  IFS='|' read -r name budget kind cmd <<<"$s"
  t0=$(date +%s)
  timeout --kill-after=2 "$budget" bash -c "$cmd" >"$LOGS/$name.log" 2>&1
  rc=$?
  dt=$(($(date +%s) - t0))
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$kind" "$rc" "$dt" "$budget" "$LOGS/$name.log" >>"$STATUS"
  case $rc in 0) word=ok ;; 124|137) word=TIMEOUT ;; 5) word="no tests" ;; *) word="FAIL (rc $rc)" ;; esac
  printf '  %-24s %-12s %4ss of %ss\n' "$name" "$word" "$dt" "$budget"
  if [ "$name" = build_cuda_lib ] && [ $rc -ne 0 ]; then
    echo "device_check: FAILED to build the CUDA library (see $LOGS/$name.log); the cuda backend is missing" >&2
  fi
done
echo "device_check: steps took $(($(date +%s) - started)) s"
timeout "$SUMMARY_BUDGET" "$PY" -m bench.device_summary "$STATUS" "$RESULTS" --merge-to "$OUT_DIR" \
  | tee "$OUT_DIR/summary.txt"
rc=${PIPESTATUS[0]}
if [ "$PACK" = 1 ]; then   # left: summary.txt, the merged <slug>-<date>.json / .md, device_check.tar.gz
  (cd "$OUT_DIR" && shopt -s nullglob && png=(./*.png) && tar -czf device_check.tar.gz logs results "${png[@]}" \
     && rm -rf logs results "${png[@]}") || { echo "device_check: --pack failed" >&2; rc=1; }
fi
exit "$rc"
