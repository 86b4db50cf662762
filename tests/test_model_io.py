"""save_model / load_model: whole `.keras` files that keep their adapters."""

import os
import zipfile

import keras
import numpy as np
import pytest
from test_surgery import attention
from test_surgery import custom_block
from test_surgery import sequential
from test_surgery import subclassed

import keras_lora
from keras_lora.model_io import ADAPTER_MEMBER
from keras_lora.model_io import load_model
from keras_lora.model_io import save_model

CASES = [sequential, custom_block, subclassed, attention]
IDS = ["sequential", "custom_block", "subclassed", "attention"]


def out(model, x):
    return keras.ops.convert_to_numpy(model(x))


def trained(factory):
    model, x = factory()
    base = out(model, x)
    keras_lora.apply_lora(model, rank=2)
    for layer in keras_lora.lora_layers(model).values():
        layer.lora_b.assign(np.random.uniform(-0.2, 0.2, layer.lora_b.shape))
    return model, x, base


@pytest.mark.parametrize("factory", CASES, ids=IDS)
def test_round_trip_keeps_lora_layers_and_outputs(factory, tmp_path):
    model, x, _ = trained(factory)
    path = save_model(model, tmp_path / "m.keras")
    loaded = load_model(path)
    assert list(keras_lora.lora_layers(loaded)) == list(
        keras_lora.lora_layers(model)
    )
    np.testing.assert_allclose(out(loaded, x), out(model, x), atol=1e-6)
    assert all(
        v.path.endswith(("lora_a", "lora_b")) for v in loaded.trainable_weights
    )


@pytest.mark.parametrize("factory", CASES, ids=IDS)
def test_plain_keras_reads_the_file_as_the_base_model(factory, tmp_path):
    model, x, base = trained(factory)
    path = save_model(model, tmp_path / "m.keras")
    plain = keras.saving.load_model(path)
    assert keras_lora.lora_layers(plain) == {}
    np.testing.assert_allclose(out(plain, x), base, atol=1e-6)


def test_saving_leaves_the_model_adapted(tmp_path):
    model, x, _ = trained(custom_block)
    before = out(model, x)
    save_model(model, tmp_path / "m.keras")
    assert len(keras_lora.lora_layers(model)) == 2
    np.testing.assert_array_equal(out(model, x), before)


def test_merged_adapters_are_saved_unmerged_and_stay_merged(tmp_path):
    model, x, base = trained(custom_block)
    keras_lora.merge_adapters(model)
    merged_out = out(model, x)
    path = save_model(model, tmp_path / "m.keras")
    assert all(layer.merged for layer in keras_lora.lora_layers(model).values())
    np.testing.assert_allclose(out(model, x), merged_out, atol=1e-6)
    np.testing.assert_allclose(
        out(keras.saving.load_model(path), x), base, atol=1e-5
    )
    np.testing.assert_allclose(out(load_model(path), x), merged_out, atol=1e-5)


def test_loaded_model_is_compiled_and_trains(tmp_path):
    model, x, _ = trained(subclassed)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    path = save_model(model, tmp_path / "m.keras")
    loaded = load_model(path)
    y = np.zeros_like(out(loaded, x))
    before = loaded.evaluate(x, y, verbose=0)
    loaded.fit(x, y, epochs=3, verbose=0)
    assert loaded.evaluate(x, y, verbose=0) < before


def test_file_is_a_keras_archive_with_the_adapter_inside(tmp_path):
    model, _, _ = trained(sequential)
    path = save_model(model, tmp_path / "m.keras")
    with zipfile.ZipFile(path) as handle:
        names = handle.namelist()
    assert {"config.json", "model.weights.h5", ADAPTER_MEMBER} <= set(names)


def test_failed_save_keeps_old_file_and_adapted_model(tmp_path, monkeypatch):
    model, x, _ = trained(custom_block)
    target = tmp_path / "m.keras"
    target.write_bytes(b"previous")
    before = out(model, x)

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, target)
    assert target.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["m.keras"]
    assert len(keras_lora.lora_layers(model)) == 2
    np.testing.assert_array_equal(out(model, x), before)


@pytest.mark.parametrize(
    "name, error, message",
    [
        ("missing/m.keras", FileNotFoundError, "does not exist"),
        ("m.h5", ValueError, r"writes `.keras` files.*m.h5"),
    ],
)
def test_bad_paths_raise_and_write_nothing(tmp_path, name, error, message):
    model, _, _ = trained(sequential)
    with pytest.raises(error, match=message):
        save_model(model, tmp_path / name)
    assert os.listdir(tmp_path) == []


def test_model_without_lora_layers_is_refused(tmp_path):
    model, _ = sequential()
    with pytest.raises(ValueError, match="has no LoRA layers"):
        save_model(model, tmp_path / "m.keras")
