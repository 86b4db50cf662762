"""DoRA vs LoRA training step, keras-lora and (on torch) PEFT, in one run.

    python benchmarks/dora.py [--quick]     # one backend: $KERAS_BACKEND

Per workload (the harness's MLP, all-linear, and BERT config, all-linear)
and jit mode, keras-lora LoRA and keras-lora DoRA step in alternation (the
harness's interleaving: medians of per-round ratios). On torch the same MLP
also runs in PEFT, LoRA and `use_dora=True`, so keras-lora's DoRA/LoRA
ratio stands beside PEFT's own. Prints one JSON document.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402

from benchmarks import peft_torch  # noqa: E402
from benchmarks import sizes as sizes_module  # noqa: E402
from benchmarks import timing  # noqa: E402
from benchmarks import training  # noqa: E402
from benchmarks import workloads  # noqa: E402


def _adapted(workload, sizes, use_dora):
    import keras_lora

    if workload == workloads.MLP:
        model = workloads.build_mlp(sizes)
    else:
        model, _ = workloads.build_transformer(sizes)
    targets = lambda path, layer: workloads.is_target(layer, workloads.ALL_LINEAR)  # noqa: E731
    keras_lora.apply_lora(model, rank=sizes.rank, targets=targets, use_dora=use_dora)
    return model


def keras_rows(sizes, quick=False):
    rows = {}
    # The smoke test (quick) checks the mechanics on the MLP, jit only.
    cases = (workloads.MLP,) if quick else (workloads.MLP, workloads.TRANSFORMER)
    for workload in cases:
        x, y = training.batch_for(workload, sizes)
        for jit in (sizes.jit_modes[:1] if quick else sizes.jit_modes):
            steps = {
                name: training.train_step_fn(
                    training.compiled(_adapted(workload, sizes, dora), jit), x, y
                )
                for name, dora in (("lora", False), ("dora", True))
            }
            times = timing.interleave(steps, sizes.warmup + 1, sizes.repeats)
            rows[f"{workload}/all-linear/jit={jit}"] = {
                "median_ms": {k: timing.median_ms(v) for k, v in times.items()},
                "dora/lora": timing.paired_ratio(times["dora"], times["lora"]),
            }
    return rows


def peft_rows(sizes):
    if keras.backend.backend() != "torch":
        return {"status": "skipped", "reason": "torch backend only"}
    import peft

    def build(use_dora):
        import torch

        model = peft_torch.torch_mlp(sizes)
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        return peft.get_peft_model(model, peft.LoraConfig(
            r=sizes.rank, lora_alpha=sizes.rank, target_modules=names,
            use_dora=use_dora,
        ))

    x, y = workloads.mlp_batch(sizes)
    steps = {
        "peft_lora": peft_torch.torch_step_fn(build(False), x, y),
        "peft_dora": peft_torch.torch_step_fn(build(True), x, y),
    }
    times = timing.interleave(steps, sizes.warmup + 1, sizes.repeats)
    return {
        "median_ms": {k: timing.median_ms(v) for k, v in times.items()},
        "peft_dora/peft_lora": timing.paired_ratio(times["peft_dora"], times["peft_lora"]),
    }


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    quick = "--quick" in argv
    sizes = sizes_module.sizes_for(quick)
    result = {
        "backend": keras.backend.backend(),
        "keras_lora": keras_rows(sizes, quick),
        "peft_mlp": peft_rows(sizes),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
