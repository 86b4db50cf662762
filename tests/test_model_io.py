"""save_model / load_model: whole `.keras` files that keep their adapters."""

import json
import os
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest
from keras.src.saving import saving_lib
from test_surgery import attention
from test_surgery import custom_block
from test_surgery import sequential
from test_surgery import subclassed

import keras_lora
from keras_lora import keras_hooks
from keras_lora import model_io
from keras_lora.model_io import ADAPTER_MEMBER
from keras_lora.model_io import load_model
from keras_lora.model_io import save_model

CASES = [sequential, custom_block, subclassed, attention]
IDS = ["sequential", "custom_block", "subclassed", "attention"]


def plain_keras_load(path):
    """`keras.saving.load_model` as it is without keras-lora's hooks."""
    return keras_hooks.original(saving_lib.load_model)(path)


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
    plain = plain_keras_load(path)
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
        out(plain_keras_load(path), x), base, atol=1e-5
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

    class BrokenKeras:
        @staticmethod
        def save_model(*args, **kwargs):
            raise OSError("disk full")

    monkeypatch.setattr(model_io, "_saving_lib", lambda: BrokenKeras)
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


def dead_pid():
    """The pid of a process that has already exited."""
    return int(subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True, text=True, check=True,
    ).stdout)


def test_a_save_removes_leftovers_of_dead_saves_to_the_same_file(tmp_path):
    model, _, _ = trained(sequential)
    stale = tmp_path / f".m.keras.keras_lora-{dead_pid()}-abc123"
    live = tmp_path / f".m.keras.keras_lora-{os.getpid()}-running"
    other = tmp_path / f".n.keras.keras_lora-{dead_pid()}-abc123"
    for directory in (stale, live, other):
        directory.mkdir()
        (directory / "model.keras").write_bytes(b"partial")
    save_model(model, tmp_path / "m.keras")
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["m.keras", live.name, other.name]
    )


def test_a_directory_at_the_target_is_refused_by_name(tmp_path):
    model, _, _ = trained(sequential)
    (tmp_path / "m.keras").mkdir()
    with pytest.raises(IsADirectoryError, match=r"m\.keras' is a directory"):
        save_model(model, tmp_path / "m.keras")
    assert os.listdir(tmp_path) == ["m.keras"]


def zip_without_config(path):
    with zipfile.ZipFile(path, "w") as handle:
        handle.writestr("other.txt", "x")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.mkdir(), "is not a `.keras` archive"),
        (lambda p: p.write_bytes(b"not a zip file"), "is not a `.keras` archive"),
        (zip_without_config, "not a readable `.keras` archive.*KeyError"),
    ],
    ids=["directory", "not_a_zip", "zip_without_config"],
)
def test_unreadable_files_give_a_value_error_naming_the_file(
    tmp_path, make, message
):
    path = tmp_path / "bad.keras"
    make(path)
    with pytest.raises(ValueError, match=f"bad\\.keras'.*{message}"):
        load_model(path)


def test_a_missing_file_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file.*gone.keras"):
        load_model(tmp_path / "gone.keras")


def test_compiled_model_saves_its_compile_settings_but_no_optimizer_state(
    tmp_path,
):
    model, x, _ = trained(sequential)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mae")
    model.fit(x, np.zeros((16, 3)), epochs=1, verbose=0)
    path = save_model(model, tmp_path / "m.keras")
    loaded = load_model(path)
    assert loaded.optimizer.get_config()["learning_rate"] == 0.5
    assert int(keras.ops.convert_to_numpy(loaded.optimizer.iterations)) == 0
    with zipfile.ZipFile(path) as handle:
        base_view = json.loads(handle.read("config.json"))
    assert not base_view.get("compile_config")


def test_a_corrupt_adapter_member_is_an_error_naming_the_archive(tmp_path):
    model, _, _ = trained(sequential)
    path = save_model(model, tmp_path / "m.keras")
    broken = tmp_path / "broken.keras"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(broken, "w") as out:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename == ADAPTER_MEMBER:
                data = data[: len(data) // 2]
            out.writestr(item, data)
    with pytest.raises(ValueError, match=r"broken\.keras'.*keras_lora/adapter"):
        load_model(broken)
