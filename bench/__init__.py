"""bench: throughput and memory benchmarks of unigrpo's fused ops and whole training steps.

    python -m bench [suite ...] [--quick] [--out DIR] [--providers LIST] [--device DEV] [--list]
    unigrpo bench   [same arguments]

Decisions:
- bench/ is installed as the package `unigrpo_bench` (setup.py's PACKAGE_DIRS, like kernels/ and
  experiments/; a bare top-level `bench` could clash with another distribution's package). `unigrpo bench`
  imports unigrpo_bench.harness; `python -m bench` in the repo root imports the same files as `bench`. So
  that both names work, bench's modules import each other with relative imports only. In a checkout (an
  editable install, or `python -m bench`) results go to bench/results by default.
- What suites share is split by what it does: context.py (Context, the Row format, make_row,
  fill_speedups), timing.py (timers, peak memory, profiler kernel time, the device ceilings), checks.py
  (OpCase, the checks against the torch reference, run_op_case), environment.py (versions, commit, GPU
  telemetry, device slug), reporting.py (the JSON / markdown / PNG writers); harness.py holds only the
  command line. A suite is one module in bench/suites/ (interface in bench/suites/__init__.py).
- The protocol and every column of the results are described in bench/README.md.
"""
