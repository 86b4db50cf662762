"""Lists the dot operations XLA compiles for a BERT LoRA gradient (jax).

Usage: KERAS_BACKEND=jax python benchmarks/experiments/jax_hlo_dots.py TARGETS
"""

import dataclasses
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))

import jax  # noqa: E402
import keras  # noqa: E402

from benchmarks import sizes as sizes_module  # noqa: E402
from benchmarks import training  # noqa: E402
from benchmarks import variants  # noqa: E402
from benchmarks import workloads as w  # noqa: E402


def grad_fn(model):
    def loss_fn(trainable, non_trainable, x, y):
        out, _ = model.stateless_call(trainable, non_trainable, x, training=True)
        return keras.ops.mean(keras.ops.square(out - y))

    return jax.jit(jax.grad(loss_fn))


def main():
    targets = sys.argv[1]
    variant = variants.FULL if targets == "full" else variants.KERAS_LORA
    sizes = dataclasses.replace(sizes_module.FULL, num_layers=1)
    workload = os.environ.get("WORKLOAD", w.TRANSFORMER)
    table = None
    if os.environ.get("FORMULATION"):
        from benchmarks.experiments import formulations
        table = formulations.combo(os.environ["FORMULATION"])
    model, _ = variants.build(workload, variant,
                              w.ALL_LINEAR if targets == "full" else targets,
                              sizes, table)
    x, y = training.batch_for(workload, sizes)
    tv = [v.value for v in model.trainable_variables]
    ntv = [v.value for v in model.non_trainable_variables]
    text = grad_fn(model).lower(tv, ntv, x, y).compile().as_text()
    tag = f"{workload}_{targets}_{os.environ.get('FORMULATION', '')}".replace("/", "-")
    with open(f"/tmp/hlo_{tag}.txt", "w") as f:
        f.write(text)
    for line in text.splitlines():
        if re.search(r"\bdot\(|custom-call|convolution\(", line):
            print(line.strip()[:260])


if __name__ == "__main__":
    main()
