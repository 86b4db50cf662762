"""Inference time: base vs LoRA (unmerged) vs merged, and their outputs.

Each LoRA layer's `lora_b` is set to small random values first, so the
adapter changes the output and "merged equals unmerged" is a real check.
"""

import numpy as np

from benchmarks import timing
from benchmarks import training
from benchmarks import variants
from benchmarks import workloads

from benchmarks.names import BASE
from benchmarks.names import MERGED
from benchmarks.names import UNMERGED


def lora_layers_of(model):
    """Every keras-lora layer in `model` (via `keras_lora.lora_layers`)."""
    try:
        from keras_lora import lora_layers
    except ImportError:
        from keras_lora.layers import LoRALayer

        return [
            layer
            for layer in workloads.all_layers(model)
            if isinstance(layer, LoRALayer)
        ]
    return list(lora_layers(model).values())


def randomize_lora_b(model, seed=1):
    rng = np.random.default_rng(seed)
    for layer in lora_layers_of(model):
        shape = tuple(layer.lora_b.shape)
        layer.lora_b.assign(0.05 * rng.standard_normal(shape).astype("float32"))


def merged_copy(workload, sizes):
    """A merged LoRA model and how it was merged.

    Uses `keras_lora.merge_lora` (a new plain-Keras model) when it exists,
    else `LoRALayer.merge()` in place on a second adapted copy.
    """
    model, _ = variants.build(
        workload, variants.KERAS_LORA, workloads.ALL_LINEAR, sizes
    )
    randomize_lora_b(model)
    try:
        from keras_lora import merge_lora
    except ImportError as error:
        for layer in lora_layers_of(model):
            layer.merge()
        return model, (
            f"keras_lora.merge_lora is not importable ({error}); merged "
            "in place with LoRALayer.merge()"
        )
    return merge_lora(model), "keras_lora.merge_lora"


def predict_fn(model, x):
    model.compile()  # jit_compile="auto": the backend's default.

    def predict():
        return model.predict_on_batch(x)

    return predict


def measure(workload, sizes, log):
    x, _ = training.batch_for(workload, sizes)
    base, _ = variants.build(
        workload, variants.FULL, workloads.ALL_LINEAR, sizes
    )
    unmerged, _ = variants.build(
        workload, variants.KERAS_LORA, workloads.ALL_LINEAR, sizes
    )
    randomize_lora_b(unmerged)
    merged, note = merged_copy(workload, sizes)
    models = {BASE: base, UNMERGED: unmerged, MERGED: merged}
    steps = {name: predict_fn(model, x) for name, model in models.items()}
    outputs = {name: np.asarray(step()) for name, step in steps.items()}
    times = timing.interleave(
        steps, sizes.warmup, 2 * sizes.repeats + 1
    )
    scale = float(np.max(np.abs(outputs[UNMERGED]))) or 1.0
    row = {
        "workload": workload,
        "median_ms": {k: timing.median_ms(v) for k, v in times.items()},
        "ratios": {
            f"{MERGED}/{BASE}": timing.paired_ratio(times[MERGED], times[BASE]),
            f"{UNMERGED}/{BASE}": timing.paired_ratio(
                times[UNMERGED], times[BASE]
            ),
        },
        "max_abs_diff_merged_vs_unmerged": float(
            np.max(np.abs(outputs[MERGED] - outputs[UNMERGED]))
        ),
        "max_abs_output": scale,
        "merged_class_names_match_base": _same_layer_classes(merged, base),
        "notes": [note],
    }
    log(
        f"  {workload:4s} "
        + " ".join(f"{k}={v:.1f}ms" for k, v in row["median_ms"].items())
        + " | "
        + " ".join(f"{k}={v:.3f}" for k, v in row["ratios"].items())
        + f" | max|merged-unmerged|={row['max_abs_diff_merged_vs_unmerged']:.2e}"
    )
    return row


def _same_layer_classes(a, b):
    def names(model):
        return sorted(type(l).__name__ for l in workloads.all_layers(model))

    return names(a) == names(b)


def run(sizes, log):
    rows = []
    for workload in (workloads.MLP, workloads.TRANSFORMER):
        try:
            rows.append(measure(workload, sizes, log))
        except Exception as error:
            log(f"  {workload}: FAILED {error!r}")
            rows.append(
                {"workload": workload, "error": f"{type(error).__name__}: {error}"}
            )
    return {"status": "ok", "rows": rows}
