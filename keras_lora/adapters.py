"""save_adapter / load_adapter: adapter files in and out of a model.

The file format (safetensors tensors `"<layer path>/lora_a"` and
`"<layer path>/lora_b"`, the other trained weights as
`"<layer path>/<variable name>"`, one JSON document in the header) lives in
`keras_lora.adapter_file`; this module matches a file against a model and
changes the model only once everything has been checked.
"""

import numpy as np
from keras import ops

from keras_lora import model_walk
from keras_lora.adapter_file import AdapterFile  # noqa: F401  (public type)
from keras_lora.adapter_file import read_adapter
from keras_lora.adapter_file import write_adapter_file
from keras_lora.layers import lora_class_for


def save_adapter(model, path):
    """Writes the model's LoRA adapters and other trained weights to a file.

    The write is atomic: the file is written under a temporary name in the
    same directory and renamed over `path`, so an interrupted save leaves
    the previous file (or none), never a partial one. The file holds
    `lora_a` / `lora_b` of every LoRA layer (float32), every other
    trainable weight of the model as float32 `"<layer path>/<variable
    name>"` (the layers kept fully trainable with
    `apply_lora(trainable=...)`, e.g. `"head/kernel"`, and the biases of
    `train_bias=True` layers, `"<LoRA layer path>/bias"`), plus a small JSON
    header (see `keras_lora.adapter_file`); its size is the tensor bytes
    plus a header of a few hundred bytes per layer.

    Args:
        model: a Keras model with LoRA layers.
        path: the file to write (conventionally `*.safetensors`). Its parent
            directory must exist.

    Returns:
        The absolute path written.

    Raises:
        ValueError: if the model has no LoRA layers, an adapter or trained
            weight holds NaN or infinite values, or a trainable weight
            belongs to no layer that can be re-created (the model itself,
            or a layer holding LoRA layers).
        FileNotFoundError: if the parent directory does not exist.

    Example:

    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model = apply_lora(model, rank=2)
    >>> save_adapter(model, "/tmp/task.safetensors")  # doctest: +SKIP
    """
    from keras_lora.surgery import lora_layers

    layers = lora_layers(model)
    if not layers:
        raise ValueError(
            f"save_adapter: model '{model.name}' has no LoRA layers. Use "
            "`apply_lora` first."
        )
    tensors, records = {}, {}
    for layer_path, layer in layers.items():
        for name in ("lora_a", "lora_b"):
            value = np.ascontiguousarray(
                ops.convert_to_numpy(getattr(layer, name).value), "float32"
            )
            if not np.all(np.isfinite(value)):
                raise ValueError(
                    f"save_adapter: layer '{layer_path}': {name} holds NaN "
                    "or infinite values; refusing to save it."
                )
            tensors[f"{layer_path}/{name}"] = value
        records[layer_path] = _record_of(layer)
    extras, trainable_layers = _trained_extras(model, layers)
    return write_adapter_file(
        path, tensors, records, extras=extras, trainable_layers=trainable_layers
    )


def load_adapter(model, path):
    """Loads an adapter file into a model; applies LoRA first if needed.

    Given a base model (no LoRA layers), LoRA is applied exactly as the file
    records it (same layers by path, ranks, alphas, rsLoRA, dropout,
    `train_bias`, the same fully trainable layers) and the weights are
    loaded. Given an adapted model, its LoRA layers must match the file's
    one for one, and the weights are loaded in place. In both cases the
    file's other trained weights (fully trainable layers, `train_bias`
    biases) are assigned too.

    Everything is checked before anything is changed: the file (truncated,
    foreign or non-safetensors files are rejected), every layer path, the
    LoRA class, rank, alpha, every tensor's shape and dtype (also of the
    other trained weights), and the base kernel shapes. On any mismatch the error names the first offending
    layer or key (and both shapes), and the model is exactly as before.
    Files load on every backend, whichever backend saved them.

    Args:
        model: a built Keras model, base or adapted.
        path: an adapter file written by `save_adapter`.

    Returns:
        `model`, with the adapter loaded.

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: if the file or the model does not match.

    Example:

    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model = load_adapter(model, "/tmp/task.safetensors")  # doctest: +SKIP
    """
    from keras_lora.surgery import lora_layers

    adapter = read_adapter(path)
    adapted = lora_layers(model)
    if not adapted:
        _check_base_model(model, adapter)
        _check_extras(model, {}, adapter)
        _apply_recorded(model, adapter)
        adapted = lora_layers(model)
    _check_adapted_model(adapted, adapter)
    extras = _check_extras(model, adapted, adapter)
    # Everything matches: only now assign.
    for layer_path, layer in adapted.items():
        layer.lora_a.assign(adapter.tensors[f"{layer_path}/lora_a"])
        layer.lora_b.assign(adapter.tensors[f"{layer_path}/lora_b"])
    for key, variable in extras.items():
        variable.assign(
            ops.cast(adapter.tensors[key], variable.dtype)
        )
    return model


# Matching a model ---------------------------------------------------------


def _record_of(layer):
    return {
        "class": type(layer).__name__,
        "base_class": type(layer.base_layer).__name__,
        "rank": layer.rank,
        "alpha": layer.alpha,
        "scaling": layer.scaling,
        "use_rslora": layer.use_rslora,
        "dropout": layer.dropout,
        "train_bias": layer.train_bias,
        "lora_a_shape": list(layer.lora_a.shape),
        "lora_b_shape": list(layer.lora_b.shape),
        "base_kernel_shape": list(layer.base_layer.kernel.shape),
    }



def _weights_by_key(model, adapted):
    """`{"<owner path>/<variable name>": variable}` for every weight that can
    be stored as an extra: the own variables of each layer outside the LoRA
    layers, and each LoRA layer's bias as `"<LoRA layer path>/bias"`. On a
    base model, a layer about to be adapted yields the same key for its bias.
    Also returns `{key: owner path}`.
    """
    adapted_ids = {id(layer) for layer in adapted.values()}
    found, owners = {}, {}
    entries = model_walk.walk(
        model, descend_into=lambda layer: id(layer) not in adapted_ids
    )
    for entry in entries.values():
        if id(entry.layer) in adapted_ids:
            bias = getattr(entry.layer.base_layer, "bias", None)
            named = [("bias", bias)] if bias is not None else []
        else:
            named = [(_short_name(v), v) for v in model_walk.own_variables(entry.layer)]
        for name, variable in named:
            key = f"{entry.path}/{name}"
            if key not in found:
                found[key], owners[key] = variable, entry.path
    return found, owners


def _short_name(variable):
    return variable.name.split("/")[-1]


def _trained_extras(model, adapted):
    """The trainable non-adapter weights as float32 arrays, and the paths
    of the fully trainable layers owning them (LoRA biases excluded)."""
    adapter_ids = {
        id(getattr(layer, name))
        for layer in adapted.values() for name in ("lora_a", "lora_b")
    }
    trained = [v for v in model.trainable_weights if id(v) not in adapter_ids]
    if not trained:
        return {}, []
    by_key, owners = _weights_by_key(model, adapted)
    key_of = {id(v): key for key, v in by_key.items()}
    extras, trainable_layers = {}, []
    for variable in trained:
        key = key_of.get(id(variable))
        owner = owners.get(key)
        if key is None or any(
            path.startswith(owner + "/") for path in adapted
        ):
            raise ValueError(
                f"save_adapter: trainable variable '{variable.path}' belongs "
                "to no layer whose training `apply_lora(trainable=...)` can "
                "re-create (it is the model's own or held by a layer that "
                "holds LoRA layers). Freeze it, or save the whole model."
            )
        value = np.ascontiguousarray(
            ops.convert_to_numpy(ops.cast(variable.value, "float32"))
        )
        if not np.all(np.isfinite(value)):
            raise ValueError(
                f"save_adapter: trained weight '{key}' holds NaN or infinite "
                "values; refusing to save it."
            )
        extras[key] = value
        if owner not in adapted and owner not in trainable_layers:
            trainable_layers.append(owner)
    return extras, trainable_layers


def _check_extras(model, adapted, adapter):
    """Each extra tensor of the file names a float weight of that shape."""
    where = f"load_adapter('{adapter.path}')"
    by_key, _ = _weights_by_key(model, adapted)
    if not adapted:
        paths = {e.path for e in model_walk.walk(model).values()}
        for path in adapter.trainable_layers:
            if path not in paths:
                raise ValueError(
                    f"{where}: the file trains layer '{path}', which is not "
                    f"in model '{model.name}'. Nothing was changed."
                )
    found = {}
    for key, shape in adapter.extra_tensors.items():
        variable = by_key.get(key)
        if variable is None:
            raise ValueError(
                f"{where}: trained weight '{key}' (shape {shape}) has no "
                f"variable in model '{model.name}' (weights there: "
                f"{_sample(list(by_key))}). Nothing was changed."
            )
        if tuple(variable.shape) != tuple(shape):
            raise ValueError(
                f"{where}: trained weight '{key}' has shape "
                f"{tuple(variable.shape)} in the model but {tuple(shape)} in "
                "the file. Nothing was changed."
            )
        if "float" not in str(variable.dtype):
            raise ValueError(
                f"{where}: trained weight '{key}' is {variable.dtype} in the "
                "model, float32 in the file. Nothing was changed."
            )
        found[key] = variable
    return found


def _check_base_model(model, adapter):
    """The base model holds every recorded layer, of the recorded shapes."""
    where = f"load_adapter('{adapter.path}')"
    entries = {entry.path: entry.layer for entry in model_walk.walk(model).values()}
    for record in adapter.layers.values():
        layer = entries.get(record.path)
        if layer is None:
            raise ValueError(
                f"{where}: layer '{record.path}' is not in model "
                f"'{model.name}'. Layers there: {_sample(list(entries))}. "
                "Nothing was changed."
            )
        lora_class = lora_class_for(layer)
        if lora_class is None or lora_class.__name__ != record.lora_class:
            raise ValueError(
                f"{where}: layer '{record.path}' is a {type(layer).__name__}, "
                f"but the adapter was trained on a {record.base_class} "
                f"({record.lora_class}). Nothing was changed."
            )
        if not layer.built:
            raise ValueError(
                f"{where}: layer '{record.path}' is not built; build the "
                "model first. Nothing was changed."
            )
        kernel_shape = tuple(layer.kernel.shape)
        if kernel_shape != record.base_kernel_shape:
            raise ValueError(
                f"{where}: layer '{record.path}': the base kernel has shape "
                f"{kernel_shape} in the model but {record.base_kernel_shape} "
                "in the file. Nothing was changed."
            )
        contracted, free = lora_class._kernel_split(layer)
        _check_shape(where, record.path, "lora_a",
                     (record.rank,) + tuple(contracted), record.lora_a_shape)
        _check_shape(where, record.path, "lora_b",
                     (record.rank,) + tuple(free), record.lora_b_shape)
    for name in ("dropout", "use_rslora", "train_bias"):
        values = {getattr(r, name) for r in adapter.layers.values()}
        if len(values) > 1:
            raise ValueError(
                f"{where}: the file records several values of `{name}` "
                f"({sorted(values)}), which one `apply_lora` call cannot "
                "re-create. Apply LoRA to the model yourself, then load. "
                "Nothing was changed."
            )


def _apply_recorded(model, adapter):
    from keras_lora.surgery import apply_lora

    first = next(iter(adapter.layers.values()))
    apply_lora(
        model,
        rank=first.rank,
        alpha=first.alpha,
        targets=[_ExactPath(path) for path in adapter.layers],
        rank_pattern={_ExactPath(r.path): r.rank for r in adapter.layers.values()},
        alpha_pattern={_ExactPath(r.path): r.alpha for r in adapter.layers.values()},
        dropout=first.dropout,
        use_rslora=first.use_rslora,
        train_bias=first.train_bias,
        trainable=[_ExactPath(path) for path in adapter.trainable_layers] or None,
    )


def _check_adapted_model(adapted, adapter):
    where = f"load_adapter('{adapter.path}')"
    for record in adapter.layers.values():
        layer = adapted.get(record.path)
        if layer is None:
            raise ValueError(
                f"{where}: the file adapts layer '{record.path}', which is "
                f"not a LoRA layer of the model (its LoRA layers: "
                f"{_sample(list(adapted))}). Nothing was changed."
            )
        at = f"{where}: layer '{record.path}'"
        if type(layer).__name__ != record.lora_class:
            raise ValueError(
                f"{at} is a {type(layer).__name__} in the model but a "
                f"{record.lora_class} in the file. Nothing was changed."
            )
        if layer.rank != record.rank:
            raise ValueError(
                f"{at} has rank {layer.rank} in the model but {record.rank} "
                "in the file. Nothing was changed."
            )
        kernel_shape = tuple(layer.base_layer.kernel.shape)
        if kernel_shape != record.base_kernel_shape:
            raise ValueError(
                f"{at}: the base kernel has shape {kernel_shape} in the model "
                f"but {record.base_kernel_shape} in the file. Nothing was "
                "changed."
            )
        for name in ("lora_a", "lora_b"):
            variable = getattr(layer, name)
            _check_shape(where, record.path, name, tuple(variable.shape),
                         getattr(record, f"{name}_shape"))
            if variable.dtype != "float32":
                raise ValueError(
                    f"{at}: {name} is {variable.dtype} in the model, float32 "
                    "in the file. Nothing was changed."
                )
        if layer.alpha != record.alpha or layer.use_rslora != record.use_rslora:
            raise ValueError(
                f"{at} has alpha={layer.alpha}, use_rslora={layer.use_rslora} "
                f"in the model but alpha={record.alpha}, "
                f"use_rslora={record.use_rslora} in the file, which would "
                "scale the update differently. Nothing was changed."
            )
        if layer.merged:
            raise ValueError(
                f"{at} is merged; call `unmerge_adapters(model)` before "
                "loading another adapter. Nothing was changed."
            )
    extra = [path for path in adapted if path not in adapter.layers]
    if extra:
        raise ValueError(
            f"{where}: the model has LoRA layers the file does not cover: "
            f"{_sample(extra)}. Nothing was changed."
        )


def _check_shape(where, path, name, in_model, in_file):
    if tuple(in_model) != tuple(in_file):
        raise ValueError(
            f"{where}: layer '{path}': {name} has shape {tuple(in_model)} in "
            f"the model but {tuple(in_file)} in the file. Nothing was changed."
        )


class _ExactPath:
    """A target pattern that selects one layer by its exact path."""

    def __init__(self, path):
        self.path = path
        self.__name__ = repr(path)

    def __call__(self, path, layer):
        return path == self.path

    def __eq__(self, other):
        return isinstance(other, _ExactPath) and other.path == self.path

    def __hash__(self):
        return hash(("_ExactPath", self.path))


def _sample(items, limit=8):
    shown = ", ".join(repr(item) for item in items[:limit])
    more = f", ... ({len(items)} in all)" if len(items) > limit else ""
    return f"[{shown}{more}]"
