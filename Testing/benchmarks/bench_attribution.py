"""Benchmark script (not a test): `python Testing/benchmarks/bench_attribution.py --quick`.

Same as `esegeta bench`; see EsegetaLib/benchmark.py and docs/PERFORMANCE.md.
"""
import sys

from EsegetaLib.benchmark import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
