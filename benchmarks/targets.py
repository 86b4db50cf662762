"""The performance targets of the benchmark issue, checked against results."""

from benchmarks import names as workloads
from benchmarks.names import ratio_key

LORA_FULL = ratio_key(workloads.KERAS_LORA, workloads.FULL)
LORA_BUILTIN = ratio_key(workloads.KERAS_LORA, workloads.KERAS_ENABLE_LORA)

# (workload, targets, ratio key, limit, label)
STEP_TARGETS = (
    (workloads.MLP, workloads.ALL_LINEAR, LORA_FULL, 0.70,
     "MLP: keras-lora ≤ 0.70 × full"),
    (workloads.MLP, workloads.ALL_LINEAR, LORA_BUILTIN, 0.70,
     "MLP: keras-lora ≤ 0.70 × Keras enable_lora"),
    (workloads.TRANSFORMER, workloads.ALL_LINEAR, LORA_FULL, 0.70,
     "BERT all-linear: keras-lora ≤ 0.70 × full"),
    (workloads.TRANSFORMER, workloads.ALL_LINEAR, LORA_BUILTIN, 1.00,
     "BERT all-linear: keras-lora < Keras enable_lora"),
    (workloads.TRANSFORMER, workloads.QUERY_VALUE, LORA_FULL, 0.70,
     "BERT query/value: keras-lora ≤ 0.70 × full"),
    (workloads.TRANSFORMER, workloads.QUERY_VALUE, LORA_BUILTIN, 1.00,
     "BERT query/value: keras-lora < Keras enable_lora"),
)
PEFT_TARGET = (
    ratio_key(workloads.PEFT_KERAS_LORA, workloads.PEFT_LORA), 1.05,
    "torch MLP: keras-lora ≤ 1.05 × PEFT",
)
# (ratio key, limit, label, backends it applies to or None for all)
INFERENCE_TARGETS = (
    (ratio_key(workloads.MERGED, workloads.BASE), 1.03,
     "inference: merged within 3 % of base", None),
    (ratio_key(workloads.UNMERGED, workloads.BASE), 1.10,
     "inference: unmerged LoRA ≤ 1.10 × base", None),
    (ratio_key(workloads.UNMERGED, workloads.BASE), 1.05,
     "inference: torch unmerged LoRA ≤ 1.05 × base", ("torch",)),
)


def check(result):
    """Every target met or missed in one backend's results.

    Returns:
        A list of dicts: label, jit_compile (or `None`), value, limit, met.
    """
    sections = result["sections"]
    checks = []
    training_rows = sections.get("training", {}).get("rows", [])
    for workload, targets, key, limit, label in STEP_TARGETS:
        for row in training_rows:
            if (row["workload"], row["targets"]) != (workload, targets):
                continue
            value = row.get("ratios", {}).get(key)
            checks.append(_entry(label, row["jit_compile"], value, limit))
    peft = sections.get("peft", {})
    if peft.get("status") == "ok":
        key, limit, label = PEFT_TARGET
        checks.append(_entry(label, False, peft["ratios"][key], limit))
    for row in sections.get("inference", {}).get("rows", []):
        for key, limit, label, backends in INFERENCE_TARGETS:
            if backends is not None and result.get("backend") not in backends:
                continue
            value = row.get("ratios", {}).get(key)
            checks.append(
                _entry(f"{label} ({row['workload']})", None, value, limit)
            )
    return checks


def _entry(label, jit_compile, value, limit):
    met = None if value is None else value <= limit
    return {
        "label": label,
        "jit_compile": jit_compile,
        "value": value,
        "limit": limit,
        "met": met,
    }
