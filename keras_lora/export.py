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
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

import keras

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

_WORKER = """
import sys
import keras
model = keras.saving.load_model(sys.argv[1], compile=False)
model.export(sys.argv[2], format=sys.argv[3], verbose=False)
"""


def export_merged(model, path, format="tf_saved_model", overwrite=True):
    """Exports a (LoRA) model, adapters merged, for serving.

    LoRA layers are folded into plain `Dense` / `EinsumDense` layers first
    (`merge_lora`; `model` itself is not changed), so the artifact needs
    neither keras-lora nor Keras to serve. A model without LoRA layers is
    exported as it is. Works from the JAX, TensorFlow and PyTorch backends:
    off TensorFlow, the export runs in a subprocess with
    `KERAS_BACKEND=tensorflow`.

    The artifact is written beside `path` under a temporary name and moved
    into place when complete, so an interrupted export never leaves a
    partial artifact at `path`.

    Args:
        model: a built Keras model, with or without LoRA layers.
        path: where to write: a directory for `"tf_saved_model"`, a file
            ending in `.tflite` for `"litert"`. Its parent must exist.
        format: `"tf_saved_model"` (default; load it with
            `tf.saved_model.load(path)` and call its `serve` endpoint) or
            `"litert"`.
        overwrite: replace an existing artifact at `path` (default).

    Returns:
        The path written, as a string.

    Raises:
        ValueError: for an unknown or unsupported format, a bad path, or a
            model whose update holds NaN / infinite values.
        ImportError: if TensorFlow is not installed.
        FileNotFoundError: if the parent directory of `path` is missing.
        FileExistsError: if `path` exists and `overwrite=False`.
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
    target = _check_target(path, spec, overwrite)
    if not getattr(model, "built", False):
        raise ValueError(
            f"export_merged needs a built model, but '{model.name}' is not "
            "built. Call it on data first."
        )
    plain = _merged_or_plain(model)
    parent, name = os.path.split(target)
    staging = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        artifact = os.path.join(staging, name)
        _write_artifact(plain, artifact, format, spec, staging)
        _move_into_place(artifact, target, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
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


def _check_target(path, spec, overwrite):
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
    if os.path.lexists(target) and not overwrite:
        raise FileExistsError(
            f"export_merged: '{target}' exists. Pass overwrite=True to "
            "replace it."
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


def _write_artifact(model, artifact, format, spec, staging):
    if keras.backend.backend() == spec.backend:
        model.export(artifact, format=format, verbose=False)
        return
    keras_file = os.path.join(staging, "merged.keras")
    model.save(keras_file)
    _export_in_subprocess(keras_file, artifact, format, spec)


def _export_in_subprocess(keras_file, artifact, format, spec):
    env = dict(os.environ, KERAS_BACKEND=spec.backend)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    result = subprocess.run(
        [sys.executable, "-c", _WORKER, keras_file, artifact, format],
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0 or not os.path.exists(artifact):
        raise RuntimeError(
            f"export_merged(format={format!r}): the {spec.backend}-backend "
            f"export process failed (exit code {result.returncode}). Its "
            f"error output ends with:\n{result.stderr[-4000:]}"
        )


def _move_into_place(artifact, target, staging):
    """Renames the finished artifact to `target`, replacing what was there."""
    if not os.path.lexists(target):
        os.replace(artifact, target)
        return
    if os.path.isfile(artifact) and not os.path.isdir(target):
        os.replace(artifact, target)  # atomic for files
        return
    # A directory cannot be swapped atomically: move the old one aside
    # first and put it back if the second rename fails.
    previous = os.path.join(staging, ".previous")
    os.rename(target, previous)
    try:
        os.rename(artifact, target)
    except OSError:
        os.rename(previous, target)
        raise
