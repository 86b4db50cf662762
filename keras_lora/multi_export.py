"""One SavedModel serving many adapters, chosen per example.

`export_multi_adapter` exports `mixed_batch_model(model, adapter_names)`:
the SavedModel's `serve` endpoint takes the model's inputs plus
`adapter_index`, and holds the base weights once and every adapter's
factors. The traced graph is plain TensorFlow, so serving needs neither
keras-lora nor Keras. As `export_merged`, it works from every backend: off
TensorFlow, the adapted model is saved to a `.keras` file (all adapters
kept) and a TensorFlow-backend subprocess with keras-lora loads it, builds
the mixed-batch model and exports it; the artifact is moved into place
only when complete.
"""

import importlib
import os
import shutil
import tempfile

import keras

from keras_lora import export
from keras_lora import export_signature
from keras_lora import mixed_batch
from keras_lora import model_io

_FORMAT = "tf_saved_model"

_EXPORT = """
import importlib, json
request = json.loads(sys.argv[2])
for name in request["modules"]:
    importlib.import_module(name)
import keras_lora
from keras_lora import multi_export
model = keras_lora.load_model(request["model"], compile=False)
multi_export.save_served(model, request["adapter_names"], request["artifact"])
"""


def export_multi_adapter(model, path, adapter_names, overwrite=None,
                         custom_modules=None):
    """Exports a SavedModel that serves every named adapter from one graph.

    The serving endpoint (`serve`, also the `serving_default` signature)
    takes the model's inputs plus an `int32` `adapter_index` of shape
    `(batch,)` (an extra key for dict inputs, else one more positional
    input): example `i` is computed with `adapter_names[adapter_index[i]]`,
    or with the base model for -1, as `mixed_batch_model` does. Load it
    with plain `tf.saved_model.load(path)`; keras-lora is not needed to
    serve. Works from the JAX, TensorFlow and PyTorch backends (off
    TensorFlow, in a TensorFlow-backend subprocess, as `export_merged`).
    `model` is not changed.

    Args:
        model: a built functional or `Sequential` model (keras-hub
            backbones and tasks included) with LoRA layers.
        path: the SavedModel directory to write; its parent must exist.
        adapter_names: the adapters to serve, in index order.
        overwrite: as for `export_merged`: `None` replaces a previous
            SavedModel only, `True` anything, `False` nothing.
        custom_modules: optional module names the export subprocess
            imports first (where custom classes are registered).

    Returns:
        The path written, as a string.

    Raises:
        TypeError, ValueError: as `mixed_batch_model`, and for a bad path.
        ImportError: if TensorFlow is not installed.
        FileNotFoundError: if the parent directory of `path` is missing.
        FileExistsError: if `path` holds something `overwrite` does not
            allow replacing.
        RuntimeError: if the export subprocess fails (its error is shown).

    Example:

    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model = add_adapter(apply_lora(model, rank=2), "task_b", rank=4)
    >>> export_multi_adapter(model, "/tmp/served", ["default", "task_b"])  # doctest: +SKIP
    '/tmp/served'
    >>> served = tf.saved_model.load("/tmp/served")  # doctest: +SKIP
    >>> served.serve([np.ones((2, 8)), np.array([0, 1], "int32")])  # doctest: +SKIP
    """
    names = mixed_batch.check_request(model, adapter_names,
                                      "export_multi_adapter")
    spec = export.check_format(_FORMAT)
    modules = export._check_modules(custom_modules)
    target = export._check_target(path, spec, overwrite)
    parent, name = os.path.split(target)
    export._recover_previous(parent, name, target)
    staging = tempfile.mkdtemp(
        prefix=f".{name}{export._STAGING_TAG}{os.getpid()}-", dir=parent
    )
    try:
        artifact = os.path.join(staging, name)
        _write(model, names, artifact, spec, staging, modules)
        export._move_into_place(artifact, target, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    export._remove_stale_staging(parent, name)
    return target


def _write(model, names, artifact, spec, staging, modules):
    if keras.backend.backend() == spec.backend:
        for module in modules:
            importlib.import_module(module)
        save_served(model, names, artifact)
        return
    keras_file = os.path.join(staging, "adapted.keras")
    model_io.save_model(model, keras_file)
    request = {
        "model": keras_file,
        "artifact": artifact,
        "format": _FORMAT,
        "adapter_names": names,
        "modules": export_signature.modules_to_import(model, modules),
    }
    export._export_in_subprocess(request, spec, source=_EXPORT,
                                 caller="export_multi_adapter")


def save_served(model, adapter_names, artifact):
    """Writes the mixed-batch SavedModel (TensorFlow backend only).

    Not `Model.export`: TensorFlow refuses to save Keras layer lists that
    `apply_lora` / `load_adapter` edited in place, so the SavedModel holds
    a plain `tf.Module` with the variables and the traced functions:
    `serve(inputs)` (inputs nested as the mixed-batch model takes them)
    and the flat `serving_default` signature (one argument per input
    name).
    """
    import tensorflow as tf

    served = mixed_batch.mixed_batch_model(model, adapter_names)
    structure = mixed_batch.input_structure(served)
    if isinstance(structure, dict):
        specs = {
            key: tf.TensorSpec(tuple(t.shape), t.dtype, name=key)
            for key, t in structure.items()
        }
    else:
        specs = [
            tf.TensorSpec(tuple(t.shape), t.dtype, name=_name(t, i))
            for i, t in enumerate(structure)
        ]

    @tf.function(input_signature=[specs])
    def serve(inputs):
        return served(inputs, training=False)

    @tf.function(input_signature=keras.tree.flatten(specs))
    def serving_default(*flat):
        inputs = keras.tree.pack_sequence_as(specs, list(flat))
        outputs = served(inputs, training=False)
        if isinstance(outputs, dict):
            return dict(outputs)
        flat_outputs = keras.tree.flatten(outputs)
        return {f"output_{i}": out for i, out in enumerate(flat_outputs)}

    module = tf.Module()
    module.variables_to_serve = [v.value for v in served.variables]
    module.serve = serve
    tf.saved_model.save(
        module, artifact,
        signatures={"serving_default": serving_default.get_concrete_function()},
    )


def _name(tensor, position):
    name = getattr(tensor, "name", None) or ""
    if not name or name.startswith("keras_tensor"):
        return f"input_{position}"
    return name
