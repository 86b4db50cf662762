"""LoRA layers round-trip through get_config and `.keras` files."""

import keras
import numpy as np
import pytest

from keras_lora import LoRADense
from keras_lora import LoRAEinsumDense

D_IN = 6


def to_np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def sample(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def lora_settings(layer):
    return {
        key: getattr(layer, key)
        for key in (
            "rank",
            "alpha",
            "dropout",
            "use_rslora",
            "train_bias",
            "adapter_enabled",
            "merged",
        )
    }


def make_trained(layer, seed=3):
    """Gives the adapters non-zero values, as training would."""
    for i, variable in enumerate((layer.lora_a, layer.lora_b)):
        variable.assign(0.1 * sample(tuple(variable.shape), seed=seed + i))
    return layer


# get_config / from_config ---------------------------------------------------


def test_constructor_made_dense_round_trips_through_its_config():
    layer = LoRADense(
        4,
        rank=3,
        alpha=6.0,
        dropout=0.1,
        use_rslora=True,
        train_bias=True,
        activation="gelu",
        use_bias=False,
        lora_b_initializer="ones",
        name="ffn",
    )
    clone = LoRADense.from_config(layer.get_config())
    assert type(clone) is LoRADense
    assert clone.get_config() == layer.get_config()
    assert lora_settings(clone) == lora_settings(layer)
    assert clone.name == "ffn" and clone.units == 4
    assert clone.base_layer.activation is keras.activations.gelu
    clone.build((None, D_IN))
    assert clone.bias is None
    np.testing.assert_array_equal(to_np(clone.lora_b), np.ones((3, 4)))


def test_from_layer_made_dense_round_trips_through_its_config():
    dense = keras.layers.Dense(4, activation="relu", name="head")
    dense.build((None, D_IN))
    layer = LoRADense.from_layer(dense, rank=2, alpha=4.0)
    layer.disable_adapter()
    clone = LoRADense.from_config(layer.get_config())
    assert lora_settings(clone) == lora_settings(layer)
    assert clone.name == "head"
    assert clone.base_layer is not dense
    assert clone.base_layer.get_config()["units"] == 4
    assert not clone.adapter_enabled


def test_einsum_dense_round_trips_through_its_config():
    base = keras.layers.EinsumDense(
        "btd,ndh->btnh", (None, 2, 3), bias_axes="nh", name="query"
    )
    base.build((None, 5, D_IN))
    layer = LoRAEinsumDense.from_layer(base, rank=2, use_rslora=True)
    clone = LoRAEinsumDense.from_config(layer.get_config())
    assert type(clone) is LoRAEinsumDense
    assert lora_settings(clone) == lora_settings(layer)
    assert clone.equation == "btd,ndh->btnh"
    assert clone.base_layer.bias_axes == "nh"
    assert clone.get_config() == layer.get_config()


@pytest.mark.parametrize("cls", [LoRADense, LoRAEinsumDense])
def test_layers_are_registered_under_the_keras_lora_package(cls):
    name = f"keras_lora>{cls.__name__}"
    assert keras.saving.get_registered_object(name) is cls


def test_generic_keras_deserialize_rebuilds_the_lora_class():
    layer = LoRADense(3, rank=2, name="q")
    config = keras.layers.serialize(layer)
    clone = keras.layers.deserialize(config)
    assert type(clone) is LoRADense
    assert lora_settings(clone) == lora_settings(layer)


# .keras files -----------------------------------------------------------------


def lora_model():
    """(3, D_IN) -> LoRAEinsumDense -> Flatten -> LoRADense, trained A/B."""
    inputs = keras.Input((3, D_IN))
    proj = LoRAEinsumDense(
        "abc,cde->abde", (None, 2, 2), bias_axes="de", rank=2, name="proj"
    )
    x = keras.layers.Flatten()(proj(inputs))
    dense = keras.layers.Dense(5, name="head")
    dense.build((None, 12))
    head = LoRADense.from_layer(dense, rank=2, alpha=4.0)
    model = keras.Model(inputs, head(x))
    make_trained(proj)
    make_trained(head, seed=5)
    return model


def save_and_load(model, tmp_path):
    path = str(tmp_path / "lora.keras")
    model.save(path)
    return keras.saving.load_model(path, safe_mode=True)


def test_keras_file_round_trip_keeps_lora_layers_weights_and_outputs(
    tmp_path,
):
    model = lora_model()
    x = sample((2, 3, D_IN))
    expected = to_np(model(x))

    loaded = save_and_load(model, tmp_path)

    for name, cls in (("proj", LoRAEinsumDense), ("head", LoRADense)):
        old, new = model.get_layer(name), loaded.get_layer(name)
        assert type(new) is cls
        assert lora_settings(new) == lora_settings(old)
        for variable in ("lora_a", "lora_b", "kernel", "bias"):
            np.testing.assert_array_equal(
                to_np(getattr(new, variable)), to_np(getattr(old, variable))
            )
        assert np.abs(to_np(new.lora_b)).max() > 0
    np.testing.assert_allclose(to_np(loaded(x)), expected, atol=1e-6)


def test_keras_file_round_trip_keeps_the_base_frozen(tmp_path):
    loaded = save_and_load(lora_model(), tmp_path)
    for name in ("proj", "head"):
        layer = loaded.get_layer(name)
        assert not layer.kernel.trainable and not layer.bias.trainable
    trainable = {v.path for v in loaded.trainable_weights}
    assert trainable == {
        "proj/lora_a",
        "proj/lora_b",
        "head/lora_a",
        "head/lora_b",
    }


def test_keras_file_round_trip_keeps_variable_paths(tmp_path):
    model = lora_model()
    loaded = save_and_load(model, tmp_path)
    assert [v.path for v in loaded.weights] == [v.path for v in model.weights]


def test_merged_layer_loads_merged_and_can_still_unmerge(tmp_path):
    model = lora_model()
    head = model.get_layer("head")
    kernel_before = to_np(head.kernel).copy()
    x = sample((2, 3, D_IN))
    expected = to_np(model(x))
    head.merge()

    loaded = save_and_load(model, tmp_path)

    new_head = loaded.get_layer("head")
    assert new_head.merged
    np.testing.assert_allclose(
        to_np(loaded(x)), expected, rtol=1e-5, atol=1e-5
    )
    new_head.unmerge()
    np.testing.assert_allclose(to_np(new_head.kernel), kernel_before, atol=1e-6)
