"""LoRA on int8 / int4 bases (Keras's `model.quantize`) vs a float32 base.

    python benchmarks/quantized.py [--quick]     # one backend: $KERAS_BACKEND

In one run, per backend (one process; the harness's style):

- weight bytes: the exact bytes (shape × dtype size) of the adapted
  model's base weights on float32, int8 and int4 bases, the adapter bytes,
  and each base against the float32 model (the issue's targets: int8
  ≤ 0.27×, int4 ≤ 0.16×, adapters excluded);
- step time: float-base, int8-base and int4-base LoRA training steps in
  alternation (interleaved rounds, medians of per-round ratios) on the
  harness's MLP and BERT configs, all linear layers adapted;
- peak RSS of a short training run, one fresh process per variant (full
  fine-tuning, float LoRA, int8 LoRA, int4 LoRA), as `benchmarks/memory.py`
  measures it.

`--quick` uses the harness's tiny sizes (a smoke run: its figures say
nothing about speed). Prints one JSON document.
"""

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


BASES = ("float32", "int8", "int4")
RSS_VARIANTS = ("full", "float32_lora", "int8_lora", "int4_lora")


def build(workload, sizes, base, adapt=True):
    """The harness's model, quantized as `base` says, then LoRA-adapted."""
    import keras_lora

    from benchmarks import workloads

    if workload == workloads.MLP:
        model = workloads.build_mlp(sizes)
    else:
        model, _ = workloads.build_transformer(sizes)
    if base != "float32":
        model.quantize(base)
    if adapt:
        keras_lora.apply_lora(
            model, rank=sizes.rank,
            targets=lambda path, layer: workloads.is_target(layer, workloads.ALL_LINEAR),
        )
    return model


def weight_bytes(workloads_to_run, sizes):
    """Exact weight bytes per base: base weights, adapters, ratio to float32."""
    from benchmarks import training

    rows = {}
    for workload in workloads_to_run:
        plain = build(workload, sizes, "float32", adapt=False)
        float_bytes = training.variable_bytes(plain.weights)
        row = {"float32_model_bytes": float_bytes}
        for base in BASES:
            model = build(workload, sizes, base)
            adapters = [v for v in model.weights if "lora_" in v.path]
            ids = {id(v) for v in adapters}
            base_bytes = training.variable_bytes(
                [v for v in model.weights if id(v) not in ids]
            )
            row[base] = {
                "base_bytes": base_bytes,
                "adapter_bytes": training.variable_bytes(adapters),
                "base/float32_model": round(base_bytes / float_bytes, 4),
            }
        rows[workload] = row
    return rows


def step_times(workloads_to_run, sizes, quick):
    """Interleaved float / int8 / int4-base LoRA steps, per workload and jit."""
    from benchmarks import timing
    from benchmarks import training

    rows = {}
    for workload in workloads_to_run:
        x, y = training.batch_for(workload, sizes)
        for jit in sizes.jit_modes[:1] if quick else sizes.jit_modes:
            steps = {
                base: training.train_step_fn(
                    training.compiled(build(workload, sizes, base), jit), x, y
                )
                for base in BASES
            }
            times = timing.interleave(steps, sizes.warmup + 1, sizes.repeats)
            rows[f"{workload}/all-linear/jit={jit}"] = {
                "median_ms": {k: timing.median_ms(v) for k, v in times.items()},
                "int8/float32": timing.paired_ratio(times["int8"], times["float32"]),
                "int4/float32": timing.paired_ratio(times["int4"], times["float32"]),
            }
    return rows


def peak_rss(quick):
    """One fresh process per variant (see `benchmarks/memory.py` for why)."""
    rows = {}
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    for variant in RSS_VARIANTS:
        command = [sys.executable, os.path.abspath(__file__), "--variant",
                   variant] + (["--quick"] if quick else [])
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            rows[variant] = {"error": " | ".join(done.stderr.strip().splitlines()[-3:])}
            continue
        rows[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    return rows


def _measure_rss(variant, quick):
    import resource

    from benchmarks import memory
    from benchmarks import sizes as sizes_module
    from benchmarks import training
    from benchmarks import workloads

    sizes = sizes_module.sizes_for(quick)
    workload = workloads.MLP if quick else workloads.TRANSFORMER
    if variant == "full":
        model = build(workload, sizes, "float32", adapt=False)
    else:
        model = build(workload, sizes, variant.split("_")[0])
    training.compiled(model, "auto")
    x, y = training.batch_for(workload, sizes)
    for _ in range(sizes.memory_steps):
        model.train_on_batch(x, y)
    print(json.dumps({
        "workload": workload,
        "peak_rss_mib": round(memory.status_mib("VmHWM"), 1),
        "ru_maxrss_mib": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
    }))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    quick = "--quick" in argv
    import keras

    from benchmarks import sizes as sizes_module
    from benchmarks import workloads

    sizes = sizes_module.sizes_for(quick)
    cases = (workloads.MLP,) if quick else (workloads.MLP, workloads.TRANSFORMER)
    result = {
        "backend": keras.backend.backend(),
        "quick": quick,
        "weight_bytes": weight_bytes(cases, sizes),
        "step_time": step_times(cases, sizes, quick),
        "peak_rss": peak_rss(quick),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    if "--variant" in sys.argv:
        from benchmarks import threads

        threads.limit_from_environment()
        _measure_rss(sys.argv[sys.argv.index("--variant") + 1], "--quick" in sys.argv)
    else:
        main()
