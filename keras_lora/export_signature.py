"""What an export needs besides the model: its input signature, its modules.

A functional or `Sequential` model declares its inputs; a subclassed model
knows them only from its first call (Keras records the shapes), and the
model `merge_lora` rebuilds from its config was never called at all. So
the signature is taken from the original model (or given by the user) and
handed to `Model.export` explicitly, in this process or, as JSON, to the
TensorFlow export subprocess, together with the modules that register the
model's custom classes (Keras imports only its own modules by name).
"""

import sys

import keras

# Packages whose classes Keras finds without an import by the user.
_KNOWN_PACKAGES = {"keras", "keras_hub", "keras_cv", "keras_nlp", "builtins"}


def resolve(model, input_signature=None):
    """The input signature to export `model` with, or None to let Keras decide.

    Args:
        model: the (LoRA) model being exported.
        input_signature: the user's signature: a list or tuple, nested like
            the model's inputs, of `keras.InputSpec` or anything with
            `shape` and `dtype` (`tf.TensorSpec`, arrays).

    Returns:
        A list of `keras.InputSpec` structures, or None for functional and
        `Sequential` models given no signature.

    Raises:
        TypeError: if `input_signature` is not a list or tuple of specs.
        ValueError: for a subclassed model that was never called and no
            `input_signature`.
    """
    if input_signature is not None:
        if not isinstance(input_signature, (list, tuple)):
            raise TypeError(
                "export_merged: `input_signature` must be a list or tuple of "
                "`keras.InputSpec` (one per positional input). Received: "
                f"input_signature={input_signature!r}"
            )
        return [keras.tree.map_structure(_input_spec, s)
                for s in input_signature]
    if isinstance(model, (keras.Sequential,)) or _is_functional(model):
        return None
    from keras.src.export import export_utils

    try:
        return export_utils.get_input_signature(model)
    except ValueError as error:
        raise ValueError(
            f"export_merged: the input signature of subclassed model "
            f"'{model.name}' is unknown: it was never called. Call it on data "
            "once, or pass input_signature=[keras.InputSpec(shape=(None, "
            "...), dtype='float32')]."
        ) from error


def parse(text):
    """An `input_signature` from JSON text, as the CLI takes it.

    Args:
        text: a JSON list with one entry per positional input, each
            `{"shape": [null, 8], "dtype": "float32"}` (or a list / dict of
            such entries for nested inputs).

    Returns:
        A list of `keras.InputSpec` structures.

    Raises:
        ValueError: if `text` is not such JSON.

    Example:

    >>> parse('[{"shape": [null, 8], "dtype": "float32"}]')[0].shape
    (None, 8)
    """
    import json

    def spec(entry):
        if set(entry) != {"shape", "dtype"}:
            raise ValueError(
                "each input signature entry needs exactly `shape` and "
                f"`dtype`. Received: {entry!r}"
            )
        return keras.InputSpec(shape=tuple(entry["shape"]),
                               dtype=entry["dtype"])

    try:
        value = json.loads(text, object_hook=spec)
    except (ValueError, TypeError) as error:
        raise ValueError(
            "--input-signature must be a JSON list like "
            '\'[{"shape": [null, 8], "dtype": "float32"}]\'. '
            f"Received: {text!r} ({error})"
        ) from error
    if not isinstance(value, list):
        raise ValueError(
            "--input-signature must be a JSON list (one entry per input). "
            f"Received: {text!r}"
        )
    return value


def to_json(signature):
    """`signature` as JSON-ready data (`{"__input_spec__": 1, ...}` leaves)."""
    if signature is None:
        return None
    return keras.tree.map_structure(
        lambda spec: {"__input_spec__": 1, "shape": list(spec.shape),
                      "dtype": spec.dtype},
        signature,
    )


def modules_to_import(model, explicit=()):
    """The modules defining `model`'s custom classes, then `explicit` ones.

    Only modules this process has imported (other than `__main__`): the
    export subprocess imports them before loading the model.
    """
    found = []
    _collect_modules(keras.saving.serialize_keras_object(model), found)
    modules = [
        name for name in found
        if name in sys.modules and name != "__main__"
        and name.split(".")[0] not in _KNOWN_PACKAGES
    ]
    return list(dict.fromkeys(modules + list(explicit)))


def _collect_modules(config, found):
    if isinstance(config, dict):
        if isinstance(config.get("module"), str) and "class_name" in config:
            found.append(config["module"])
        for value in config.values():
            _collect_modules(value, found)
    elif isinstance(config, (list, tuple)):
        for value in config:
            _collect_modules(value, found)


def _is_functional(model):
    from keras.src.models.functional import Functional

    return isinstance(model, Functional)


def _input_spec(value):
    if isinstance(value, keras.InputSpec):
        if value.shape is None or value.dtype is None:
            raise ValueError(
                "export_merged: every `keras.InputSpec` in `input_signature` "
                f"needs a shape and a dtype. Received: {value}"
            )
        return value
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(
            "export_merged: `input_signature` entries must be `keras.InputSpec` "
            "(or have `shape` and `dtype`). Received: "
            f"{value!r} of type {type(value).__name__}"
        )
    dtype = keras.backend.standardize_dtype(getattr(dtype, "name", dtype))
    return keras.InputSpec(shape=tuple(shape), dtype=dtype)
