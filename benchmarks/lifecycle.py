"""One-off costs: `apply_lora` by depth, adapter save/load, merge."""

import os
import tempfile

from benchmarks import timing
from benchmarks import variants
from benchmarks import workloads


def _all_linear(path, layer):
    return workloads.is_target(layer, workloads.ALL_LINEAR)


def apply_lora_times(sizes, log):
    """`apply_lora` (all-linear targets) on BERT backbones of each depth."""
    apply_lora, why_not = variants.apply_lora_or_reason()
    if apply_lora is None:
        log(f"  skipped: {why_not}")
        return {"status": "skipped", "reason": why_not}
    from keras_lora import lora_layers

    # The first call pays one-off costs (tracing the initializers); keep
    # them out of the depth comparison.
    apply_lora(workloads.build_backbone(sizes, num_layers=1), rank=sizes.rank,
               targets=_all_linear)
    rows = []
    for depth in sizes.apply_lora_layers:
        backbone = workloads.build_backbone(sizes, num_layers=depth)
        _, seconds = timing.time_once(
            lambda: apply_lora(backbone, rank=sizes.rank, targets=_all_linear)
        )
        adapted = len(lora_layers(backbone))
        rows.append(
            {
                "num_layers": depth,
                "adapted_layers": adapted,
                "seconds": seconds,
                "ms_per_adapted_layer": 1000.0 * seconds / max(adapted, 1),
            }
        )
        log(f"  apply_lora {depth:2d} layers: {seconds:.3f}s ({adapted} adapted)")
    return {"status": "ok", "rows": rows}


def _adapter_functions():
    try:
        from keras_lora import load_adapter
        from keras_lora import merge_lora
        from keras_lora import save_adapter
    except ImportError as error:
        return None, (
            "keras_lora.save_adapter / load_adapter / merge_lora are not "
            f"all importable ({error})"
        )
    return (save_adapter, load_adapter, merge_lora), None


def adapter_io(sizes, log):
    """Save, load and merge times and the adapter file size (BERT)."""
    functions, why_not = _adapter_functions()
    if functions is None:
        log(f"  skipped: {why_not}")
        return {"status": "skipped", "reason": why_not}
    save_adapter, load_adapter, merge_lora = functions
    model, _ = variants.build(
        workloads.TRANSFORMER, variants.KERAS_LORA, workloads.ALL_LINEAR, sizes
    )
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "adapter.safetensors")
        _, save_s = timing.time_once(lambda: save_adapter(model, path))
        # The saved artifact may be a file or a folder.
        size = _size_on_disk(path)
        _, load_s = timing.time_once(lambda: load_adapter(model, path))
    _, merge_s = timing.time_once(lambda: merge_lora(model))
    adapter_bytes = sum(
        v.numpy().nbytes for v in variants.adapter_variables(
            model, variants.KERAS_LORA)
    )
    row = {
        "status": "ok",
        "workload": workloads.TRANSFORMER,
        "targets": workloads.ALL_LINEAR,
        "save_seconds": save_s,
        "load_seconds": load_s,
        "merge_seconds": merge_s,
        "file_bytes": size,
        "adapter_tensor_bytes": int(adapter_bytes),
    }
    log(
        f"  save {save_s:.3f}s load {load_s:.3f}s merge {merge_s:.3f}s "
        f"file {size} B (tensors {adapter_bytes} B)"
    )
    return row


def _size_on_disk(path):
    if os.path.isdir(path):
        return sum(
            os.path.getsize(os.path.join(root, name))
            for root, _, names in os.walk(path)
            for name in names
        )
    return os.path.getsize(path)


def run(sizes, log):
    return {
        "apply_lora": apply_lora_times(sizes, log),
        "adapter_io": adapter_io(sizes, log),
    }
