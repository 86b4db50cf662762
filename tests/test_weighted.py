"""add_weighted_adapter: cat (exact), svd (best rank-k of the exact sum), linear (PEFT's)."""

import keras
import numpy as np
import pytest
from keras import layers

import keras_lora

X = np.linspace(-1, 1, 2 * 3 * 6, dtype="float32").reshape(2, 3, 6)


def model_with_three_adapters():
    inputs = keras.Input((3, 6))
    x = layers.Dense(8, name="up")(inputs)
    # Gemma's query: the contracted axis sits in the middle of the kernel.
    x = layers.EinsumDense("btd,ndh->btnh", (3, 2, 4), name="query")(x)
    model = keras.Model(inputs, layers.Reshape((3, 8))(x))
    rng = np.random.default_rng(0)
    for variable in model.weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    keras_lora.apply_lora(model, rank=2, alpha=4.0, adapter_name="a")
    keras_lora.add_adapter(model, "b", rank=3, alpha=3.0)
    keras_lora.add_adapter(model, "c", rank=2, alpha=2.0)
    for layer in keras_lora.lora_layers(model).values():
        for adapter in layer.adapters.values():
            adapter.lora_b.assign(rng.normal(size=adapter.lora_b.shape).astype("float32"))
    return model


def deltas(layer, names):
    return {n: keras.ops.convert_to_numpy(layer.delta_kernel([n])) for n in names}


def new_delta(model, path, name):
    layer = keras_lora.lora_layers(model)[path]
    return keras.ops.convert_to_numpy(layer.delta_kernel([name]))


@pytest.mark.parametrize("path", ["up", "query"])
def test_cat_is_the_exact_weighted_sum(path):
    model = model_with_three_adapters()
    layer = keras_lora.lora_layers(model)[path]
    parts = deltas(layer, ["a", "b"])
    keras_lora.add_weighted_adapter(model, ["a", "b"], [0.7, -0.3], "ab",
                                    combination_type="cat")
    assert keras_lora.lora_layers(model)[path].adapters["ab"].rank == 5
    assert keras_lora.lora_layers(model)[path].adapters["ab"].scaling == 1.0
    np.testing.assert_allclose(new_delta(model, path, "ab"),
                               0.7 * parts["a"] - 0.3 * parts["b"], rtol=1e-4, atol=1e-5)
    assert keras_lora.active_adapters(model) == ["a"]


@pytest.mark.parametrize("path", ["up", "query"])
def test_svd_keeps_the_best_rank_k_approximation(path):
    model = model_with_three_adapters()
    layer = keras_lora.lora_layers(model)[path]
    parts = deltas(layer, ["a", "b"])
    exact = 0.5 * parts["a"] + 0.5 * parts["b"]
    keras_lora.add_weighted_adapter(model, ["a", "b"], [0.5, 0.5], "full",
                                    combination_type="svd", svd_rank=5)
    np.testing.assert_allclose(new_delta(model, path, "full"), exact, rtol=1e-4, atol=1e-4)
    keras_lora.add_weighted_adapter(model, ["a", "b"], [0.5, 0.5], "one",
                                    combination_type="svd", svd_rank=1)
    axes = layer._kernel_axes(layer.base_layer)
    order = axes[0] + axes[1]
    matrix = np.transpose(exact, order).reshape(
        int(np.prod([exact.shape[i] for i in axes[0]])), -1)
    u, s, vh = np.linalg.svd(matrix, full_matrices=False)
    best = (s[0] * np.outer(u[:, 0], vh[0])).reshape(np.transpose(exact, order).shape)
    got = np.transpose(new_delta(model, path, "one"), order)
    np.testing.assert_allclose(got, best, rtol=1e-4, atol=1e-4)


def test_linear_follows_peft():
    model = model_with_three_adapters()
    layer = keras_lora.lora_layers(model)["up"]
    a, c = layer.adapters["a"], layer.adapters["c"]
    keras_lora.add_weighted_adapter(model, ["a", "c"], [0.6, 0.4], "ac",
                                    combination_type="linear")
    to = keras.ops.convert_to_numpy
    wa, wc = np.sqrt(0.6 * a.scaling), np.sqrt(0.4 * c.scaling)
    expected_a = wa * to(a.lora_a) + wc * to(c.lora_a)
    expected_b = wa * to(a.lora_b) + wc * to(c.lora_b)
    new = keras_lora.lora_layers(model)["up"].adapters["ac"]
    np.testing.assert_allclose(to(new.lora_a), expected_a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to(new.lora_b), expected_b, rtol=1e-5, atol=1e-6)


def test_the_combined_adapter_serves_like_its_update():
    model = model_with_three_adapters()
    keras_lora.add_weighted_adapter(model, ["a", "b", "c"], [1.0, 1.0, 1.0], "abc",
                                    combination_type="cat")
    keras_lora.set_adapter(model, "abc")
    combined = keras.ops.convert_to_numpy(model(X))
    keras_lora.set_adapter(model, ["a", "b", "c"])
    np.testing.assert_allclose(combined, keras.ops.convert_to_numpy(model(X)),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(adapters=["a", "zz"], weights=[1, 1]), "no adapter named 'zz'"),
        (dict(adapters=["a", "a"], weights=[1, 1]), "named twice"),
        (dict(adapters=["a", "b"], weights=[1]), "2 finite numbers"),
        (dict(adapters=["a", "b"], weights=[1, 1], combination_type="ties"), "combination_type"),
        (dict(adapters=["a", "b"], weights=[1, 1], combination_type="linear"), "one rank"),
        (dict(adapters=["a", "b"], weights=[1, 1], svd_rank=0), "svd_rank=0"),
        (dict(adapters=["a", "b"], weights=[1, 1], adapter_name="b"), "already has an adapter named 'b'"),
        (dict(adapters=["a", "b"], weights=[1, 1], adapter_name="no way"), "Python identifier"),
    ],
    ids=["unknown", "duplicate", "weights", "combination", "linear_ranks",
         "svd_rank", "existing", "bad_name"],
)
def test_bad_requests_change_nothing(kwargs, message):
    model = model_with_three_adapters()
    names = keras_lora.list_adapters(model)
    paths = [v.path for v in model.weights]
    kwargs.setdefault("adapter_name", "new")
    with pytest.raises((ValueError, TypeError), match=message):
        keras_lora.add_weighted_adapter(model, **kwargs)
    assert keras_lora.list_adapters(model) == names
    assert [v.path for v in model.weights] == paths


def test_linear_refuses_adapters_on_different_layers():
    model = model_with_three_adapters()
    keras_lora.add_adapter(model, "up_only", rank=2, targets=["up"])
    with pytest.raises(ValueError, match="same layers"):
        keras_lora.add_weighted_adapter(model, ["a", "up_only"], [1, 1], "x",
                                        combination_type="linear")
