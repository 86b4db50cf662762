"""Peak process memory of a short training run: full, LoRA, DoRA.

Peak RSS only ever grows, so each variant trains in a fresh process: this
file, run as a script. `run.py` starts those processes itself, not from a
backend worker: on Linux a child's `ru_maxrss` starts from its parent's
peak at `fork`, so a child of a multi-GiB worker would report the worker's
memory. This module imports no backend at import time for the same reason.

Each process reports `ru_maxrss` (`resource.getrusage`) and the kernel's
own marks from `/proc/self/status`: VmRSS before and after training and
VmHWM (the peak since `exec`, which no parent inflates).
"""

import json
import os
import subprocess
import sys

# Run as a script, this file needs the repository root on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import names  # noqa: E402

# Peak RSS is measured on one case: the BERT stack in a full run, the MLP
# in a quick run (its processes then need no keras-hub import).
RSS_CASES = {
    False: (names.TRANSFORMER, names.ALL_LINEAR),
    True: (names.MLP, names.ALL_LINEAR),
}


def _full(model, targets, rank):
    return model


def _lora(model, targets, rank):
    from benchmarks import variants

    return variants.adapt_with_keras_lora(model, targets, rank)[0]


def _dora(model, targets, rank):
    import keras_lora

    from benchmarks import workloads

    # apply_lora freezes the base itself and trains A, B and the magnitude.
    return keras_lora.apply_lora(
        model, rank=rank, use_dora=True,
        targets=lambda path, layer: workloads.is_target(layer, targets),
    )


# How each variant adapts the freshly built model: `(model, targets, rank)
# -> model`, run in the variant's own process (so imports stay inside). A
# quantized base is one more row: quantize, then adapt.
ADAPTERS = {
    names.FULL: _full,
    names.KERAS_LORA: _lora,
    names.KERAS_DORA: _dora,
}
RSS_VARIANTS = tuple(ADAPTERS)
# A quick run (the smoke test) starts one process per variant here: the
# variants whose machinery it checks, no more (DoRA's builder is tested
# in-process).
QUICK_RSS_VARIANTS = (names.FULL, names.KERAS_LORA)


def peak_rss(quick, env, log, steps):
    """Memory of a short training run per variant, one process each.

    Args:
        quick: use the tiny sizes.
        env: the environment of the child processes (`KERAS_BACKEND`, thread
            limits).
        log: a `print`-like function.
        steps: the number of training steps each process runs.

    Returns:
        The memory section of a backend's results.
    """
    rows = {}
    for variant in QUICK_RSS_VARIANTS if quick else RSS_VARIANTS:
        command = [sys.executable, os.path.abspath(__file__), "--variant",
                   variant] + (["--quick"] if quick else [])
        done = subprocess.run(
            command, capture_output=True, text=True, env=_child_env(env)
        )
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-3:]
            rows[variant] = {"error": " | ".join(tail)}
            log(f"  memory {variant}: FAILED {tail}")
            continue
        rows[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        log(f"  memory {variant}: {rows[variant]}")
    workload, targets = RSS_CASES[quick]
    return {
        "status": "ok",
        "peak_rss": {
            "workload": workload,
            "targets": targets,
            "steps": steps,
            "variants": rows,
        },
    }


def _child_env(env):
    env = dict(env)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def status_mib(field):
    """A memory field of /proc/self/status (VmRSS, VmHWM), in MiB."""
    with open("/proc/self/status") as file:
        for line in file:
            name, _, value = line.partition(":")
            if name == field:
                return int(value.split()[0]) / 1024.0
    raise KeyError(field)


def build_variant(variant, quick):
    """The compiled model of one peak-RSS variant, and its training batch.

    Args:
        variant: a key of `ADAPTERS`.
        quick: use the tiny sizes (the MLP).

    Returns:
        `(model, x, y)`.
    """
    from benchmarks import sizes as sizes_module
    from benchmarks import training
    from benchmarks import workloads

    sizes = sizes_module.sizes_for(quick)
    workload, targets = RSS_CASES[quick]
    if workload == workloads.MLP:
        model = workloads.build_mlp(sizes)
    else:
        model, _ = workloads.build_transformer(sizes)
    model = ADAPTERS[variant](model, targets, sizes.rank)
    training.compiled(model, "auto")
    x, y = training.batch_for(workload, sizes)
    return model, x, y


def _measure_one(variant, quick):
    """Trains one variant briefly; prints its memory figures as JSON."""
    import resource

    from benchmarks import sizes as sizes_module
    from benchmarks import threads

    threads.limit_torch()
    sizes = sizes_module.sizes_for(quick)
    model, x, y = build_variant(variant, quick)
    rss_built = status_mib("VmRSS")
    for _ in range(sizes.memory_steps):
        model.train_on_batch(x, y)
    rss_trained = status_mib("VmRSS")
    figures = {
        "rss_after_build_mib": rss_built,
        "rss_after_training_mib": rss_trained,
        "training_growth_mib": rss_trained - rss_built,
        "peak_rss_mib": status_mib("VmHWM"),
        # Linux reports ru_maxrss in KiB.
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        / 1024.0,
    }
    print(json.dumps({k: round(v, 1) for k, v in figures.items()}))


if __name__ == "__main__":
    import argparse

    from benchmarks import threads as _threads

    _threads.limit_from_environment()
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", required=True, choices=RSS_VARIANTS)
    parser.add_argument("--quick", action="store_true")
    arguments = parser.parse_args()
    _measure_one(arguments.variant, arguments.quick)
