"""Training-step time: keras-lora vs full fine-tune vs Keras `enable_lora`."""

import math
import traceback

import keras
import numpy as np

from benchmarks import names
from benchmarks import timing
from benchmarks import variants
from benchmarks import workloads

# (workload, targets) pairs, in report order.
CASES = (
    (workloads.MLP, workloads.ALL_LINEAR),
    (workloads.TRANSFORMER, workloads.QUERY_VALUE),
    (workloads.TRANSFORMER, workloads.ALL_LINEAR),
)

# Workloads measured under torch.compile (`jit_compile=True` on torch).
# BERT compiles in 0.5-1.5 min per case pinned to one core (it was skipped
# while that was believed to take minutes per variant); dynamo hits its
# recompile limit inside Keras's layer machinery there (FINDINGS, 4).
TORCH_COMPILE_WORKLOADS = (workloads.MLP, workloads.TRANSFORMER)

RATIOS = (
    (variants.KERAS_LORA, variants.FULL),
    (variants.KERAS_ENABLE_LORA, variants.FULL),
    (variants.KERAS_LORA, variants.KERAS_ENABLE_LORA),
)


def batch_for(workload, sizes):
    if workload == workloads.MLP:
        return workloads.mlp_batch(sizes)
    return workloads.transformer_batch(sizes)


def compiled(model, jit_compile):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        loss="mse",
        jit_compile=jit_compile,
    )
    return model


def train_step_fn(model, x, y):
    """A callable running one blocking `train_on_batch` step."""

    def step():
        return model.train_on_batch(x, y)

    return step


def variable_bytes(variables):
    """Exact bytes of `variables` (shape × dtype size)."""
    return int(
        sum(
            math.prod(v.shape)
            * np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize
            for v in variables
        )
    )


def memory_counts(model):
    """Parameter and byte counts of a compiled, trained model."""
    trainable = model.trainable_variables
    return {
        "trainable_params": int(sum(math.prod(v.shape) for v in trainable)),
        "trainable_bytes": variable_bytes(trainable),
        # The optimizer's own variables after training: Adam's two moments
        # per trainable variable plus its counters.
        "optimizer_state_bytes": variable_bytes(model.optimizer.variables),
        "all_weight_bytes": variable_bytes(model.weights),
    }


ratio_key = names.ratio_key


def measure_case(workload, targets, jit_compile, sizes, log):
    """Times the three variants of one case, interleaved.

    Returns:
        A row dict: case, per-variant median step (ms), paired ratios,
        trainable parameter counts and notes.
    """
    row = {
        "workload": workload,
        "targets": targets,
        "jit_compile": jit_compile,
    }
    try:
        x, y = batch_for(workload, sizes)
        models, notes = {}, []
        for variant in variants.VARIANTS:
            model, note = variants.build(workload, variant, targets, sizes)
            models[variant] = compiled(model, jit_compile)
            if note:
                notes.append(note)
        steps = {
            name: train_step_fn(model, x, y) for name, model in models.items()
        }
        times = timing.interleave(steps, sizes.warmup, sizes.repeats)
    except Exception as error:  # A failed case is reported, not fatal.
        log(f"  {workload} {targets} jit={jit_compile}: FAILED {error!r}")
        row["error"] = f"{type(error).__name__}: {error}"
        row["traceback"] = traceback.format_exc(limit=6)
        return row
    row["memory"] = {
        name: memory_counts(model) for name, model in models.items()
    }
    row["trainable_params"] = {
        name: counts["trainable_params"]
        for name, counts in row["memory"].items()
    }
    row["median_ms"] = {name: timing.median_ms(t) for name, t in times.items()}
    row["ratios"] = {
        ratio_key(a, b): timing.paired_ratio(times[a], times[b])
        for a, b in RATIOS
    }
    row["notes"] = sorted(set(notes))
    log(
        f"  {workload:4s} {targets:11s} jit={str(jit_compile):5s} "
        + " ".join(f"{k}={v:.0f}ms" for k, v in row["median_ms"].items())
        + " | "
        + " ".join(f"{k}={v:.2f}" for k, v in row["ratios"].items())
    )
    return row


def skip_reason(workload, jit_compile):
    """Why a case is not run on this backend, or `None`."""
    if (
        jit_compile
        and keras.backend.backend() == "torch"
        and workload not in TORCH_COMPILE_WORKLOADS
    ):
        return (
            "torch.compile of a keras-hub BERT train step takes minutes per "
            "variant on 2 cores"
        )
    return None


def run(sizes, log):
    """All training cases under every `jit_compile` mode."""
    rows = []
    for jit_compile in sizes.jit_modes:
        for workload, targets in CASES:
            reason = skip_reason(workload, jit_compile)
            if reason:
                log(f"  {workload} {targets} jit={jit_compile}: skipped, "
                    f"{reason}")
                rows.append({"workload": workload, "targets": targets,
                             "jit_compile": jit_compile, "skipped": reason})
                continue
            rows.append(
                measure_case(workload, targets, jit_compile, sizes, log)
            )
    return {"status": "ok", "rows": rows}
