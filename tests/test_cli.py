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


@pytest.fixture(autouse=True)
def restored_environment():
    """`cli.main` sets the quiet logging variables in `os.environ`."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


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
        lambda model, path, format, **options: calls.append(
            (model, path, format, options)) or path,
    )
    out = str(tmp_path / "served")
    assert cli.main(["export", base, adapter, "-o", out, "--format", "litert"]) == 0
    (model, path, format, options), = calls
    assert (path, format) == (out, "litert")
    assert options == dict(overwrite=None, input_signature=None, custom_modules=None)
    np.testing.assert_allclose(to_numpy(model(X)), expected, rtol=1e-6)


def test_export_passes_signature_custom_modules_and_overwrite(files, tmp_path, monkeypatch):
    base, adapter, _ = files
    calls = []
    monkeypatch.setattr(
        "keras_lora.export.export_merged",
        lambda model, path, format, **options: calls.append(options) or path,
    )
    argv = ["export", base, adapter, "-o", str(tmp_path / "s"),
            "--custom-module", "json", "--overwrite",
            "--input-signature", '[{"shape": [null, 4], "dtype": "float32"}]']
    assert cli.main(argv) == 0
    (options,) = calls
    assert options["overwrite"] is True and options["custom_modules"] == ["json"]
    assert options["input_signature"] is not None


def test_export_with_an_unknown_custom_module_is_a_clear_error(files, tmp_path, capsys):
    base, adapter, _ = files
    err = run_failing(["export", base, adapter, "-o", str(tmp_path / "s"),
                       "--custom-module", "no_such_module_here"], capsys)
    assert "no_such_module_here" in err


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


# What inspect shows ------------------------------------------------------


def head_model():
    """An adapted model with a fully trainable head and trained biases."""
    inputs = keras.Input((4,))
    x = layers.Dense(6, name="dense")(inputs)
    x = layers.Dense(3, name="head")(x)
    return apply_lora(
        keras.Model(inputs, x), rank=2, targets=["dense"], trainable=["head"],
        train_bias=True,
    )


def test_inspect_lists_extra_tensors_and_the_digest_status(tmp_path, capsys):
    adapter = str(tmp_path / "head.safetensors")
    save_adapter(head_model(), adapter)
    assert cli.main(["inspect", adapter]) == 0
    out = capsys.readouterr().out
    assert "Digests: all 5 tensors match their CRC-32" in out
    assert "Other trained weights: 3 tensors (fully trainable layers: head)" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[5:]}
    assert rows["head/kernel"] == ["(6,", "3)", "18"]
    assert rows["head/bias"] == ["(3,)", "3"]
    assert rows["dense/bias"] == ["(6,)", "6"]


def rewrite_header(source, target, change):
    import safetensors.numpy

    with safetensors.safe_open(source, framework="numpy") as handle:
        document = json.loads(handle.metadata()["keras_lora"])
    change(document)
    safetensors.numpy.save_file(
        safetensors.numpy.load_file(source), target,
        metadata={"keras_lora": json.dumps(document)},  # NaN stays NaN
    )
    return target


def as_version_3(document):
    del document["digests"], document["layer_keys"], document["header_digest"]
    document["format_version"] = 3


def test_inspect_says_an_older_file_is_not_verified(files, tmp_path, capsys):
    _, adapter, _ = files
    old = rewrite_header(adapter, str(tmp_path / "v3.safetensors"), as_version_3)
    assert cli.main(["inspect", old]) == 0
    assert (
        "Digests: none (written before format 4): tensor data not verified"
        in capsys.readouterr().out
    )
    assert cli.main(["inspect", old, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verified"] is False


def strict_json(text):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_inspect_json_is_strict_json_with_digests_and_extras(tmp_path, capsys):
    adapter = str(tmp_path / "head.safetensors")
    save_adapter(head_model(), adapter)
    assert cli.main(["inspect", adapter, "--json"]) == 0
    report = strict_json(capsys.readouterr().out)
    assert report["verified"] is True
    assert report["extra_tensors"]["head/kernel"] == [6, 3]
    assert sorted(report["digests"]) == sorted(
        ["dense/lora_a", "dense/lora_b", "dense/bias", "head/kernel", "head/bias"]
    )


@pytest.mark.parametrize("as_json", [False, True])
def test_inspect_reports_a_nan_scaling_as_an_error(files, tmp_path, capsys, as_json):
    _, adapter, _ = files
    bad = rewrite_header(
        adapter, str(tmp_path / "nan.safetensors"),
        lambda d: d["layers"]["dense"].update(scaling=float("nan")),
    )
    err = run_failing(["inspect", bad] + ["--json"] * as_json, capsys)
    assert "layer 'dense'" in err and "Received: scaling=nan" in err
    assert capsys.readouterr().out == ""


def test_json_output_writes_non_finite_numbers_as_strings():
    value = {"a": [1.0, float("nan")], "b": {"c": float("-inf")}, "d": "x"}
    assert strict_json(json.dumps(cli._json_safe(value), allow_nan=False)) == {
        "a": [1.0, "nan"], "b": {"c": "-inf"}, "d": "x"
    }


def test_version_flag(capsys):
    import keras_lora

    with pytest.raises(SystemExit) as raised:
        cli.main(["--version"])
    assert raised.value.code == 0
    assert capsys.readouterr().out.strip() == f"keras-lora {keras_lora.__version__}"


# Quiet and light -----------------------------------------------------------

BACKEND_MODULES = ("keras", "jax", "tensorflow", "torch")


def imported_backends(*argv):
    """Runs `cli.main(argv)` in a fresh interpreter; returns its exit code and
    the deep-learning modules it imported."""
    code = (
        "import sys, json\n"
        "from keras_lora import cli\n"
        "try:\n"
        f"    status = cli.main({list(argv)!r})\n"
        "except SystemExit as exit:\n"
        "    status = exit.code\n"
        f"found = sorted(m for m in sys.modules if m.split('.')[0] in {BACKEND_MODULES!r})\n"
        "print('RESULT', json.dumps([status, found]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True,
        cwd=REPO_ROOT,
    )
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, result.stderr[-2000:]
    return json.loads(line[-1][len("RESULT "):])


@pytest.mark.parametrize("argv", [["inspect"], ["inspect", "--json"], ["--help"], ["--version"]])
def test_inspect_help_and_version_import_no_backend(files, argv):
    _, adapter, _ = files
    if argv[0] == "inspect":
        argv = [argv[0], adapter, *argv[1:]]
    status, found = imported_backends(*argv)
    assert (status, found) == (0, [])


def test_importing_keras_lora_imports_no_backend_until_used():
    code = (
        "import sys, keras_lora\n"
        "names = set(dir(keras_lora))\n"
        "before = [m for m in sys.modules if m.split('.')[0] == 'keras']\n"
        "keras_lora.apply_lora\n"
        "after = 'keras' in sys.modules\n"
        "print(before, after, set(keras_lora.__all__) <= names)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT
    )
    assert result.stdout.split() == ["[]", "True", "True"], result.stderr[-2000:]


def test_merge_sets_quiet_logging_but_keeps_a_users_setting(files, tmp_path, monkeypatch):
    base, adapter, _ = files
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")
    monkeypatch.delenv("GRPC_VERBOSITY", raising=False)
    assert cli.main(["merge", base, adapter, "-o", str(tmp_path / "m.keras")]) == 0
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1"
    assert os.environ["GRPC_VERBOSITY"] == "ERROR"


def test_inspect_leaves_the_environment_alone(files, monkeypatch):
    _, adapter, _ = files
    monkeypatch.delenv("GRPC_VERBOSITY", raising=False)
    assert cli.main(["inspect", adapter]) == 0
    assert "GRPC_VERBOSITY" not in os.environ


NOISE = ("oneDNN", "cpu_feature_guard", "cudart_stub", "absl::InitializeLog",
         "rebuild TensorFlow")


def test_program_merge_prints_no_backend_log_lines(files, tmp_path):
    base, adapter, _ = files
    out = str(tmp_path / "merged.keras")
    env = {k: v for k, v in os.environ.items() if k not in cli.QUIET_ENVIRONMENT}
    result = subprocess.run(
        [sys.executable, "-m", "keras_lora.cli", "merge", base, adapter, "-o", out],
        capture_output=True, text=True, cwd=REPO_ROOT, env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert [n for n in NOISE if n in result.stderr] == [], result.stderr[-2000:]
    assert result.stdout == f"Wrote merged model to {out}\n"


def test_filtered_stderr_drops_native_log_lines_and_keeps_the_rest(tmp_path):
    code = (
        "import os\n"
        "from keras_lora.native_logs import filtered_stderr\n"
        "with filtered_stderr():\n"
        "    os.write(2, b'WARNING: All log messages before absl::InitializeLog() "
        "is called are written to STDERR\\n')\n"
        "    os.write(2, b'I0000 00:00:1796164863.342033    8401 cudart_stub.cc:31] "
        "Could not find cuda drivers\\nreal problem\\n')\n"
        "    os.write(2, b'E0000 00:00:17.1 3 op.cc:9] an error stays\\n')\n"
        "os.write(2, b'after\\n')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, cwd=REPO_ROOT
    )
    assert result.stderr.decode().splitlines() == [
        "real problem", "E0000 00:00:17.1 3 op.cc:9] an error stays", "after"
    ]


# Files merge writes ------------------------------------------------------


def test_merge_output_gets_the_umask_mode_and_removes_stale_leftovers(files, tmp_path):
    base, adapter, _ = files
    out = str(tmp_path / "merged.keras")
    stale = tmp_path / ".merged.keras.abcd1234.keras"
    stale.write_bytes(b"partial")
    other = tmp_path / ".merged.keras.abcd1234.keras.bak"
    other.write_bytes(b"not ours")
    previous = os.umask(0o027)
    try:
        assert cli.main(["merge", base, adapter, "-o", out]) == 0
    finally:
        os.umask(previous)
    assert oct(os.stat(out).st_mode & 0o777) == oct(0o640)
    assert not stale.exists() and other.exists()
