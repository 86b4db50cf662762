"""A single adapter's step and inference cost, for comparing two checkouts.

Usage:

    PYTHONPATH=<checkout> KERAS_BACKEND=jax python \\
        benchmarks/experiments/single_adapter_cost.py --out result.json

Uses only `keras_lora.apply_lora` (the same call in every version), so
the `keras_lora` found on `PYTHONPATH` decides what is measured: run it
once per checkout, alternately and on the same core, and compare the
ratios (`compare` below prints the medians). Each case interleaves the
plain-Keras reference (full fine-tune step, or the base model's
`predict_on_batch`) with the adapted model, step by step, and reports the
median of the per-round ratios, as the harness does; the reference is the
same Keras code in both checkouts, so the ratio of two checkouts' ratios
is the change in keras-lora's own cost.

    python benchmarks/experiments/single_adapter_cost.py --compare a/*.json -- b/*.json
"""

import argparse
import json
import os
import statistics
import sys
import time


def build(workload):
    import keras
    import keras_hub
    import numpy as np

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    if workload == "mlp":
        model = keras.Sequential(
            [keras.Input((1024,))]
            + [keras.layers.Dense(1024, activation="relu") for _ in range(4)]
        )
        x = rng.normal(size=(1024, 1024)).astype("float32")
        return model, x, rng.normal(size=(1024, 1024)).astype("float32")
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=1000, num_layers=4, num_heads=8, hidden_dim=512,
        intermediate_dim=2048, max_sequence_length=128,
    )
    model = keras.Model(backbone.input, backbone.output["sequence_output"])
    x = {
        "token_ids": rng.integers(0, 1000, size=(4, 128)).astype("int32"),
        "segment_ids": np.zeros((4, 128), "int32"),
        "padding_mask": np.ones((4, 128), "int32"),
    }
    return model, x, rng.normal(size=(4, 128, 512)).astype("float32")


def step_fn(model, x, y, jit, train):
    import keras

    if not train:
        return lambda: model.predict_on_batch(x)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="mse",
                  jit_compile=jit)
    return lambda: model.train_on_batch(x, y)


def interleaved_ratio(reference, adapted, rounds):
    reference(), adapted(), reference(), adapted()
    ratios = []
    for i in range(rounds):
        times = {}
        order = ((0, reference), (1, adapted))
        for key, fn in (order if i % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            fn()
            times[key] = time.perf_counter() - start
        ratios.append(times[1] / times[0])
    return statistics.median(ratios)


CASES = (
    # (name, workload, jit_compile, train)
    ("mlp train jit", "mlp", True, True),
    ("mlp train eager", "mlp", False, True),
    ("bert all-linear train jit", "bert", True, True),
    ("bert all-linear train eager", "bert", False, True),
    ("bert all-linear predict", "bert", None, False),
)


def measure(rounds):
    import keras
    import keras_lora

    results = {}
    for name, workload, jit, train in CASES:
        if jit and keras.backend.backend() == "torch":
            continue  # torch.compile recompiles in Keras's layers (FINDINGS 4)
        full, x, y = build(workload)
        adapted, _, _ = build(workload)
        adapted = keras_lora.apply_lora(adapted, rank=8)
        reference = step_fn(full, x, y, jit, train)
        candidate = step_fn(adapted, x, y, jit, train)
        results[name] = interleaved_ratio(reference, candidate, rounds)
        print(f"{name:30s} {results[name]:.3f}", flush=True)
    return results


def compare(first, second):
    def load(paths):
        runs = [json.load(open(p)) for p in paths]
        return {k: [r["ratios"][k] for r in runs if k in r["ratios"]]
                for k in runs[0]["ratios"]}

    a, b = load(first), load(second)
    for name in a:
        if not b.get(name):
            continue
        ma, mb = statistics.median(a[name]), statistics.median(b[name])
        print(f"{name:30s} {ma:.3f} (n={len(a[name])}, "
              f"{min(a[name]):.3f}-{max(a[name]):.3f})  "
              f"{mb:.3f} (n={len(b[name])}, {min(b[name]):.3f}-"
              f"{max(b[name]):.3f})  second/first {mb / ma:.3f}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--compare", nargs="+")
    arguments, rest = parser.parse_known_args()
    if arguments.compare:
        split = sys.argv.index("--")
        first = [p for p in sys.argv[sys.argv.index("--compare") + 1: split]]
        compare(first, sys.argv[split + 1:])
        return
    import keras
    import keras_lora

    ratios = measure(arguments.rounds)
    with open(arguments.out, "w") as file:
        json.dump({
            "backend": keras.backend.backend(),
            "keras_lora": os.path.dirname(os.path.dirname(
                os.path.abspath(keras_lora.__file__))),
            "ratios": ratios,
        }, file, indent=1)


if __name__ == "__main__":
    main()
