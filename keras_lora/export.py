"""Serving export of a merged model, from every backend.

Keras's own `model.export(format="tf_saved_model")` runs on TensorFlow and
JAX but fails on PyTorch, and on JAX it embeds XLA code compiled for the
exporting platform. A merged model is plain Keras, so the route here works
the same from every backend: merge, save a `.keras` file, and let a
TensorFlow-backend Python process load it and call `model.export`. On the
TensorFlow backend the export runs in this process instead.

Requirement: TensorFlow installed in this Python environment (the
subprocess uses the same interpreter, `sys.executable`).
"""

import collections
import importlib
import importlib.util
import json
import os
import shutil
import tempfile

import keras

from keras_lora import export_worker
from keras_lora import file_swap
from keras_lora import export_signature
from keras_lora import model_walk
from keras_lora.layers import LoRALayer
from keras_lora.merge import merge_lora

_Format = collections.namedtuple(
    "_Format", ["backend", "module", "suffix", "artifact"]
)

# What `export_merged` writes, and the backend whose Keras exporter does it.
FORMATS = {
    "tf_saved_model": _Format(
        "tensorflow", "tensorflow", None, "a TensorFlow SavedModel directory"
    ),
    "litert": _Format(
        "tensorflow", "tensorflow", ".tflite", "a LiteRT (TFLite) flatbuffer"
    ),
}

# Formats Keras knows that this route does not offer, and why.
_UNSUPPORTED = {
    "onnx": (
        "it needs packages not installed with keras-lora (`tf2onnx`, or "
        "`onnx` and `onnxscript` on torch). Call "
        "`merge_lora(model).export(path, format='onnx')` on a backend where "
        "they are installed"
    ),
    "openvino": (
        "it needs the `openvino` package. Call "
        "`merge_lora(model).export(path, format='openvino')` where it is "
        "installed"
    ),
    "torch": (
        "Keras's torch exporter fixes every input dimension to the traced "
        "sample (batch size 1). Call `merge_lora(model).export(path, "
        "format='torch', input_signature=...)` on the torch backend with the "
        "shapes you serve"
    ),
}

_EXPORT = """
import importlib, json
for name in json.loads(sys.argv[2])["modules"]:
    importlib.import_module(name)
import keras
request = json.loads(sys.argv[2], object_hook=lambda d: keras.InputSpec(
    shape=tuple(d["shape"]), dtype=d["dtype"]) if "__input_spec__" in d else d)
model = keras.saving.load_model(request["model"], compile=False)
signature = request["input_signature"]
kwargs = {} if signature is None else {"input_signature": signature}
model.export(request["artifact"], format=request["format"], verbose=False,
             **kwargs)
"""

# Staging directories beside the target: `.<name>.export-<pid>-<random>`;
# a crash between the two renames of the fallback swap leaves the previous
# artifact there as `previous`.
_STAGING_TAG = ".export-"
_PREVIOUS = "previous"


def export_merged(model, path, format="tf_saved_model", overwrite=None,
                  input_signature=None, custom_modules=None):
    """Exports a (LoRA) model, adapters merged, for serving.

    LoRA layers are folded into plain `Dense` / `EinsumDense` layers first
    (`merge_lora`; `model` itself is not changed), so the artifact needs
    neither keras-lora nor Keras to serve. A model without LoRA layers is
    exported as it is. Works from the JAX, TensorFlow and PyTorch backends:
    off TensorFlow, the export runs in a subprocess with
    `KERAS_BACKEND=tensorflow` (same interpreter, `sys.path` and
    environment), whose output is captured and shown only inside the error
    if it fails, and which ends itself if this process dies. The subprocess
    stays up for the next export, since starting one costs seconds (see
    `keras_lora/export_worker.py` for what carries over between exports).

    Subclassed models: custom classes must be registered
    (`keras.saving.register_keras_serializable`) in an importable module.
    The subprocess imports every such module this process has imported;
    name others with `custom_modules`. The input signature is taken from
    the model's first call, or from `input_signature`.

    The artifact is written beside `path` under a temporary name and moved
    into place only when complete. On Linux a directory is swapped in with
    one atomic exchange (`renameat2`), so `path` always holds the previous
    or the new artifact. Elsewhere the old directory is first moved into
    the hidden staging directory `.<name>.export-<pid>-<random>/previous`;
    if the process is killed between the two renames, the next
    `export_merged` to the same `path` puts it back before doing anything
    else. Every successful export removes the staging directories that
    dead processes left for the same `path`.

    Args:
        model: a built Keras model, with or without LoRA layers.
        path: where to write: a directory for `"tf_saved_model"`, a file
            ending in `.tflite` for `"litert"`. Its parent must exist.
        format: `"tf_saved_model"` (default; load it with
            `tf.saved_model.load(path)` and call its `serve` endpoint) or
            `"litert"`.
        overwrite: `None` (default) replaces a previous artifact of the same
            format (a SavedModel directory, a regular `.tflite` file) and
            refuses anything else; `True` replaces whatever is at `path`
            (a regular file by a directory included); `False` never
            replaces.
        input_signature: optional, as for `keras.Model.export`: a list of
            `keras.InputSpec` (or `tf.TensorSpec`, or anything with `shape`
            and `dtype`), nested like the model's inputs. Needed for a
            subclassed model that was built but never called.
        custom_modules: optional list of module names the export
            subprocess imports before loading the model (where custom
            classes are registered).

    Returns:
        The path written, as a string.

    Raises:
        ValueError: for an unknown or unsupported format, a bad path, a
            subclassed model without a known input signature, or a model
            whose update holds NaN / infinite values.
        ImportError: if TensorFlow is not installed.
        FileNotFoundError: if the parent directory of `path` is missing.
        FileExistsError: if `path` holds something `overwrite` does not
            allow replacing.
        RuntimeError: if the export subprocess fails (its error is shown).

    Example:

    >>> inputs = keras.Input((8,))
    >>> model = keras.Model(inputs, LoRADense(4, rank=2)(inputs))
    >>> export_merged(model, "/tmp/served")  # doctest: +SKIP
    '/tmp/served'
    >>> import tensorflow as tf  # doctest: +SKIP
    >>> tf.saved_model.load("/tmp/served").serve(np.ones((1, 8)))  # doctest: +SKIP
    """
    spec = check_format(format)
    modules = _check_modules(custom_modules)
    target = _check_target(path, spec, overwrite)
    if not getattr(model, "built", False):
        raise ValueError(
            f"export_merged needs a built model, but '{model.name}' is not "
            "built. Call it on data first."
        )
    signature = export_signature.resolve(model, input_signature)
    plain = _merged_or_plain(model)
    parent, name = os.path.split(target)
    _recover_previous(parent, name, target)
    staging = tempfile.mkdtemp(
        prefix=f".{name}{_STAGING_TAG}{os.getpid()}-", dir=parent
    )
    try:
        artifact = os.path.join(staging, name)
        _write_artifact(plain, artifact, format, spec, staging, signature,
                        modules)
        _move_into_place(artifact, target, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _remove_stale_staging(parent, name)
    return target


def supported_formats():
    """The formats `export_merged` writes."""
    return list(FORMATS)


def check_format(format):
    """Returns the route for `format`, or raises a clear error.

    Raises:
        ValueError: for an unknown or unsupported format.
        ImportError: if the package the format needs is missing.
    """
    if format in _UNSUPPORTED:
        raise ValueError(
            f"export_merged does not support format={format!r}: "
            f"{_UNSUPPORTED[format]}. Supported formats: {supported_formats()}"
        )
    if format not in FORMATS:
        raise ValueError(
            f"Unknown export format. Received: format={format!r}. Supported "
            f"formats: {supported_formats()}"
        )
    spec = FORMATS[format]
    if importlib.util.find_spec(spec.module) is None:
        raise ImportError(
            f"export_merged(format={format!r}) writes {spec.artifact} with "
            f"Keras's {spec.backend} backend, which needs the "
            f"`{spec.module}` package: `pip install {spec.module}`. It is "
            "only needed at export time."
        )
    return spec


def _check_modules(custom_modules):
    if custom_modules is None:
        return []
    if isinstance(custom_modules, str) or not all(
        isinstance(name, str) and name for name in custom_modules
    ):
        raise TypeError(
            "export_merged: `custom_modules` must be a list of module names. "
            f"Received: custom_modules={custom_modules!r}"
        )
    return list(custom_modules)


def _check_target(path, spec, overwrite):
    if overwrite not in (None, True, False):
        raise TypeError(
            "export_merged: `overwrite` must be None, True or False. "
            f"Received: overwrite={overwrite!r}"
        )
    target = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise FileNotFoundError(
            f"export_merged: the parent directory of the export path does "
            f"not exist: '{parent}'. Create it first. Received: path={path!r}"
        )
    if spec.suffix and not target.endswith(spec.suffix):
        raise ValueError(
            f"export_merged writes {spec.artifact}, whose path must end in "
            f"'{spec.suffix}'. Received: path={path!r}"
        )
    if not os.path.lexists(target) or overwrite is True:
        return target
    if overwrite is False:
        raise FileExistsError(
            f"export_merged: '{target}' exists. Pass overwrite=True to "
            "replace it."
        )
    if not file_swap.is_previous_artifact(target, spec.suffix is None):
        kind = "directory" if os.path.isdir(target) else "file"
        raise FileExistsError(
            f"export_merged: '{target}' is a {kind} that is not "
            f"{spec.artifact}; pass overwrite=True to replace it anyway."
        )
    return target


def _merged_or_plain(model):
    has_lora = any(
        isinstance(entry.layer, LoRALayer)
        for entry in model_walk.walk(
            model, descend_into=lambda layer: not isinstance(layer, LoRALayer)
        ).values()
    )
    return merge_lora(model) if has_lora else model


def _write_artifact(model, artifact, format, spec, staging, signature,
                    modules):
    if keras.backend.backend() == spec.backend:
        for name in modules:
            importlib.import_module(name)
        kwargs = {} if signature is None else {"input_signature": signature}
        model.export(artifact, format=format, verbose=False, **kwargs)
        return
    keras_file = os.path.join(staging, "merged.keras")
    model.save(keras_file)
    request = {
        "model": keras_file,
        "artifact": artifact,
        "format": format,
        "input_signature": export_signature.to_json(signature),
        "modules": export_signature.modules_to_import(model, modules),
    }
    _export_in_subprocess(request, spec)


def _export_in_subprocess(request, spec, source=None,
                          caller="export_merged"):
    """Runs the job `source` (Python source ending in an export;
    `sys.argv[2]` is the JSON `request`; default `_EXPORT`) in the warm
    `spec.backend` process (`export_worker`)."""
    status, output = export_worker.run_job(
        source or _EXPORT, json.dumps(request), spec.backend,
        request["modules"])
    if status != 0 or not os.path.lexists(request["artifact"]):
        output = output[-4000:]
        hint = ""
        if "Could not locate class" in output:
            hint = (
                " A custom class could not be found: register it with "
                "`keras.saving.register_keras_serializable` in an importable "
                "module (not a script's `__main__`) and name that module in "
                "`custom_modules=[...]`."
            )
        raise RuntimeError(
            f"{caller}(format={request['format']!r}): the "
            f"{spec.backend}-backend export process failed (exit code "
            f"{status}).{hint} Its output ends with:\n{output}"
        )


def _recover_previous(parent, name, target):
    file_swap.recover_previous(parent, f".{name}{_STAGING_TAG}", target,
                                  _PREVIOUS)


def _remove_stale_staging(parent, name):
    file_swap.remove_stale(parent, f".{name}{_STAGING_TAG}")


def _move_into_place(artifact, target, staging):
    file_swap.move_into_place(
        artifact, target, os.path.join(staging, _PREVIOUS)
    )
