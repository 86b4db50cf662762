"""How close is a LoRA step to its floor? (forward + input gradients only)

The floor: the same model with one adapter on its first linear layer only,
so the backward pass still runs through every layer (input gradients) but
computes no weight gradient beyond one rank-r pair. keras-lora on every
linear layer can only add the adapters' own cost on top of it.

Usage: KERAS_BACKEND=jax python benchmarks/experiments/floor.py WORKLOAD [jit|nojit]
Environment: LAYERS, BATCH, REPEATS; FORMULATION (e.g. flat) to swap in an
experiment class for the all-linear variant.
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

FIRST = {
    w.MLP: "dense_0",
    w.TRANSFORMER: "transformer_layer_0/self_attention_layer/query",
}


def build_floor(workload, sizes):
    from keras_lora import apply_lora

    if workload == w.MLP:
        model = w.build_mlp(sizes)
    else:
        model, _ = w.build_transformer(sizes)
    model = apply_lora(
        model, rank=sizes.rank,
        targets=lambda path, layer: path.endswith(FIRST[workload]))
    variants._train_only(model, ("lora_a", "lora_b"))
    return model


def main():
    workload = sys.argv[1]
    jit = len(sys.argv) < 3 or sys.argv[2] != "nojit"
    sizes = dataclasses.replace(
        sizes_module.FULL,
        num_layers=int(os.environ.get("LAYERS", 4)),
        seq_batch=int(os.environ.get("BATCH", 4)),
    )
    x, y = training.batch_for(workload, sizes)
    models = {
        "full": variants.build(workload, variants.FULL, w.ALL_LINEAR, sizes)[0],
        "floor": build_floor(workload, sizes),
        "keras_lora": variants.build(
            workload, variants.KERAS_LORA, w.ALL_LINEAR, sizes)[0],
    }
    if os.environ.get("FORMULATION"):
        from benchmarks.experiments import formulations

        models["keras_lora_" + os.environ["FORMULATION"]] = variants.build(
            workload, variants.KERAS_LORA, w.ALL_LINEAR, sizes,
            formulations.combo(os.environ["FORMULATION"]))[0]
    for name, model in models.items():
        print(f"{name}: {len(model.trainable_variables)} trainable variables")
    steps = {n: training.train_step_fn(training.compiled(m, jit), x, y)
             for n, m in models.items()}
    times = timing.interleave(steps, 1, int(os.environ.get("REPEATS", 7)))
    for name, t in times.items():
        print(f"{name:16s} {timing.median_ms(t):8.0f} ms  /full = "
              f"{timing.paired_ratio(t, times['full']):.2f}  /floor = "
              f"{timing.paired_ratio(t, times['floor']):.2f}", flush=True)


if __name__ == "__main__":
    main()
