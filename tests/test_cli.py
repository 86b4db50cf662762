"""The keras-lora command line, in-process and as a program."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import layers

from keras_lora import cli
from keras_lora import model_walk
from keras_lora.adapters import save_adapter
from keras_lora.layers import LoRALayer
from keras_lora.model_io import save_model
from keras_lora.surgery import apply_lora
from keras_lora.surgery import lora_layers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
X = np.linspace(-1, 1, 12, dtype="float32").reshape(3, 4)


def base_model(units=3):
    inputs = keras.Input((4,))
    x = layers.Dense(6, activation="relu", name="dense")(inputs)
    x = layers.EinsumDense("ab,bc->ac", (units,), bias_axes="c", name="einsum")(x)
    model = keras.Model(inputs, x)
    rng = np.random.default_rng(1)
    for variable in model.weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    return model


def adapted_model():
    model = apply_lora(base_model(), rank=2, alpha=4.0)
    rng = np.random.default_rng(2)
    for layer in lora_layers(model).values():
        layer.lora_b.assign(rng.normal(size=layer.lora_b.shape))
    return model


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


@pytest.fixture
def files(tmp_path):
    """A base model file, an adapter file, and the adapted model's outputs."""
    base = str(tmp_path / "base.keras")
    base_model().save(base)
    adapter = str(tmp_path / "task.safetensors")
    model = adapted_model()
    save_adapter(model, adapter)
    return base, adapter, to_numpy(model(X))


def has_lora_layers(model):
    return any(
        isinstance(e.layer, LoRALayer) for e in model_walk.walk(model).values()
    )


def test_inspect_lists_layers_ranks_alpha_parameters_and_size(files, capsys):
    _, adapter, _ = files
    assert cli.main(["inspect", adapter]) == 0
    out = capsys.readouterr().out
    assert "Layers: 2, LoRA parameters: 38" in out
    assert f"Size: {os.path.getsize(adapter):,} bytes" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[4:]}
    assert rows["dense"][1:5] == ["LoRADense", "2", "4", "2"]
    assert rows["einsum"][1:5] == ["LoRAEinsumDense", "2", "4", "2"]


def test_inspect_json_is_machine_readable(files, capsys):
    _, adapter, _ = files
    assert cli.main(["inspect", adapter, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["file_bytes"] == os.path.getsize(adapter)
    assert report["tensor_bytes"] == 4 * report["parameters"]
    assert report["parameters"] == (4 * 2 + 2 * 6) + (6 * 2 + 2 * 3)
    assert report["layers"]["einsum"]["rank"] == 2


def test_merge_writes_a_plain_model_with_the_lora_outputs(files, tmp_path):
    base, adapter, expected = files
    out = str(tmp_path / "merged.keras")
    assert cli.main(["merge", base, adapter, "-o", out]) == 0
    merged = keras.saving.load_model(out)
    assert not has_lora_layers(merged)
    np.testing.assert_allclose(to_numpy(merged(X)), expected, rtol=1e-5, atol=1e-5)
    assert sorted(os.listdir(tmp_path)) == [
        "base.keras", "merged.keras", "task.safetensors"
    ]


@pytest.mark.parametrize("save", ["keras_lora.save_model", "model.save"])
def test_merge_takes_a_saved_lora_model_without_an_adapter(tmp_path, save):
    model = adapted_model()
    lora_file, out = str(tmp_path / "lora.keras"), str(tmp_path / "merged.keras")
    if save == "model.save":
        model.save(lora_file)
    else:
        save_model(model, lora_file)
    assert cli.main(["merge", lora_file, "-o", out]) == 0
    np.testing.assert_allclose(
        to_numpy(keras.saving.load_model(out)(X)), to_numpy(model(X)),
        rtol=1e-5, atol=1e-5,
    )


def test_export_hands_the_adapted_model_to_export_merged(files, tmp_path, monkeypatch):
    base, adapter, expected = files
    calls = []
    monkeypatch.setattr(
        "keras_lora.export.export_merged",
        lambda model, path, format: calls.append((model, path, format)) or path,
    )
    out = str(tmp_path / "served")
    assert cli.main(["export", base, adapter, "-o", out, "--format", "litert"]) == 0
    (model, path, format), = calls
    assert (path, format) == (out, "litert")
    np.testing.assert_allclose(to_numpy(model(X)), expected, rtol=1e-6)


# Errors: one line on stderr, exit status 1 --------------------------------


def run_failing(argv, capsys):
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"keras-lora {argv[0]}: error: ")
    return err


def test_inspect_missing_file(tmp_path, capsys):
    err = run_failing(["inspect", str(tmp_path / "none.safetensors")], capsys)
    assert "not found" in err


def test_inspect_file_that_is_not_an_adapter(tmp_path, capsys):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"not safetensors at all")
    assert "not a readable safetensors file" in run_failing(
        ["inspect", str(path)], capsys
    )


def test_merge_with_a_corrupt_model_file(files, tmp_path, capsys):
    _, adapter, _ = files
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"not a zip")
    err = run_failing(
        ["merge", str(bad), adapter, "-o", str(tmp_path / "m.keras")], capsys
    )
    assert "cannot load model" in err


def test_merge_with_an_adapter_for_another_model(files, tmp_path, capsys):
    _, adapter, _ = files
    other = str(tmp_path / "other.keras")
    base_model(units=5).save(other)
    err = run_failing(
        ["merge", other, adapter, "-o", str(tmp_path / "m.keras")], capsys
    )
    assert "'einsum'" in err and "(6, 5)" in err and "(6, 3)" in err
    assert not os.path.exists(tmp_path / "m.keras")


def test_merge_without_lora_layers_or_adapter(files, tmp_path, capsys):
    base, _, _ = files
    err = run_failing(["merge", base, "-o", str(tmp_path / "m.keras")], capsys)
    assert "no LoRA layers" in err


def test_export_rejects_an_unsupported_format_before_loading(tmp_path, capsys):
    err = run_failing(
        ["export", str(tmp_path / "absent.keras"), "-o", str(tmp_path / "o"),
         "--format", "onnx"],
        capsys,
    )
    assert "format='onnx'" in err


def test_usage_error_exits_with_status_2(capsys):
    with pytest.raises(SystemExit) as raised:
        cli.main(["merge", "model.keras"])  # -o is required
    assert raised.value.code == 2


def run_program(*args):
    return subprocess.run(
        [sys.executable, "-m", "keras_lora.cli", *args],
        capture_output=True, text=True, cwd=REPO_ROOT,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )


def test_program_inspects_an_adapter(files):
    _, adapter, _ = files
    result = run_program("inspect", adapter)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LoRAEinsumDense" in result.stdout


def test_program_exits_non_zero_on_a_bad_file(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"junk")
    result = run_program("inspect", str(junk))
    assert result.returncode == 1
    assert "keras-lora inspect: error:" in result.stderr
    assert "not a readable safetensors file" in result.stderr
