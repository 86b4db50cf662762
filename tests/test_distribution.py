"""LoRA across devices: adapter layouts follow the kernel, and training on a
mesh, data-parallel or mirrored, matches training on one device.

The multi-device runs need devices configured before the backend starts, so
each runs in one subprocess: the JAX mesh check (8 simulated CPU devices)
in the JAX suite run, the `MirroredStrategy` check (2 logical CPUs) in the
TensorFlow run, and `DistributedDataParallel` over two gloo processes in the
PyTorch run (Keras's distribution API is JAX-only). The layout rule and
`extend_layout_map` are pure and run everywhere.
"""

import json
import os
import subprocess
import sys

import keras
import keras_hub
import numpy as np
import pytest

import keras_lora
from keras_lora.distribution import adapter_axes
from keras_lora.distribution import extend_layout_map
from keras_lora.distribution import kernel_axes_of
from tiny_gemma import CONFIG as GEMMA
from tiny_gemma import QUERY

BACKEND = keras.backend.backend()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def string_mesh(shape=(2, 4)):
    """A mesh of device names: enough for layout maps on any backend."""
    devices = [f"cpu:{i}" for i in range(int(np.prod(shape)))]
    return keras.distribution.DeviceMesh(shape, ("batch", "model"), devices)


def adapted_gemma():
    backbone = keras_hub.models.GemmaBackbone(**GEMMA)
    return keras_lora.apply_lora(backbone, rank=2)


def run_check(script, timeout=900):
    """Runs a check script in a fresh interpreter, returns its JSON line."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (ROOT, env.get("PYTHONPATH")) if p
    )
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        pytest.fail(f"{script} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# The layout rule (pure, every backend) -----------------------------------


def test_dense_adapters_shard_a_on_input_axis_and_b_on_output_axis():
    # lora_a is rank-first: (rank, d_in).
    assert adapter_axes(("batch", "model"), (0,), (1,)) == (
        (None, "batch"),
        (None, "model"),
    )


def test_einsum_adapters_take_kernel_axes_in_kernel_order():
    # Gemma's query kernel (heads, hidden, head_dim), "btd,ndh->btnh".
    assert adapter_axes(("model", "batch", None), (1,), (0, 2)) == (
        (None, "batch"),
        (None, "model", None),
    )


def test_replicated_kernel_gives_replicated_adapters():
    assert adapter_axes((None, None, None), (0,), (1, 2)) == (
        (None, None),
        (None, None, None),
    )


def test_adapter_axes_rejects_a_layout_of_the_wrong_rank():
    with pytest.raises(ValueError, match=r"kernel_axes=\('model',\)"):
        adapter_axes(("model",), (0,), (1,))


def test_kernel_axes_come_from_the_einsum_equation():
    layer = keras.layers.EinsumDense("btd,ndh->btnh", (None, 4, 8))
    layer.build((2, 3, 16))
    lora = keras_lora.LoRAEinsumDense.from_layer(layer, rank=2)
    assert kernel_axes_of(lora) == ((1,), (0, 2))


def test_dense_kernel_axes_are_input_then_output():
    layer = keras.layers.Dense(4)
    layer.build((None, 8))
    lora = keras_lora.LoRADense.from_layer(layer, rank=2)
    assert kernel_axes_of(lora) == ((0,), (1,))


# extend_layout_map (every backend: reads paths and shapes only) ----------


def test_extend_layout_map_derives_adapter_entries_from_kernel_entries():
    layout_map = keras_hub.models.GemmaBackbone.get_layout_map(string_mesh())
    extend_layout_map(layout_map, adapted_gemma())
    assert layout_map[f"{QUERY}/lora_a"].axes == (None, "batch")
    assert layout_map[f"{QUERY}/lora_b"].axes == (None, "model", None)
    linear = "decoder_block_0/ffw_linear"
    assert layout_map[f"{linear}/lora_a"].axes == (None, "model")
    assert layout_map[f"{linear}/lora_b"].axes == (None, "batch")


def test_extend_layout_map_shields_adapters_from_loose_regexes():
    layout_map = keras.distribution.LayoutMap(string_mesh())
    layout_map[".*query.*"] = ("model", "batch", None)
    assert len(layout_map[f"{QUERY}/lora_a"].axes) == 3  # keras#19496
    extend_layout_map(layout_map, adapted_gemma())
    assert layout_map[f"{QUERY}/lora_a"].axes == (None, "batch")
    assert layout_map[f"{QUERY}/kernel"].axes == ("model", "batch", None)


def test_extend_layout_map_replicates_adapters_of_unmapped_kernels():
    layout_map = keras.distribution.LayoutMap(string_mesh())
    extend_layout_map(layout_map, adapted_gemma())
    assert layout_map["decoder_block_0/ffw_gating/lora_b"].axes == (
        None,
        None,
    )


def test_extend_layout_map_keeps_a_matching_entry_and_rejects_a_conflict():
    layout_map = keras_hub.models.GemmaBackbone.get_layout_map(string_mesh())
    layout_map[f"{QUERY}/lora_a"] = (None, "batch")
    extend_layout_map(layout_map, adapted_gemma())  # same layout: kept
    conflicting = keras_hub.models.GemmaBackbone.get_layout_map(string_mesh())
    conflicting[f"{QUERY}/lora_a"] = (None, "model")
    with pytest.raises(ValueError, match=f"'{QUERY}/lora_a'.*'batch'"):
        extend_layout_map(conflicting, adapted_gemma())


# Automatic placement at creation (JAX, in process, one-device mesh) --------


@pytest.mark.backend("jax")  # keras.distribution is JAX-only in Keras 3
def test_adapters_created_under_model_parallel_follow_kernel_not_regex():
    mesh = keras.distribution.DeviceMesh(
        (1, 1), ("batch", "model"), keras.distribution.list_devices()[:1]
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*query.*"] = ("batch", None, "model")
    distribution = keras.distribution.ModelParallel(layout_map=layout_map)
    with distribution.scope():
        inputs = keras.Input((5, 4))
        query = keras.layers.EinsumDense(
            "btd,dnh->btnh", (5, 2, 3), name="query"
        )
        model = keras.Model(inputs, query(inputs))
        keras_lora.apply_lora(model, rank=2)
    lora = keras_lora.lora_layers(model)["query"]
    assert distribution.get_variable_layout(lora.lora_a).axes == (
        None,
        "batch",
    )
    assert distribution.get_variable_layout(lora.lora_b).axes == (
        None,
        None,
        "model",
    )


# Training across devices ---------------------------------------------------


@pytest.fixture(scope="module")
def jax_mesh_run():
    return run_check("distributed_jax_check.py")


@pytest.mark.backend("jax")
@pytest.mark.parametrize(
    "run", ["model_parallel", "data_parallel"],
    ids=["model_parallel_2x4", "data_parallel_8"],
)
def test_mesh_loss_equals_single_device(jax_mesh_run, run):
    np.testing.assert_allclose(
        jax_mesh_run[f"{run}_losses"],
        jax_mesh_run["single_losses"],
        rtol=1e-5,
    )
    assert jax_mesh_run[f"{run}_adapter_max_diff"] < 1e-4


@pytest.mark.backend("jax")
def test_mesh_training_learns(jax_mesh_run):
    losses = jax_mesh_run["model_parallel_losses"]
    assert losses[-1] < losses[0]
    assert jax_mesh_run["adapter_change"] > 1e-2


@pytest.mark.backend("jax")
def test_adapters_on_the_mesh_are_sharded_like_their_kernel(jax_mesh_run):
    specs = jax_mesh_run["specs"]
    assert specs[f"{QUERY}/kernel"] == ["model", "batch", None]
    assert specs[f"{QUERY}/lora_a"] == [None, "batch"]
    assert specs[f"{QUERY}/lora_b"] == [None, "model", None]
    assert specs["decoder_block_0/ffw_linear/lora_a"] == [None, "model"]
    assert specs["decoder_block_0/ffw_linear/lora_b"] == [None, "batch"]


@pytest.mark.backend("jax")
def test_loose_user_regex_does_not_reach_adapters_on_the_mesh(jax_mesh_run):
    assert jax_mesh_run["loose_map_specs"] == {
        f"{QUERY}/lora_a": [None, "batch"],
        f"{QUERY}/lora_b": [None, "model", None],
    }


@pytest.mark.backend("jax")
def test_adapter_from_the_mesh_reloads_on_one_device(jax_mesh_run):
    assert jax_mesh_run["reload_devices"] == ["cpu:0"]
    assert jax_mesh_run["reload_max_diff"] < 1e-5


@pytest.mark.backend("jax")
def test_merged_sharded_kernel_is_float32_w_plus_delta(jax_mesh_run):
    assert jax_mesh_run["merged_kernel_dtype"] == "float32"
    assert jax_mesh_run["merged_kernel_max_diff"] < 1e-6


@pytest.mark.backend("jax")
def test_loading_and_merging_on_the_mesh_keep_every_layout(jax_mesh_run):
    assert jax_mesh_run["after_load_and_merge_specs"] == jax_mesh_run["specs"]
    assert jax_mesh_run["merged_model_max_diff"] < 1e-5


@pytest.fixture(scope="module")
def mirrored_run():
    return run_check("distributed_tf_check.py")


@pytest.mark.backend("tensorflow")
def test_mirrored_strategy_trains_with_mirrored_adapters(mirrored_run):
    assert mirrored_run["replicas"] == 2
    assert mirrored_run["adapter_is_mirrored"]
    losses = mirrored_run["mirrored_losses"]
    assert losses[-1] < losses[0]
    assert mirrored_run["adapter_change"] > 1e-3


@pytest.mark.backend("tensorflow")
def test_mirrored_strategy_loss_equals_single_device(mirrored_run):
    np.testing.assert_allclose(
        mirrored_run["mirrored_losses"],
        mirrored_run["single_losses"],
        rtol=1e-5,
    )
    assert mirrored_run["adapter_max_diff"] < 1e-5


@pytest.fixture(scope="module")
def ddp_run():
    return run_check("distributed_torch_check.py")


@pytest.mark.backend("torch")
def test_torch_ddp_trains_adapters_only_and_replicas_agree(ddp_run):
    assert ddp_run["trainable_tensors"] == 4  # two A/B pairs, nothing else
    assert ddp_run["replicas_agree"]
    assert ddp_run["adapter_change"] > 1e-2


@pytest.mark.backend("torch")
def test_torch_ddp_on_two_processes_equals_one_process(ddp_run):
    np.testing.assert_allclose(
        ddp_run["ddp_losses"], ddp_run["single_losses"], rtol=1e-5
    )
    assert ddp_run["adapter_max_diff"] < 1e-5


def test_fit_on_one_device_trains_only_adapters():
    # The recipe for PyTorch (and any backend on a single accelerator).
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8)).astype("float32")
    y = x @ rng.normal(size=(8, 3)).astype("float32")
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(16, activation="tanh", name="hidden")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, name="out")(hidden))
    keras_lora.apply_lora(model, rank=2)
    kernels = [keras.ops.convert_to_numpy(v) for v in model.weights
               if v.path.endswith("kernel")]
    model.compile(optimizer=keras.optimizers.Adam(3e-2), loss="mse")
    losses = model.fit(x, y, epochs=15, batch_size=32, verbose=0)
    losses = losses.history["loss"]
    assert losses[-1] < 0.7 * losses[0]
    after = [keras.ops.convert_to_numpy(v) for v in model.weights
             if v.path.endswith("kernel")]
    for before, now in zip(kernels, after):
        np.testing.assert_array_equal(before, now)
