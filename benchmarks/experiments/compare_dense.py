"""Times LoRADense formulations in a BERT training step, interleaved.

Usage: KERAS_BACKEND=jax python benchmarks/experiments/compare_dense.py \
    [jit|nojit] [targets] [formulation ...]
Environment: LAYERS (transformer layers, default 4), BATCH, REPEATS.
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))

from benchmarks import sizes as sizes_module  # noqa: E402
from benchmarks import timing  # noqa: E402
from benchmarks import training  # noqa: E402
from benchmarks import variants  # noqa: E402
from benchmarks import workloads as w  # noqa: E402
from benchmarks.experiments import formulations  # noqa: E402


def main():
    jit = sys.argv[1] != "nojit"
    targets = sys.argv[2]
    names = sys.argv[3:] or list(formulations.DENSE_CLASSES)
    sizes = dataclasses.replace(
        sizes_module.FULL,
        num_layers=int(os.environ.get("LAYERS", 4)),
        seq_batch=int(os.environ.get("BATCH", 8)),
    )
    workload = os.environ.get("WORKLOAD", w.TRANSFORMER)
    x, y = training.batch_for(workload, sizes)
    steps = {}
    model, _ = variants.build(workload, variants.FULL, targets, sizes)
    steps["full"] = training.train_step_fn(training.compiled(model, jit), x, y)
    for name in names:
        table = formulations.combo(name)
        model, _ = variants.build(
            workload, variants.KERAS_LORA, targets, sizes, table)
        steps[name] = training.train_step_fn(
            training.compiled(model, jit), x, y)
    times = timing.interleave(steps, 1, int(os.environ.get("REPEATS", 5)))
    for name, t in times.items():
        print(f"{name:11s} {timing.median_ms(t):8.0f} ms  /full = "
              f"{timing.paired_ratio(t, times['full']):.2f}", flush=True)


if __name__ == "__main__":
    main()
