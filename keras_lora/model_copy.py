"""Copies of a model: rebuilt from its config, then its state copied over.

`merge_lora` rebuilds an adapted model without its LoRA layers and copies
the (merged) weights; `clone_with_lora` rebuilds a base model and copies
its weights before adapting the copy. Both rebuild through Keras's own
serialization (so the model's class is kept: a keras-hub task stays a
task) and pair layers by position in their parents' tracking order.
"""

import contextlib
import shutil
import tempfile

import keras
from keras import ops

from keras_lora import model_walk
from keras_lora.layers import LoRALayer

_WHO = "copying the model's state"


def rebuild(model, transform=None, who="keras-lora"):
    """A new, unbuilt-weights model from `model`'s config (compile left out).

    Args:
        model: a Keras model that Keras can serialize.
        transform: optional function applied to the serialized config.
        who: the caller's name, for the error message.

    Returns:
        The new model (its weights freshly initialized).

    Raises:
        ValueError: if Keras cannot rebuild the model from its config.
    """
    config = keras.saving.serialize_keras_object(model)
    config.pop("compile_config", None)
    if transform is not None:
        config = transform(config)
    try:
        return keras.saving.deserialize_keras_object(config)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{who}: Keras cannot rebuild model '{model.name}' from its "
            "config (register custom classes with "
            "`keras.saving.register_keras_serializable`), or use "
            f"`merge_lora(model, in_place=True)`. Cause: {error}"
        ) from error


def copy_state(source, target, path="", merged_of=None):
    """Copies weights and assets from `source`'s layer tree to `target`'s.

    Args:
        source: the model (or layer) to copy from; may hold LoRA layers,
            which pair with their base layer's class in `target`.
        target: the rebuilt model (or layer).
        path: the path of `source` in the model, for error messages.
        merged_of: for a LoRA layer in `source`, returns `{id(variable):
            value}` of the base weights to copy with another value (its
            merged kernel, and any other table it merges, for `merge_lora`).
    """
    _copy_state(source, target, path, merged_of)


def _copy_state(source, target, path, merged_of):
    """Copies weights and assets from `source`'s layer tree to `target`'s.

    Sub-layers are paired by position (the order in which each parent
    tracks them), which the rebuilt model reproduces; every pair must have
    the same class (a LoRA layer pairs with its base layer's class) and
    every variable the same shape.
    """
    source_layer = source.base_layer if isinstance(source, LoRALayer) else source
    where = path or source.name
    if type(source_layer) is not type(target):
        raise ValueError(
            f"{_WHO}: layer '{where}' is a {type(source_layer).__name__} "
            f"in the LoRA model but a {type(target).__name__} in the rebuilt "
            "model."
        )
    _copy_own_variables(source, target, where, merged_of)
    _copy_assets(source_layer, target)
    if isinstance(source, LoRALayer):
        return
    source_children = _stateful_sublayers(source)
    target_children = _stateful_sublayers(target)
    if len(source_children) != len(target_children):
        raise ValueError(
            f"{_WHO}: layer '{where}' has {len(source_children)} "
            f"sub-layers in the LoRA model but {len(target_children)} in the "
            "rebuilt model: "
            f"{[c.name for c in source_children]} vs "
            f"{[c.name for c in target_children]}."
        )
    for source_child, target_child in zip(source_children, target_children):
        child_path = f"{path}/{source_child.name}" if path else source_child.name
        _copy_state(source_child, target_child, child_path, merged_of)


def _stateful_sublayers(layer):
    # Stateless sub-layers may be created lazily on the first call (keras-hub
    # packers), so only layers holding weights or assets are paired.
    children = model_walk.sublayers(layer)
    # On torch, keras-hub tasks keep `preprocessor` out of layer tracking;
    # its tokenizer still holds a vocabulary to carry over.
    preprocessor = getattr(layer, "preprocessor", None)
    if isinstance(preprocessor, keras.layers.Layer) and all(
        child is not preprocessor for child in children
    ):
        children.append(preprocessor)
    return [child for child in children if child.weights or _has_assets(child)]


def _has_assets(layer):
    if hasattr(layer, "save_assets"):
        return True
    return any(_has_assets(child) for child in model_walk.sublayers(layer))


def _copy_own_variables(source, target, where, merged_of):
    replaced = (
        merged_of(source)
        if merged_of is not None and isinstance(source, LoRALayer) else {}
    )
    if isinstance(replaced, ByName):
        values = _values_by_name(replaced, target, where)
    elif isinstance(source, LoRALayer):
        values = [
            replaced.get(id(variable), variable.value)
            for variable in model_walk.own_variables(source.base_layer)
        ]
    else:
        values = [v.value for v in model_walk.own_variables(source)]
    variables = model_walk.own_variables(target)
    if len(values) != len(variables):
        raise ValueError(
            f"{_WHO}: layer '{where}' has {len(values)} variables in the "
            f"LoRA model but {len(variables)} in the rebuilt model."
        )
    for value, variable in zip(values, variables):
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(
                f"{_WHO}: variable '{variable.path}' of layer '{where}' "
                f"has shape {tuple(value.shape)} in the LoRA model but "
                f"{tuple(variable.shape)} in the rebuilt model."
            )
        # A copy: on JAX two variables must never share one buffer, since a
        # jitted step may donate (delete) it.
        variable.assign(ops.copy(value))


class ByName(dict):
    """`{variable name: value}`: the whole state of a rebuilt layer whose
    variables differ from the source's (a quantized base rebuilt float)."""


def _values_by_name(values, target, where):
    names = [variable.name for variable in model_walk.own_variables(target)]
    if sorted(names) != sorted(values):
        raise ValueError(
            f"{_WHO}: layer '{where}' has variables {sorted(values)} to copy "
            f"but {sorted(names)} in the rebuilt model."
        )
    return [values[name] for name in names]


def _copy_assets(source, target):
    # Vocabularies and other files live outside the config (keras-hub
    # tokenizers, lookup layers); pass them through Keras's own hooks.
    save = getattr(source, "save_assets", None)
    load = getattr(target, "load_assets", None)
    if save is None or load is None:
        return
    with _temporary_directory() as directory:
        save(directory)
        load(directory)


@contextlib.contextmanager
def _temporary_directory():
    directory = tempfile.mkdtemp(prefix="keras_lora_assets_")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
