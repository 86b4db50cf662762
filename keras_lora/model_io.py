"""Whole-model `.keras` files that keep their adapters, wherever they sit.

Keras re-creates a layer's sub-layers from the layer's own code when it
loads a `.keras` file, so a LoRA layer swapped *inside* another layer (an
attention block, a keras-hub transformer layer, a custom block) comes back
as the plain layer it replaced, and the file's weights no longer fit.
`save_model` therefore writes the base model (every LoRA layer swapped back
to its base layer for the duration of the save) plus the adapter, as a
safetensors file inside the same zip archive; `load_model` loads the base
with Keras and re-applies the adapter. Plain `keras.saving.load_model` reads
the same file as the base model.
"""

import contextlib
import json
import os
import tempfile
import zipfile

import keras

from keras_lora import adapters
from keras_lora import layer_swap
from keras_lora.surgery import lora_entries

ADAPTER_MEMBER = "keras_lora/adapter.safetensors"


def save_model(model, path):
    """Saves an adapted model to a `.keras` file, adapters included.

    The archive is the base model as Keras writes it (so any Keras can load
    it as the base) plus the adapter under `keras_lora/adapter.safetensors`.
    The write is atomic: an interrupted save leaves the previous file or
    none. Merged adapters (`merge_adapters`) are taken out of the kernels
    for the save and put back afterwards, so the file holds the true base.

    Args:
        model: a Keras model with LoRA layers.
        path: the `.keras` file to write; its directory must exist.

    Returns:
        The absolute path written.

    Example:

    >>> model = apply_lora(model, rank=8)  # doctest: +SKIP
    >>> save_model(model, "checkpoint.keras")  # doctest: +SKIP
    >>> restored = load_model("checkpoint.keras")  # doctest: +SKIP
    """
    target = os.path.abspath(os.fspath(path))
    if not target.endswith(".keras"):
        raise ValueError(
            f"save_model writes `.keras` files. Received: path={path!r}"
        )
    if not os.path.isdir(os.path.dirname(target)):
        raise FileNotFoundError(
            f"save_model: the directory of '{path}' does not exist. "
            "Create it first."
        )
    entries = lora_entries(model)
    if not entries:
        raise ValueError(
            f"save_model: model '{model.name}' has no LoRA layers; use "
            "`model.save(path)`."
        )
    directory = os.path.dirname(target)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".keras_lora_") as tmp:
        adapter_file = adapters.save_adapter(
            model, os.path.join(tmp, "adapter.safetensors")
        )
        archive = os.path.join(tmp, "model.keras")
        with _unmerged(entries), _base_layers_swapped_in(entries):
            model.save(archive)
        with zipfile.ZipFile(archive, "a") as handle:
            handle.write(adapter_file, ADAPTER_MEMBER)
        os.replace(archive, target)
    return target


def load_model(path, custom_objects=None, compile=True, safe_mode=True):
    """Loads a `.keras` file; re-applies its keras-lora adapter if it has one.

    Args:
        path: a `.keras` file (from `save_model`, or any Keras model file).
        custom_objects: as for `keras.saving.load_model`.
        compile: as for `keras.saving.load_model`.
        safe_mode: as for `keras.saving.load_model`.

    Returns:
        The model, adapted exactly as it was saved, with its adapter
        weights, and compiled with the saved settings (a fresh optimizer:
        optimizer state is not restored).
    """
    path = os.fspath(path)
    with zipfile.ZipFile(path) as handle:
        has_adapter = ADAPTER_MEMBER in handle.namelist()
        compile_config = json.loads(handle.read("config.json")).get(
            "compile_config"
        )
    if not has_adapter:
        return keras.saving.load_model(
            path, custom_objects=custom_objects, compile=compile,
            safe_mode=safe_mode,
        )
    # The saved optimizer state belongs to the adapters, which the base
    # model does not have yet: compile afresh once they are back.
    model = keras.saving.load_model(
        path, custom_objects=custom_objects, compile=False,
        safe_mode=safe_mode,
    )
    with zipfile.ZipFile(path) as handle, tempfile.TemporaryDirectory() as tmp:
        adapters.load_adapter(model, handle.extract(ADAPTER_MEMBER, tmp))
    if compile and compile_config:
        with keras.saving.custom_object_scope(custom_objects or {}):
            model.compile(**keras.saving.deserialize_keras_object(compile_config))
    return model


@contextlib.contextmanager
def _base_layers_swapped_in(entries):
    swapped = []
    try:
        for entry in entries:
            for parent in entry.parents:
                layer_swap.replace_layer(parent, entry.layer, entry.layer.base_layer)
                swapped.append((parent, entry.layer))
        yield
    finally:
        for parent, lora_layer in reversed(swapped):
            layer_swap.replace_layer(parent, lora_layer.base_layer, lora_layer)


@contextlib.contextmanager
def _unmerged(entries):
    merged = [e.layer for e in entries if e.layer.merged]
    for layer in merged:
        layer.unmerge()
    try:
        yield
    finally:
        for layer in merged:
            layer.merge()
