"""Per-op time of keras-lora train steps on the torch backend.

Usage: KERAS_BACKEND=torch python benchmarks/experiments/torch_profile.py [mlp|bert]
Prints torch.profiler's top ops (self CPU time) for full fine-tuning and
for keras-lora on all linear layers.
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))

import torch  # noqa: E402

from benchmarks import sizes as sizes_module  # noqa: E402
from benchmarks import training  # noqa: E402
from benchmarks import variants  # noqa: E402
from benchmarks import workloads as w  # noqa: E402


def main():
    workload = sys.argv[1] if len(sys.argv) > 1 else w.MLP
    sizes = dataclasses.replace(
        sizes_module.FULL, seq_batch=int(os.environ.get("BATCH", 4)))
    x, y = training.batch_for(workload, sizes)
    for variant in (variants.FULL, variants.KERAS_LORA):
        model, _ = variants.build(workload, variant, w.ALL_LINEAR, sizes)
        step = training.train_step_fn(training.compiled(model, False), x, y)
        step()
        with torch.profiler.profile() as prof:
            for _ in range(3):
                step()
        print(f"==== {variant}")
        print(prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=int(os.environ.get("TOP", 14))))


if __name__ == "__main__":
    main()
