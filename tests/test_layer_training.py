"""Training LoRA layers: `fit` moves A and B only, under any dtype policy."""

import keras
import numpy as np
import pytest

from keras_lora import LoRADense
from keras_lora import LoRAEinsumDense

D_IN, UNITS = 6, 4


def to_np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def regression_data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D_IN)).astype("float32")
    y = (x @ rng.normal(size=(D_IN, UNITS))).astype("float32")
    return x, y


def frozen_copy(variables):
    return [to_np(v).copy() for v in variables]


def fit(model, x, y, epochs=8):
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    history = model.fit(x, y, batch_size=16, epochs=epochs, verbose=0)
    return history.history["loss"]


def test_fit_trains_a_and_b_and_leaves_kernel_and_bias_bit_identical():
    dense = keras.layers.Dense(UNITS, name="head")
    dense.build((None, D_IN))
    layer = LoRADense.from_layer(dense, rank=2)
    model = keras.Sequential([keras.Input((D_IN,)), layer])
    base_before = frozen_copy([dense.kernel, dense.bias])
    a_before = to_np(layer.lora_a).copy()

    losses = fit(model, *regression_data())

    assert losses[-1] < losses[0]
    assert np.abs(to_np(layer.lora_b)).max() > 0
    assert not np.array_equal(to_np(layer.lora_a), a_before)
    for before, variable in zip(base_before, [dense.kernel, dense.bias]):
        np.testing.assert_array_equal(to_np(variable), before)


def test_fit_with_dropout_on_the_lora_path_still_trains():
    layer = LoRADense(UNITS, rank=2, dropout=0.2, name="head")
    model = keras.Sequential([keras.Input((D_IN,)), layer])
    kernel_before = to_np(layer.kernel).copy()

    losses = fit(model, *regression_data(), epochs=4)

    assert losses[-1] < losses[0]
    np.testing.assert_array_equal(to_np(layer.kernel), kernel_before)


def test_fit_with_train_bias_moves_the_bias_but_not_the_kernel():
    inputs = keras.Input((D_IN,))
    outputs = LoRADense(UNITS, rank=2, train_bias=True, name="head")(inputs)
    model = keras.Model(inputs, outputs)
    layer = model.get_layer("head")
    kernel_before, bias_before = frozen_copy([layer.kernel, layer.bias])

    fit(model, *regression_data(), epochs=2)

    np.testing.assert_array_equal(to_np(layer.kernel), kernel_before)
    assert not np.array_equal(to_np(layer.bias), bias_before)


def test_fit_trains_an_einsum_adapter_in_a_functional_model():
    inputs = keras.Input((3, D_IN))
    hidden = keras.layers.Dense(D_IN, name="frozen_stem")
    hidden.trainable = False
    proj = LoRAEinsumDense(
        "abc,cde->abde", (None, 2, 2), bias_axes="de", rank=2, name="proj"
    )
    outputs = keras.layers.Reshape((3, UNITS))(proj(hidden(inputs)))
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(1).normal(size=(32, 3, D_IN)).astype("float32")
    y = np.tanh(x[..., :UNITS])
    base_before = frozen_copy([proj.kernel, proj.bias])

    losses = fit(model, x, y)

    assert losses[-1] < losses[0]
    assert np.abs(to_np(proj.lora_b)).max() > 0
    for before, variable in zip(base_before, [proj.kernel, proj.bias]):
        np.testing.assert_array_equal(to_np(variable), before)


# Dtype policies -------------------------------------------------------------


@pytest.fixture
def mixed_bfloat16():
    # conftest's autouse fixture restores the previous policy afterwards.
    keras.mixed_precision.set_global_policy("mixed_bfloat16")


def test_mixed_precision_keeps_float32_adapters_and_bfloat16_outputs(
    mixed_bfloat16,
):
    layer = LoRADense(UNITS, rank=2)
    y = layer(np.ones((2, D_IN), "float32"))
    assert layer.dtype_policy.name == "mixed_bfloat16"
    assert layer.lora_a.dtype == "float32"
    assert layer.lora_b.dtype == "float32"
    assert layer.kernel.dtype == "float32"
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"


def test_mixed_precision_einsum_keeps_float32_adapters(mixed_bfloat16):
    layer = LoRAEinsumDense("abc,cd->abd", (None, UNITS), rank=2)
    y = layer(np.ones((2, 3, D_IN), "float32"))
    assert layer.lora_a.dtype == "float32"
    assert layer.lora_b.dtype == "float32"
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"


def test_from_layer_inherits_the_base_dtype_policy(mixed_bfloat16):
    dense = keras.layers.Dense(UNITS)
    dense.build((None, D_IN))
    layer = LoRADense.from_layer(dense, rank=2)
    assert layer.dtype_policy.name == "mixed_bfloat16"
    assert layer.lora_a.dtype == "float32"


def test_fit_under_mixed_precision_updates_the_float32_adapters(
    mixed_bfloat16,
):
    layer = LoRADense(UNITS, rank=2, name="head")
    model = keras.Sequential([keras.Input((D_IN,)), layer])
    kernel_before = to_np(layer.kernel).copy()

    losses = fit(model, *regression_data(), epochs=4)

    assert losses[-1] < losses[0]
    assert layer.lora_b.dtype == "float32"
    assert np.abs(to_np(layer.lora_b)).max() > 0
    np.testing.assert_array_equal(to_np(layer.kernel), kernel_before)


def test_full_bfloat16_layer_casts_the_float32_adapters_in_call():
    layer = LoRADense(
        UNITS,
        rank=2,
        dtype="bfloat16",
        lora_b_initializer=keras.initializers.RandomNormal(seed=3),
    )
    x = np.random.default_rng(0).normal(size=(3, D_IN)).astype("float32")
    y = layer(x)
    assert layer.kernel.dtype == "bfloat16"
    assert layer.lora_a.dtype == "float32"
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    kernel = to_np(layer.kernel).astype("float64")
    a = to_np(layer.lora_a).astype("float64").T  # stored (rank, d_in)
    b = to_np(layer.lora_b).astype("float64")
    expected = x @ kernel + to_np(layer.bias).astype("float64")
    expected = expected + layer.scaling * (x @ a) @ b
    np.testing.assert_allclose(
        to_np(y).astype("float64"), expected, rtol=5e-2, atol=5e-2
    )
