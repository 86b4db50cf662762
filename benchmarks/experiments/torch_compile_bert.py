"""The BERT training cases under torch.compile, which `run.py` skips.

`make bench` leaves them out because compiling a keras-hub BERT train step
takes minutes per variant on two cores; this runs them alone, with the
same sizes, variants and interleaving as `run.py`, and prints how long the
compiling warm-up took.

Usage: OMP_NUM_THREADS=1 KERAS_BACKEND=torch taskset -c 1 \
    python benchmarks/experiments/torch_compile_bert.py [query/value all-linear]
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))

from benchmarks import sizes as sizes_module  # noqa: E402
from benchmarks import training  # noqa: E402
from benchmarks import workloads as w  # noqa: E402


def main():
    targets = sys.argv[1:] or [w.QUERY_VALUE, w.ALL_LINEAR]
    for target in targets:
        start = time.perf_counter()
        row = training.measure_case(
            w.TRANSFORMER, target, True, sizes_module.FULL, print
        )
        if "error" in row:
            print(row["traceback"])
        print(f"  ({target}: {time.perf_counter() - start:.0f} s in all, "
              "compilation included)", flush=True)


if __name__ == "__main__":
    main()
