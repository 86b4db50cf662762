"""clone_with_lora: an adapted copy; the original model is never touched."""

import keras
import numpy as np
import pytest
from keras import layers

import keras_lora


def functional():
    inputs = keras.Input((6,))
    x = layers.Dense(8, activation="relu", name="up")(inputs)
    x = layers.BatchNormalization(name="norm")(x)
    return keras.Model(inputs, layers.Dense(3, name="head")(x), name="net")


def sequential():
    return keras.Sequential(
        [keras.Input((6,)), layers.Dense(8, activation="tanh"), layers.Dense(3)]
    )


X = np.linspace(-1, 1, 24, dtype="float32").reshape(4, 6)
Y = np.linspace(0, 1, 12, dtype="float32").reshape(4, 3)


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def snapshot(model):
    return (
        [type(layer).__name__ for layer in model.layers],
        [id(v) for v in model.weights],
        [v.trainable for v in model.weights],
        [to_numpy(v).copy() for v in model.weights],
        to_numpy(model(X)),
    )


def assert_same(model, before):
    now = snapshot(model)
    assert now[:3] == before[:3]
    for got, expected in zip(now[3], before[3]):
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(now[4], before[4])


@pytest.mark.parametrize("factory", [functional, sequential], ids=["functional", "sequential"])
def test_clone_computes_the_original_and_leaves_it_untouched(factory):
    original = factory()
    before = snapshot(original)
    clone = keras_lora.clone_with_lora(original, rank=2)
    assert clone is not original and type(clone) is type(original)
    assert keras_lora.lora_layers(clone) and not keras_lora.lora_layers(original)
    np.testing.assert_allclose(to_numpy(clone(X)), before[4], atol=1e-6)
    assert not {id(v) for v in clone.weights} & {id(v) for v in original.weights}
    clone.compile("sgd", "mse")
    clone.fit(X, Y, epochs=2, verbose=0)
    keras_lora.merge_lora(clone, in_place=True)
    assert_same(original, before)
    # The original is still a usable, trainable model.
    original.compile("sgd", "mse")
    original.fit(X, Y, epochs=1, verbose=0)


def test_clone_keeps_apply_lora_arguments_and_compile_settings():
    original = functional()
    original.compile(keras.optimizers.Adam(1e-3), "mse")
    clone = keras_lora.clone_with_lora(
        original, rank=4, targets=["up"], trainable=["head"]
    )
    assert list(keras_lora.lora_layers(clone)) == ["up"]
    assert keras_lora.lora_layers(clone)["up"].rank == 4
    assert clone.compiled and isinstance(clone.optimizer, keras.optimizers.Adam)
    assert clone.optimizer is not original.optimizer
    trainable = sorted(v.path.split("/")[-1] for v in clone.trainable_weights)
    assert trainable == ["bias", "kernel", "lora_a", "lora_b"]
    assert clone.get_layer("head").trainable
    assert all(v.trainable for v in original.weights if "moving" not in v.path)


def test_an_adapter_saved_from_the_clone_loads_onto_the_original(tmp_path):
    original = functional()
    clone = keras_lora.clone_with_lora(original, rank=2)
    for layer in keras_lora.lora_layers(clone).values():
        layer.lora_b.assign(np.full(layer.lora_b.shape, 0.1, "float32"))
    path = str(tmp_path / "a.safetensors")
    keras_lora.save_adapter(clone, path)
    keras_lora.load_adapter(original, path)
    np.testing.assert_allclose(to_numpy(original(X)), to_numpy(clone(X)), atol=1e-6)


def test_bad_arguments_are_refused_before_anything_is_copied():
    original = functional()
    before = snapshot(original)
    with pytest.raises(ValueError, match="rank=0"):
        keras_lora.clone_with_lora(original, rank=0)
    with pytest.raises(ValueError, match="matches no layer"):
        keras_lora.clone_with_lora(original, targets=["nothing"])
    assert_same(original, before)


def test_a_subclassed_model_is_pointed_to_apply_lora():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    model = Net()
    model(X)
    with pytest.raises(TypeError, match="subclassed Net.*apply_lora"):
        keras_lora.clone_with_lora(model, rank=2)
    assert not keras_lora.lora_layers(model)


def test_an_adapted_model_is_refused():
    model = keras_lora.apply_lora(functional(), rank=2)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        keras_lora.clone_with_lora(model, rank=2)
