"""export_merged: SavedModels from every backend, served by TensorFlow alone."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import test_cli

from keras_lora import export
from keras_lora.export import export_merged
from keras_lora.surgery import lora_layers


X = np.linspace(-1, 1, 12, dtype="float32").reshape(3, 4)

# Runs with TensorFlow only: loads each SavedModel, calls `serve`, and
# reports the outputs and whether keras_lora was ever imported.
VERIFY = """
import json, sys
import numpy as np
import tensorflow as tf
x = np.load(sys.argv[1])
outputs = {}
for name in sys.argv[2:]:
    artifact = tf.saved_model.load(name)
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


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Exports a plain and a LoRA model, then serves both with TF only."""
    directory = tmp_path_factory.mktemp("export")
    models = {"plain": plain_model(), "lora": lora_model()}
    paths = {}
    for name, model in models.items():
        paths[name] = export_merged(model, str(directory / name))
    np.save(directory / "x.npy", X)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", VERIFY, str(directory / "x.npy"),
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
    assert sorted(os.listdir(directory)) == ["lora", "plain", "x.npy"]


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

    def crash(model, artifact, format, spec, staging):
        os.makedirs(artifact)
        with open(os.path.join(artifact, "saved_model.pb"), "w") as handle:
            handle.write("partial")
        raise RuntimeError("export crashed")

    monkeypatch.setattr(export, "_write_artifact", crash)
    with pytest.raises(RuntimeError, match="export crashed"):
        export_merged(plain_model(), str(target))
    assert (target / "saved_model.pb").read_text() == "previous"
    assert os.listdir(tmp_path) == ["m"]


def test_subprocess_failure_shows_its_error(tmp_path, monkeypatch):
    monkeypatch.setattr(
        export, "_WORKER", "import sys; sys.exit('worker failed: ' + sys.argv[3])"
    )
    with pytest.raises(RuntimeError, match="(?s)exit code 1.*worker failed: litert"):
        export._export_in_subprocess(
            "m.keras", str(tmp_path / "a"), "litert",
            export.FORMATS["litert"],
        )
