"""Per-op time of a jitted BERT LoRA gradient on jax (profiler trace).

Usage: KERAS_BACKEND=jax python benchmarks/experiments/jax_profile.py TARGETS
TARGETS: full | all-linear | feed-forward | attention | query/value.
Prints the XLA ops that took the most time over a few profiled steps.
"""

import collections
import dataclasses
import glob
import gzip
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))

import jax  # noqa: E402

from benchmarks import sizes as sizes_module  # noqa: E402
from benchmarks import training  # noqa: E402
from benchmarks import variants  # noqa: E402
from benchmarks import workloads as w  # noqa: E402
from benchmarks.experiments.jax_hlo_dots import grad_fn  # noqa: E402


def main():
    targets = sys.argv[1]
    layers = int(os.environ.get("LAYERS", 1))
    variant = variants.FULL if targets == "full" else variants.KERAS_LORA
    sizes = dataclasses.replace(sizes_module.FULL, num_layers=layers)
    workload = os.environ.get("WORKLOAD", w.TRANSFORMER)
    table = None
    if os.environ.get("FORMULATION"):
        from benchmarks.experiments import formulations
        table = formulations.combo(os.environ["FORMULATION"])
    model, _ = variants.build(
        workload, variant,
        w.ALL_LINEAR if targets == "full" else targets, sizes, table)
    x, y = training.batch_for(workload, sizes)
    tv = [v.value for v in model.trainable_variables]
    ntv = [v.value for v in model.non_trainable_variables]
    fn = grad_fn(model)
    jax.block_until_ready(fn(tv, ntv, x, y))
    folder = tempfile.mkdtemp()
    steps = 3
    with jax.profiler.trace(folder, create_perfetto_trace=True):
        for _ in range(steps):
            jax.block_until_ready(fn(tv, ntv, x, y))
    path = glob.glob(f"{folder}/**/*.trace.json.gz", recursive=True)[0]
    with gzip.open(path) as file:
        events = json.load(file)["traceEvents"]
    totals = collections.Counter()
    for event in events:
        if event.get("ph") == "X":
            totals[event["name"]] += event.get("dur", 0)
    for name, dur in totals.most_common(int(os.environ.get("TOP", 30))):
        print(f"{dur / 1000 / steps:9.2f} ms  {name[:110]}")


if __name__ == "__main__":
    main()
