"""LoRA under keras.distribution on 8 simulated CPU devices (JAX).

Run in a fresh process (`tests/test_distribution.py` does): the device count
must be set before JAX is imported. Prints one JSON line of measurements;
the test asserts on them, so a failure shows the numbers.

    python tests/distributed_jax_check.py [adapter_dir]

Compares, from the same initial weights and batches, a tiny Gemma causal LM
with LoRA trained on one device, under `ModelParallel` on a 2x4
("batch", "model") mesh with keras-hub's Gemma `LayoutMap`, and under
`DataParallel` over 8 devices. Then saves the sharded model's adapter and
loads it into a single-device model and back into the sharded one, and
merges it there.
"""

import os

_EIGHT_CPUS = "--xla_force_host_platform_device_count=8"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_EIGHT_CPUS}"
os.environ["KERAS_BACKEND"] = "jax"

import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

import keras_lora  # noqa: E402
from keras_lora.adapters import load_adapter  # noqa: E402
from keras_lora.adapters import save_adapter  # noqa: E402
from keras_lora.merge import merge_adapters  # noqa: E402
from tiny_gemma import CONFIG  # noqa: E402

STEPS = 3
BATCH, LENGTH = 8, 8


def base_model():
    # A fixed backbone name keeps LoRA layer paths equal across models.
    backbone = keras_hub.models.GemmaBackbone(name="gemma_backbone", **CONFIG)
    return keras_hub.models.GemmaCausalLM(backbone, preprocessor=None)


def build_model():
    model = base_model()
    keras_lora.apply_lora(model, rank=2, alpha=4)
    return model


def compile_model(model):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )


def batches():
    """The same batch `STEPS` times, so the loss must fall."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, CONFIG["vocabulary_size"], (BATCH, LENGTH + 1))
    x = {
        "token_ids": tokens[:, :-1].astype("int32"),
        "padding_mask": np.ones((BATCH, LENGTH), "bool"),
    }
    for _ in range(STEPS):
        yield x, tokens[:, 1:].astype("int32")


def train(model, weights):
    for variable in model.weights:
        variable.assign(weights[variable.path])
    compile_model(model)
    losses = [float(model.train_on_batch(x, y)) for x, y in batches()]
    return losses


def adapters(model):
    """`{variable path: value}` of every adapter (paths omit the model)."""
    return {
        variable.path: to_np(variable)
        for layer in keras_lora.lora_layers(model).values()
        for variable in (layer.lora_a, layer.lora_b)
    }


def spec_of(variable):
    """The variable's PartitionSpec as a list, one entry per axis."""
    spec = list(variable.value.sharding.spec)
    return spec + [None] * (len(variable.shape) - len(spec))


SPEC_PATHS = (
    "decoder_block_0/attention/query/kernel",
    "decoder_block_0/attention/query/lora_a",
    "decoder_block_0/attention/query/lora_b",
    "decoder_block_0/ffw_linear/lora_a",
    "decoder_block_0/ffw_linear/lora_b",
)


def specs(model):
    return {
        variable.path: spec_of(variable)
        for variable in model.weights
        if variable.path in SPEC_PATHS
    }


def to_np(x):
    return keras.ops.convert_to_numpy(x)


def max_diff(a, b):
    return float(max(np.max(np.abs(a[k] - b[k])) for k in a))


def save_and_reload(model, path, probe):
    """Saves `model`'s adapter, loads it into a fresh single-device model."""
    save_adapter(model, path)
    fresh = base_model()
    base = {v.path: to_np(v) for v in model.weights}
    for variable in fresh.weights:
        variable.assign(base[variable.path])
    load_adapter(fresh, path)
    reloaded = to_np(fresh.predict_on_batch(probe))
    on_mesh = to_np(model.predict_on_batch(probe))
    devices = sorted(str(d) for d in fresh.weights[0].value.devices())
    return float(np.max(np.abs(reloaded - on_mesh))), devices


def loose_layout_map_specs(mesh):
    """Adapter specs under a user's map whose keys also match adapters."""
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*query.*"] = ("model", "batch", None)
    layout_map[".*ffw_gating.*kernel"] = ("batch", "model")
    distribution = keras.distribution.ModelParallel(layout_map=layout_map)
    with distribution.scope():
        model = build_model()
    return {
        v.path: spec_of(v)
        for v in model.weights
        if v.path.startswith("decoder_block_0/attention/query/lora")
    }


def main(directory):
    keras.utils.set_random_seed(0)
    single = build_model()
    weights = {v.path: to_np(v) for v in single.weights}
    single_losses = train(single, weights)

    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), devices)
    layout_map = keras_hub.models.GemmaBackbone.get_layout_map(mesh)
    model_parallel = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )
    with model_parallel.scope():
        sharded = build_model()
        sharded_losses = train(sharded, weights)
        sharded_specs = specs(sharded)
    sharded_adapter_diff = max_diff(adapters(single), adapters(sharded))
    probe = next(batches())[0]
    adapter_path = os.path.join(directory, "adapter.safetensors")
    reload_diff, reload_devices = save_and_reload(sharded, adapter_path, probe)

    data_parallel = keras.distribution.DataParallel(devices=devices)
    with data_parallel.scope():
        replicated = build_model()
        data_parallel_losses = train(replicated, weights)

    # Merging a sharded layer keeps the kernel's sharding and dtype.
    query = keras_lora.lora_layers(sharded)[
        "gemma_backbone/decoder_block_0/attention/query"
    ]
    merged = query.merged_kernel()
    expected = weights[query.kernel.path] + to_np(query.delta_kernel())
    with model_parallel.scope():
        unmerged_out = to_np(sharded.predict_on_batch(probe))
        # Loading into the model on the mesh keeps the adapter layouts.
        load_adapter(sharded, adapter_path)
        merge_adapters(sharded)
        merged_out = to_np(sharded.predict_on_batch(probe))
        after_merge_specs = specs(sharded)

    single_adapters = adapters(single)
    result = {
        "devices": len(devices),
        "single_losses": single_losses,
        "model_parallel_losses": sharded_losses,
        "data_parallel_losses": data_parallel_losses,
        "model_parallel_adapter_max_diff": sharded_adapter_diff,
        "data_parallel_adapter_max_diff": max_diff(
            single_adapters, adapters(replicated)
        ),
        "adapter_change": max_diff(single_adapters, weights),
        "specs": sharded_specs,
        "loose_map_specs": loose_layout_map_specs(mesh),
        "reload_max_diff": reload_diff,
        "reload_devices": reload_devices,
        "after_load_and_merge_specs": after_merge_specs,
        "merged_model_max_diff": float(
            np.max(np.abs(merged_out - unmerged_out))
        ),
        "merged_kernel_dtype": str(merged.dtype),
        "merged_kernel_max_diff": float(
            np.max(np.abs(to_np(merged) - expected))
        ),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as directory:
            main(directory)
