"""LoRA under mixed precision: the base computes in bfloat16, the adapters
are float32 variables that learn, and merging keeps the kernel's dtype."""

import os

import keras
import numpy as np
import pytest

import keras_lora

BACKEND = keras.backend.backend()


def to_np(x):
    return np.asarray(keras.ops.convert_to_numpy(x)).astype("float32")


@pytest.fixture
def mixed_bfloat16():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def make_model():
    """Dense and EinsumDense under the global policy, a float32 head."""
    inputs = keras.Input((8,))
    x = keras.layers.Dense(16, activation="tanh", name="hidden")(inputs)
    x = keras.layers.EinsumDense("ab,bc->ac", 16, name="proj")(x)
    outputs = keras.layers.Dense(3, name="head", dtype="float32")(x)
    return keras.Model(inputs, outputs)


def regression_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = np.tanh(x @ rng.normal(size=(8, 3))).astype("float32")
    return x, y


def random_b():
    return keras.initializers.RandomNormal(stddev=0.5, seed=3)


def test_base_computes_in_bfloat16_and_adapters_are_float32(mixed_bfloat16):
    model = keras_lora.apply_lora(make_model(), rank=2)
    hidden = keras_lora.lora_layers(model)["hidden"]
    assert hidden.compute_dtype == "bfloat16"
    assert hidden.kernel.dtype == "float32"  # mixed: float32 variables
    assert hidden.lora_a.dtype == "float32"
    assert hidden.lora_b.dtype == "float32"
    out = hidden(np.ones((2, 8), "float32"))
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"


def test_fresh_adapter_leaves_the_bfloat16_output_unchanged(mixed_bfloat16):
    model = make_model()
    x = np.random.default_rng(1).normal(size=(4, 8)).astype("float32")
    before = to_np(model.get_layer("hidden")(x))
    keras_lora.apply_lora(model, rank=2)
    after = to_np(keras_lora.lora_layers(model)["hidden"](x))
    np.testing.assert_array_equal(after, before)


def test_float32_head_stays_float32(mixed_bfloat16):
    model = keras_lora.apply_lora(make_model(), rank=2)
    head = keras_lora.lora_layers(model)["head"]
    assert head.compute_dtype == "float32"
    out = model(np.ones((2, 8), "float32"))
    assert keras.backend.standardize_dtype(out.dtype) == "float32"


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_training_in_mixed_precision_learns_and_keeps_float32(policy):
    # mixed_float16 also wraps the optimizer in a LossScaleOptimizer.
    x, y = regression_data()
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = keras_lora.apply_lora(make_model(), rank=2)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    kernel = to_np(model.get_layer("hidden").kernel)
    b_before = to_np(keras_lora.lora_layers(model)["proj"].lora_b)
    model.compile(optimizer=keras.optimizers.Adam(3e-2), loss="mse")
    history = model.fit(x, y, epochs=20, batch_size=64, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.5 * losses[0]
    proj = keras_lora.lora_layers(model)["proj"]
    assert np.max(np.abs(to_np(proj.lora_b) - b_before)) > 1e-2
    for variable in model.trainable_variables:
        assert variable.dtype == "float32", variable.path
    for variable in model.optimizer.variables:
        if "lora" in variable.path:
            assert variable.dtype == "float32", variable.path
    np.testing.assert_array_equal(
        to_np(model.get_layer("hidden").kernel), kernel
    )


def test_merged_kernel_of_float32_variable_base_is_float32(mixed_bfloat16):
    model = keras_lora.apply_lora(
        make_model(), rank=2, lora_b_initializer=random_b()
    )
    proj = keras_lora.lora_layers(model)["proj"]
    merged = proj.merged_kernel()
    assert keras.backend.standardize_dtype(merged.dtype) == "float32"
    expected = to_np(proj.kernel) + proj.scaling * (
        to_np(proj.lora_a).T @ to_np(proj.lora_b)
    )
    np.testing.assert_allclose(to_np(merged), expected, rtol=1e-6, atol=1e-6)


def test_bfloat16_base_keeps_float32_adapters_and_merges_to_bfloat16():
    keras.mixed_precision.set_global_policy("bfloat16")
    try:
        model = keras_lora.apply_lora(
            make_model(), rank=2, lora_b_initializer=random_b()
        )
    finally:
        keras.mixed_precision.set_global_policy("float32")
    proj = keras_lora.lora_layers(model)["proj"]
    assert proj.kernel.dtype == "bfloat16"
    assert proj.lora_a.dtype == "float32"
    merged = proj.merged_kernel()
    assert keras.backend.standardize_dtype(merged.dtype) == "bfloat16"
    expected = to_np(proj.kernel) + proj.scaling * (
        to_np(proj.lora_a).T @ to_np(proj.lora_b)
    )
    # One bfloat16 rounding of the float32 sum: 8 bits of mantissa.
    np.testing.assert_allclose(to_np(merged), expected, rtol=2**-8, atol=1e-6)


def test_merge_lora_gives_plain_layers_with_the_policy_kept(mixed_bfloat16):
    merge_lora = keras_lora.merge_lora
    model = keras_lora.apply_lora(
        make_model(), rank=2, lora_b_initializer=random_b()
    )
    merged = merge_lora(model)
    hidden = merged.get_layer("hidden")
    assert type(hidden) is keras.layers.Dense
    assert hidden.dtype_policy.name == "mixed_bfloat16"
    assert hidden.kernel.dtype == "float32"
    assert merged.get_layer("head").dtype_policy.name == "float32"
    x = regression_data()[0][:8]
    # Both compute in bfloat16; they differ by where rounding happens.
    np.testing.assert_allclose(
        to_np(merged(x)), to_np(model(x)), rtol=5e-2, atol=5e-2
    )


def test_merged_keras_file_keeps_float32_weights_and_policy(
    mixed_bfloat16, tmp_path
):
    merge_lora = keras_lora.merge_lora
    model = keras_lora.apply_lora(
        make_model(), rank=2, lora_b_initializer=random_b()
    )
    merged = merge_lora(model)
    path = str(tmp_path / "merged.keras")
    merged.save(path)
    keras.mixed_precision.set_global_policy("float32")
    loaded = keras.saving.load_model(path)
    assert loaded.get_layer("proj").dtype_policy.name == "mixed_bfloat16"
    for variable in loaded.weights:
        assert variable.dtype == "float32", variable.path
    x = regression_data()[0][:8]
    np.testing.assert_array_equal(to_np(loaded(x)), to_np(merged(x)))


# Off TensorFlow, export_merged exports in a TF subprocess from the same
# merged .keras file checked above.
@pytest.mark.backend("tensorflow")
def test_exported_saved_model_holds_float32_weights(mixed_bfloat16, tmp_path):
    import tensorflow as tf

    model = keras_lora.apply_lora(
        make_model(), rank=2, lora_b_initializer=random_b()
    )
    path = keras_lora.export_merged(model, str(tmp_path / "served"))
    served = tf.saved_model.load(path)
    assert {v.dtype.name for v in served.variables} == {"float32"}
    x = regression_data()[0][:8]
    out = served.serve(x)
    assert out.dtype.name == "float32"
    np.testing.assert_allclose(
        out.numpy(), to_np(model(x)), rtol=5e-2, atol=5e-2
    )
    assert os.path.isdir(path)
