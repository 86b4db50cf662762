"""Peak process memory of a short training run, full vs keras-lora.

`ru_maxrss` only ever grows, so each variant needs a fresh process:
`peak_rss` runs this file as a script once per variant.
"""

import json
import os
import subprocess
import sys

from benchmarks import training
from benchmarks import variants
from benchmarks import workloads

# Peak RSS is measured on one case: the BERT stack in a full run, the MLP
# in a quick run (its processes then need no keras-hub import).
RSS_CASES = {
    False: (workloads.TRANSFORMER, workloads.ALL_LINEAR),
    True: (workloads.MLP, workloads.ALL_LINEAR),
}
RSS_VARIANTS = (variants.FULL, variants.KERAS_LORA)


def peak_rss(sizes, quick, log):
    """Peak RSS of a short training run per variant, one process each."""
    rows = {}
    for variant in RSS_VARIANTS:
        command = [
            sys.executable,
            os.path.abspath(__file__),
            "--variant",
            variant,
        ] + (["--quick"] if quick else [])
        done = subprocess.run(
            command, capture_output=True, text=True, env=_child_env()
        )
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-3:]
            rows[variant] = {"error": " | ".join(tail)}
            log(f"  peak RSS {variant}: FAILED {tail}")
            continue
        rows[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        log(f"  peak RSS {variant}: {rows[variant]}")
    workload, targets = RSS_CASES[quick]
    return {
        "workload": workload,
        "targets": targets,
        "steps": sizes.memory_steps,
        "variants": rows,
    }


def _child_env():
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run(sizes, quick, log):
    """Peak RSS per variant. (Exact byte counts come with each training
    row: they are taken from the very models that were timed.)"""
    return {"status": "ok", "peak_rss": peak_rss(sizes, quick, log)}


def _measure_one(variant, quick):
    """Trains one variant briefly; prints its RSS figures as JSON."""
    import resource

    from benchmarks import sizes as sizes_module

    sizes = sizes_module.sizes_for(quick)
    workload, targets = RSS_CASES[quick]

    def max_rss_mb():
        # Linux reports ru_maxrss in KiB.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    model, _ = variants.build(workload, variant, targets, sizes)
    training.compiled(model, "auto")
    x, y = training.batch_for(workload, sizes)
    before = max_rss_mb()
    for _ in range(sizes.memory_steps):
        model.train_on_batch(x, y)
    after = max_rss_mb()
    print(
        json.dumps(
            {
                "peak_rss_mb_after_build": round(before, 1),
                "peak_rss_mb_after_training": round(after, 1),
                "training_growth_mb": round(after - before, 1),
            }
        )
    )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", required=True, choices=RSS_VARIANTS)
    parser.add_argument("--quick", action="store_true")
    arguments = parser.parse_args()
    _measure_one(arguments.variant, arguments.quick)
