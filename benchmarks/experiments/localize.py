"""Localise the cost of keras-lora in a BERT training step.

Usage: KERAS_BACKEND=jax python benchmarks/experiments/localize.py [jit]

Interleaves full fine-tuning with keras-lora on all linear layers, on the
feed-forward Dense layers only and on the attention EinsumDense layers only,
and prints each step time relative to full fine-tuning.
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


def main():
    jit = (sys.argv[1] != "nojit") if len(sys.argv) > 1 else True
    sizes = dataclasses.replace(
        sizes_module.FULL, seq_batch=int(os.environ.get("BATCH", 8)))
    cases = {
        "full": (variants.FULL, w.ALL_LINEAR),
        "lora_all": (variants.KERAS_LORA, w.ALL_LINEAR),
        "lora_ffn": (variants.KERAS_LORA, w.FEED_FORWARD),
        "lora_attn": (variants.KERAS_LORA, w.ATTENTION),
        "lora_qv": (variants.KERAS_LORA, w.QUERY_VALUE),
    }
    only = os.environ.get("CASES")
    if only:
        cases = {k: v for k, v in cases.items() if k in only.split(",")}
    x, y = training.batch_for(w.TRANSFORMER, sizes)
    steps = {}
    for name, (variant, targets) in cases.items():
        model, _ = variants.build(w.TRANSFORMER, variant, targets, sizes)
        steps[name] = training.train_step_fn(
            training.compiled(model, jit), x, y)
    times = timing.interleave(steps, 1, int(os.environ.get("REPEATS", 5)))
    for name, t in times.items():
        print(f"{name:10s} {timing.median_ms(t):8.0f} ms  /full = "
              f"{timing.paired_ratio(t, times['full']):.2f}", flush=True)


if __name__ == "__main__":
    main()
