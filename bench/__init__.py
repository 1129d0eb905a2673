"""bench: throughput and memory benchmarks of unigrpo's fused ops and whole training steps.

    python -m bench [suite ...] [--quick] [--out DIR] [--providers LIST] [--device DEV] [--list]
    unigrpo bench   [same arguments]

Decisions:
- bench/ is a plain package of the source tree, not installed (setup.py is unchanged): run it from the repo
  root (`python -m bench`); `unigrpo bench` puts the checkout that holds the installed (editable) `unigrpo`
  on sys.path first, and says so when there is no checkout.
- harness.py holds everything suites share: the command line, the device ceilings, timing, the checks
  against the torch reference, the row format and the JSON / markdown / PNG writers. A suite is one module
  in bench/suites/ (interface in bench/suites/__init__.py).
- The protocol and every column of the results are described in bench/README.md.
"""
