"""export_merged: SavedModels from every backend, served by TensorFlow alone."""

import json
import os
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import test_cli
import test_surgery

from keras_lora import export
from keras_lora import export_worker
from keras_lora.export import export_merged
from keras_lora import file_swap
from keras_lora.surgery import apply_lora
from keras_lora.surgery import lora_layers


X = np.linspace(-1, 1, 12, dtype="float32").reshape(3, 4)

# Runs with TensorFlow only: loads each SavedModel, calls `serve`, and
# reports the outputs and whether keras_lora was ever imported.
VERIFY = """
import json, sys
import numpy as np
import tensorflow as tf
inputs = np.load(sys.argv[1])
outputs = {}
for name in sys.argv[2:]:
    artifact = tf.saved_model.load(name)
    x = inputs["x6" if name.endswith("subclassed") else "x"]
    outputs[name] = np.asarray(artifact.serve(tf.constant(x))).tolist()
print(json.dumps({
    "outputs": outputs,
    "keras_lora_imported": any(m.startswith("keras_lora") for m in sys.modules),
}))
"""


# The same small Dense + EinsumDense model the CLI tests use.
plain_model = test_cli.base_model
lora_model = test_cli.adapted_model


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def subclassed_lora_model():
    """test_surgery's registered `Subclassed` model (custom classes in an
    importable module), called once, adapted with a non-zero update."""
    model = test_surgery.Subclassed(name="sub")
    model(np.zeros((1, 6), "float32"))
    apply_lora(model, rank=2)
    for layer in lora_layers(model).values():
        layer.lora_b.assign(np.full(layer.lora_b.shape, 0.1, "float32"))
    return model


X6 = np.linspace(-1, 1, 18, dtype="float32").reshape(3, 6)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Exports a plain and a LoRA model, then serves both with TF only."""
    directory = tmp_path_factory.mktemp("export")
    models = {"plain": plain_model(), "lora": lora_model(),
              "subclassed": subclassed_lora_model()}
    paths = {}
    for name, model in models.items():
        paths[name] = export_merged(model, str(directory / name))
    np.savez(directory / "x.npz", x=X, x6=X6)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", VERIFY, str(directory / "x.npz"),
         *paths.values()],
        capture_output=True, text=True, env=env, cwd=str(directory),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return models, paths, report, directory


def test_plain_model_saved_model_serves_its_outputs(served):
    models, paths, report, _ = served
    np.testing.assert_allclose(
        report["outputs"][paths["plain"]], to_numpy(models["plain"](X)),
        rtol=1e-5, atol=1e-5,
    )


def test_lora_model_saved_model_serves_the_lora_outputs(served):
    models, paths, report, _ = served
    np.testing.assert_allclose(
        report["outputs"][paths["lora"]], to_numpy(models["lora"](X)),
        rtol=1e-5, atol=1e-5,
    )


def test_serving_process_never_imports_keras_lora(served):
    assert served[2]["keras_lora_imported"] is False


def test_export_leaves_the_lora_model_unchanged(served):
    models, _, _, _ = served
    assert list(lora_layers(models["lora"])) == ["dense", "einsum"]


def test_export_leaves_no_temporary_files(served):
    _, _, _, directory = served
    assert sorted(os.listdir(directory)) == [
        "lora", "plain", "subclassed", "x.npz"
    ]


def test_subclassed_lora_model_serves_the_lora_outputs(served):
    models, paths, report, _ = served
    np.testing.assert_allclose(
        report["outputs"][paths["subclassed"]],
        to_numpy(models["subclassed"](X6)), rtol=1e-5, atol=1e-5,
    )


# Off TensorFlow, LiteRT takes the subprocess route the SavedModel tests
# above cover on every backend; one in-process run keeps the suite fast.
@pytest.mark.backend("tensorflow")
def test_litert_export_serves_the_lora_outputs(tmp_path):
    import tensorflow as tf

    model = lora_model()
    path = export_merged(model, str(tmp_path / "model.tflite"), format="litert")
    interpreter = tf.lite.Interpreter(model_path=path)
    interpreter.resize_tensor_input(
        interpreter.get_input_details()[0]["index"], X.shape
    )
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], X)
    interpreter.invoke()
    np.testing.assert_allclose(
        interpreter.get_tensor(interpreter.get_output_details()[0]["index"]),
        to_numpy(model(X)), rtol=1e-5, atol=1e-5,
    )


# Errors -------------------------------------------------------------------


def test_unknown_format_is_rejected_with_the_supported_list(tmp_path):
    with pytest.raises(ValueError, match=r"format='saved'.*'tf_saved_model'"):
        export_merged(plain_model(), str(tmp_path / "m"), format="saved")


@pytest.mark.parametrize("format", ["onnx", "openvino", "torch"])
def test_formats_keras_knows_but_this_route_does_not_say_why(tmp_path, format):
    with pytest.raises(ValueError, match=f"does not support format='{format}'"):
        export_merged(plain_model(), str(tmp_path / "m"), format=format)


def test_missing_tensorflow_is_a_clear_error(tmp_path, monkeypatch):
    real_find_spec = export.importlib.util.find_spec
    monkeypatch.setattr(
        export.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorflow" else real_find_spec(name, *a),
    )
    with pytest.raises(ImportError, match="pip install tensorflow"):
        export_merged(plain_model(), str(tmp_path / "m"))


def test_missing_parent_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="parent directory"):
        export_merged(plain_model(), str(tmp_path / "no" / "m"))


def test_litert_path_must_end_in_tflite(tmp_path):
    with pytest.raises(ValueError, match="must end in '.tflite'"):
        export_merged(plain_model(), str(tmp_path / "m"), format="litert")


def test_existing_artifact_is_kept_without_overwrite(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_merged(plain_model(), str(tmp_path / "m"), overwrite=False)


def fake_export(content):
    """A `_write_artifact` writing a one-file 'SavedModel' holding `content`."""
    def write(model, artifact, *args):
        os.makedirs(artifact)
        with open(os.path.join(artifact, "saved_model.pb"), "w") as handle:
            handle.write(content)
    return write


def previous_saved_model(path, content="previous"):
    path.mkdir()
    (path / "saved_model.pb").write_text(content)


@pytest.mark.parametrize("atomic_exchange", [True, False],
                         ids=["renameat2", "two_renames"])
def test_a_previous_saved_model_is_replaced_by_default(
    tmp_path, monkeypatch, atomic_exchange
):
    previous_saved_model(tmp_path / "m")
    if not atomic_exchange:
        monkeypatch.setattr(file_swap, "_exchange", lambda a, b: False)
    monkeypatch.setattr(export, "_write_artifact", fake_export("new"))
    export_merged(plain_model(), str(tmp_path / "m"))
    assert (tmp_path / "m" / "saved_model.pb").read_text() == "new"
    assert os.listdir(tmp_path) == ["m"]


@pytest.mark.parametrize("kind", ["file", "other_directory"])
def test_replacing_anything_but_a_previous_artifact_needs_overwrite_true(
    tmp_path, monkeypatch, kind
):
    target = tmp_path / "m"
    if kind == "file":
        target.write_text("notes")
    else:
        target.mkdir()
        (target / "notes.txt").write_text("notes")
    monkeypatch.setattr(export, "_write_artifact", fake_export("new"))
    with pytest.raises(FileExistsError, match=r"not a TensorFlow SavedModel.*"
                       "overwrite=True"):
        export_merged(plain_model(), str(target))
    assert (target.read_text() if kind == "file"
            else (target / "notes.txt").read_text()) == "notes"
    export_merged(plain_model(), str(target), overwrite=True)
    assert (target / "saved_model.pb").read_text() == "new"
    assert os.listdir(tmp_path) == ["m"]


def dead_pid():
    return int(subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True, text=True, check=True,
    ).stdout)


def test_an_artifact_left_between_two_renames_is_recovered(tmp_path, monkeypatch):
    # A process killed between "old -> staging/previous" and "new -> target".
    staging = tmp_path / f".m.export-{dead_pid()}-abcd"
    staging.mkdir()
    previous_saved_model(staging / "previous")

    def crash(*args):
        raise RuntimeError("export crashed")

    monkeypatch.setattr(export, "_write_artifact", crash)
    with pytest.raises(RuntimeError, match="export crashed"):
        export_merged(plain_model(), str(tmp_path / "m"))
    assert (tmp_path / "m" / "saved_model.pb").read_text() == "previous"
    monkeypatch.setattr(export, "_write_artifact", fake_export("new"))
    export_merged(plain_model(), str(tmp_path / "m"))
    assert os.listdir(tmp_path) == ["m"]  # the dead staging is removed


def test_staging_of_a_live_export_is_left_alone(tmp_path, monkeypatch):
    live = tmp_path / f".m.export-{os.getpid()}-other"
    live.mkdir()
    monkeypatch.setattr(export, "_write_artifact", fake_export("new"))
    export_merged(plain_model(), str(tmp_path / "m"))
    assert sorted(os.listdir(tmp_path)) == sorted(["m", live.name])


def test_non_finite_update_writes_nothing(tmp_path):
    model = lora_model()
    lora_layers(model)["einsum"].lora_b.assign(np.full((2, 3), np.inf, "float32"))
    with pytest.raises(ValueError, match="'einsum'.*NaN or infinite"):
        export_merged(model, str(tmp_path / "m"))
    assert os.listdir(tmp_path) == []


def test_failed_export_keeps_the_previous_artifact(tmp_path, monkeypatch):
    target = tmp_path / "m"
    target.mkdir()
    (target / "saved_model.pb").write_text("previous")

    def crash(model, artifact, *args):
        os.makedirs(artifact)
        with open(os.path.join(artifact, "saved_model.pb"), "w") as handle:
            handle.write("partial")
        raise RuntimeError("export crashed")

    monkeypatch.setattr(export, "_write_artifact", crash)
    with pytest.raises(RuntimeError, match="export crashed"):
        export_merged(plain_model(), str(target))
    assert (target / "saved_model.pb").read_text() == "previous"
    assert os.listdir(tmp_path) == ["m"]


def request(tmp_path, format="litert"):
    return {"model": "m.keras", "artifact": str(tmp_path / "a"),
            "format": format, "input_signature": None, "modules": []}


def test_subprocess_failure_shows_its_error(tmp_path, monkeypatch):
    monkeypatch.setattr(
        export, "_EXPORT",
        "import json, sys; print('log line'); "
        "sys.exit('worker failed: ' + json.loads(sys.argv[2])['format'])",
    )
    with pytest.raises(
        RuntimeError, match="(?s)exit code 1.*log line.*worker failed: litert"
    ):
        export._export_in_subprocess(request(tmp_path), export.FORMATS["litert"])


def test_a_custom_class_the_subprocess_cannot_find_names_custom_modules(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(
        export, "_EXPORT",
        "import sys; sys.exit(\"TypeError: Could not locate class 'Net'\")",
    )
    with pytest.raises(RuntimeError, match="custom_modules"):
        export._export_in_subprocess(request(tmp_path), export.FORMATS["litert"])


def test_a_successful_export_prints_nothing(tmp_path, capfd):
    export_merged(lora_model(), str(tmp_path / "m"))
    captured = capfd.readouterr()
    assert (captured.out, captured.err) == ("", "")


def test_the_worker_starts_with_the_parent_watchdog():
    assert export_worker.SERVER.startswith(export_worker.WATCHDOG)


def test_the_export_process_ends_when_its_parent_is_killed(tmp_path):
    # parent -> child (the watchdog, then a long sleep in place of an export)
    child_code = export_worker.WATCHDOG + (
        "open(sys.argv[2], 'w').write(str(os.getpid()))\n"
        "time.sleep(300)\n"
    )
    parent_code = (
        "import os, subprocess, sys\n"
        "subprocess.run([sys.executable, '-c', sys.argv[1], str(os.getpid()), "
        "sys.argv[2]])\n"
    )
    flag = tmp_path / "child.pid"
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code, child_code, str(flag)]
    )
    try:
        for _ in range(600):
            if flag.exists() and flag.read_text():
                break
            time.sleep(0.1)
        child = int(flag.read_text())
        assert file_swap.process_alive(child)
    finally:
        parent.kill()
        parent.wait()
    for _ in range(600):  # the watchdog polls every 0.2 s
        if not file_swap.process_alive(child):
            break
        time.sleep(0.1)
    assert not file_swap.process_alive(child)


def test_a_never_called_subclassed_model_needs_an_input_signature(tmp_path):
    model = test_surgery.Subclassed(name="sub")
    model.build((None, 6))
    with pytest.raises(ValueError, match="never called.*input_signature="):
        export_merged(model, str(tmp_path / "m"))
    assert os.listdir(tmp_path) == []


def test_a_subclassed_model_exports_with_an_explicit_input_signature(tmp_path):
    model = subclassed_lora_model()
    path = export_merged(
        model, str(tmp_path / "m"),
        input_signature=[keras.InputSpec(shape=(None, 6), dtype="float32")],
    )
    assert os.path.isfile(os.path.join(path, "saved_model.pb"))


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"custom_modules": "mymodule"}, "list of module names"),
        ({"input_signature": keras.InputSpec(shape=(None, 4))}, "list or tuple"),
        ({"input_signature": [object()]}, "have `shape` and `dtype`"),
        ({"overwrite": "yes"}, "None, True or False"),
    ],
    ids=["modules_string", "signature_not_list", "signature_entry", "overwrite"],
)
def test_bad_export_arguments_are_type_errors(tmp_path, arguments, message):
    with pytest.raises(TypeError, match=message):
        export_merged(plain_model(), str(tmp_path / "m"), **arguments)
    assert os.listdir(tmp_path) == []


def test_the_cli_input_signature_text_parses_to_input_specs():
    from keras_lora import export_signature

    specs = export_signature.parse('[{"shape": [null, 6], "dtype": "float32"}]')
    assert (specs[0].shape, specs[0].dtype) == ((None, 6), "float32")
    with pytest.raises(ValueError, match="JSON list"):
        export_signature.parse('{"shape": [null, 6], "dtype": "float32"}')
    with pytest.raises(ValueError, match="exactly `shape` and `dtype`"):
        export_signature.parse('[{"shape": [null, 6]}]')
