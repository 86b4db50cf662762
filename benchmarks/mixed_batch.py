"""Mixed-batch inference with 4 adapters vs one adapter vs 4 sub-batches.

The harness's BERT stack (`workloads.build_transformer`, sizes of
`benchmarks/sizes.py`) with 4 all-linear adapters of the harness's rank
(8 in a full run), their `lora_b` set to small random values. Timed
in alternation (`timing.interleave`), each a blocking `predict_on_batch`
of the same batch:

* `single_adapter`: the adapted model, one adapter active (unmerged).
* `mixed_batch`: `keras_lora.mixed_batch_model` over the 4 adapters, the
  examples spread over them (one pass).
* `sub_batches`: 4 calls of the single-adapter model on a quarter of the
  batch each (what a per-adapter split costs without any switch; a lower
  bound of PEFT-style sub-batching).

Then the cost of switching, once every adapter has run: `set_adapter(model,
next)` followed by the next `predict_on_batch`, against a
`predict_on_batch` without a switch, whether a switch made the model trace
its predict function again (it should not: traced functions are kept per
adapter state), and the first switch to each adapter, which traces.

    python -m benchmarks.mixed_batch            # full sizes
    python -m benchmarks.mixed_batch --quick    # tiny smoke run

Timing belongs on a quiet machine; the suite runs `--quick` only to check
the script works.
"""

import argparse
import json
import sys

import keras
import numpy as np

from benchmarks import sizes as sizes_module
from benchmarks import timing
from benchmarks import workloads

ADAPTERS = ("task_0", "task_1", "task_2", "task_3")
SINGLE = "single_adapter"
MIXED = "mixed_batch"
SUB_BATCHES = "sub_batches"
VARIANTS = (SINGLE, MIXED, SUB_BATCHES)
RATIOS = ((MIXED, SINGLE), (SUB_BATCHES, SINGLE), (MIXED, SUB_BATCHES))


def build(sizes, seed=1):
    """The BERT stack with the 4 adapters, `ADAPTERS[0]` active."""
    import keras_lora

    model, _ = workloads.build_transformer(sizes)

    def all_linear(path, layer):
        return workloads.is_target(layer, workloads.ALL_LINEAR)

    model = keras_lora.apply_lora(model, rank=sizes.rank, targets=all_linear,
                                  adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        keras_lora.add_adapter(model, name, rank=sizes.rank, targets=all_linear)
    rng = np.random.default_rng(seed)
    for layer in keras_lora.lora_layers(model).values():
        for adapter in layer.adapters.values():
            shape = tuple(adapter.lora_b.shape)
            adapter.lora_b.assign(
                0.05 * rng.standard_normal(shape).astype("float32")
            )
    return model


def batch(sizes, examples):
    """Token inputs for `examples` sequences and their adapter indices."""
    x, _ = workloads.transformer_batch(
        sizes_module.Sizes(**{**sizes_module.as_dict(sizes),
                              "seq_batch": examples})
    )
    index = np.arange(examples, dtype="int32") % len(ADAPTERS)
    return x, index


def measure(sizes, examples, log):
    import keras_lora

    model = build(sizes)
    mixed = keras_lora.mixed_batch_model(model, list(ADAPTERS))
    x, index = batch(sizes, examples)
    quarter = examples // len(ADAPTERS)
    parts = [
        {key: value[k * quarter:(k + 1) * quarter] for key, value in x.items()}
        for k in range(len(ADAPTERS))
    ]
    model.compile()
    mixed.compile()
    mixed_inputs = dict(x, adapter_index=index)
    steps = {
        SINGLE: lambda: model.predict_on_batch(x),
        MIXED: lambda: mixed.predict_on_batch(mixed_inputs),
        SUB_BATCHES: lambda: [model.predict_on_batch(p) for p in parts],
    }
    # The examples routed to the active adapter match the plain model.
    single_out = np.asarray(steps[SINGLE]())
    mixed_out = np.asarray(steps[MIXED]())
    chosen = index == 0
    difference = float(np.max(np.abs(mixed_out[chosen] - single_out[chosen])))
    times = timing.interleave(steps, sizes.warmup, 2 * sizes.repeats + 1)
    row = {
        "workload": workloads.TRANSFORMER,
        "targets": workloads.ALL_LINEAR,
        "adapters": len(ADAPTERS),
        "rank": sizes.rank,
        "examples": examples,
        "median_ms": {k: timing.median_ms(v) for k, v in times.items()},
        "ratios": {
            f"{a}/{b}": timing.paired_ratio(times[a], times[b])
            for a, b in RATIOS
        },
        "max_abs_diff_mixed_vs_single": difference,
        "switching": switching(model, x, sizes),
    }
    log(
        "  " + " ".join(f"{k}={v:.1f}ms" for k, v in row["median_ms"].items())
        + " | " + " ".join(f"{k}={v:.3f}" for k, v in row["ratios"].items())
        + f" | switch+predict={row['switching']['switch_and_predict_ms']:.1f}ms"
        + f" vs predict={row['switching']['predict_ms']:.1f}ms"
        + f" (x{row['switching']['ratio']:.2f}, retraced="
        + f"{row['switching']['retraced']}; first switch "
        + f"{row['switching']['first_switch_ms']:.1f}ms)"
    )
    return row


def switching(model, x, sizes):
    """`set_adapter` + the next predict vs a predict, and whether it retraced.

    Every adapter first runs once (`first_switch_ms`: a switch to an adapter
    never run, which traces its predict function). The timed switches go
    round the adapters again: each restores the function traced for its
    adapter (`keras_lora/traced_cache.py`); `retraced` says whether any
    switch made a new one instead.
    """
    import keras_lora

    def switch_and_predict(name):
        keras_lora.set_adapter(model, name)
        return model.predict_on_batch(x)

    kept, first = {}, []
    model.predict_on_batch(x)
    kept[keras_lora.active_adapters(model)[0]] = model.predict_function
    for name in ADAPTERS:
        if name in kept:
            continue
        _, seconds = timing.time_once(lambda: switch_and_predict(name))
        first.append(seconds)
        kept[name] = model.predict_function
    plain, switched, retraced = [], [], False
    for round_index in range(2 * sizes.repeats + 1):
        _, seconds = timing.time_once(lambda: model.predict_on_batch(x))
        plain.append(seconds)
        name = ADAPTERS[round_index % len(ADAPTERS)]
        _, seconds = timing.time_once(lambda: switch_and_predict(name))
        switched.append(seconds)
        retraced = retraced or model.predict_function is not kept[name]
    return {
        "predict_ms": timing.median_ms(plain),
        "switch_and_predict_ms": timing.median_ms(switched),
        "ratio": timing.paired_ratio(switched, plain),
        "first_switch_ms": timing.median_ms(first),
        "retraced": bool(retraced),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, seconds long (a smoke test)")
    parser.add_argument("--examples", type=int, default=None,
                        help="batch size (a multiple of 4; default 8, "
                             "--quick 4)")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    sizes = sizes_module.sizes_for(args.quick)
    examples = args.examples or (4 if args.quick else 8)
    if examples % len(ADAPTERS):
        parser.error(f"--examples must be a multiple of {len(ADAPTERS)}. "
                     f"Received: {examples}")
    log = print
    log(f"mixed batch, backend {keras.backend.backend()}")
    results = {
        "backend": keras.backend.backend(),
        "sizes": sizes_module.as_dict(sizes),
        "rows": [measure(sizes, examples, log)],
    }
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
