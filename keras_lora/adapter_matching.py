"""Matching an adapter file against a model, changing nothing.

`load_adapter` (in `keras_lora.adapters`) first renames the file's entries
into the model's own layer names through their structural keys
(`in_model_names`), then runs these checks; each error names the file, the
first offending layer or key (and both shapes), and says that nothing was
changed.
"""

import dataclasses

import numpy as np
from keras import ops

from keras_lora import model_walk
from keras_lora.layers import LoRALayer
from keras_lora.layers import lora_class_for


class AdapterView:
    """One named adapter of a LoRA layer, seen as a single-adapter layer.

    Adapter files hold one adapter; matching a file against a model looks
    at that adapter of each LoRA layer through this view (`rank`, `alpha`,
    `lora_a`, ... of the adapter; `base_layer`, `kernel`, `train_bias`,
    `merged` of the layer).
    """

    def __init__(self, layer, adapter_name):
        self.layer = layer
        self.adapter = layer.adapters[adapter_name]

    rank = property(lambda self: self.adapter.rank)
    alpha = property(lambda self: self.adapter.alpha)
    scaling = property(lambda self: self.adapter.scaling)
    use_rslora = property(lambda self: self.adapter.use_rslora)
    dropout = property(lambda self: self.adapter.dropout)
    lora_a = property(lambda self: self.adapter.lora_a)
    lora_b = property(lambda self: self.adapter.lora_b)
    lora_magnitude = property(lambda self: self.adapter.lora_magnitude)
    extra_factors = property(lambda self: self.adapter.extra_factors)
    use_dora = property(lambda self: self.adapter.use_dora)
    base_layer = property(lambda self: self.layer.base_layer)
    kernel = property(lambda self: self.layer.kernel)
    # The logical shape: an int4 base stores its kernel packed.
    kernel_shape = property(
        lambda self: self.layer.kernel_shape(self.layer.base_layer)
    )
    train_bias = property(lambda self: self.layer.train_bias)
    merged = property(lambda self: self.layer.merged)
    class_name = property(lambda self: type(self.layer).__name__)


def views_of(layers, adapter_name):
    """`{path: AdapterView}` of the LoRA layers that hold `adapter_name`."""
    return {
        path: AdapterView(layer, adapter_name)
        for path, layer in layers.items() if adapter_name in layer.adapters
    }


def record_of(layer):
    """The per-layer header record `save_adapter` writes for a view."""
    return {
        "class": layer.class_name,
        "base_class": type(layer.base_layer).__name__,
        "rank": layer.rank,
        "alpha": layer.alpha,
        "scaling": layer.scaling,
        "use_rslora": layer.use_rslora,
        "dropout": layer.dropout,
        "train_bias": layer.train_bias,
        "lora_a_shape": list(layer.lora_a.shape),
        "lora_b_shape": list(layer.lora_b.shape),
        "base_kernel_shape": list(layer.kernel_shape),
        # Written only for DoRA, so plain LoRA files stay as they were.
        **({"use_dora": True} if layer.use_dora else {}),
        # Written only where adapters hold further pairs (untied
        # ReversibleEmbedding): {name: shape}.
        **({"extra_factors": {
            name: list(v.shape) for name, v in layer.extra_factors.items()
        }} if layer.extra_factors else {}),
    }



def weights_by_key(model, adapted):
    """`{"<owner path>/<variable name>": variable}` for every weight that can
    be stored as an extra: the own variables of each layer outside the LoRA
    layers, and each LoRA layer's bias as `"<LoRA layer path>/bias"`. On a
    base model, a layer about to be adapted yields the same key for its bias.
    Also returns `{key: owner path}`.
    """
    adapted_ids = {id(getattr(v, "layer", v)) for v in adapted.values()}
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


def trained_extras(model, adapted):
    """The trainable non-adapter weights as float32 arrays, and the paths
    of the fully trainable layers owning them (LoRA biases excluded)."""
    # Every adapter variable of every LoRA layer (also of layers that lack
    # the adapter being saved) is adapter state, never a trained extra.
    all_lora = [
        entry.layer for entry in model_walk.walk(model).values()
        if isinstance(entry.layer, LoRALayer)
    ]
    adapter_ids = {
        id(variable)
        for layer in all_lora
        for adapter in layer.adapters.values()
        for variable in adapter.variables
    }
    trained = [v for v in model.trainable_weights if id(v) not in adapter_ids]
    if not trained:
        return {}, []
    by_key, owners = weights_by_key(model, adapted)
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


def check_extras(model, adapted, adapter):
    """Each extra tensor of the file names a float weight of that shape."""
    where = f"load_adapter('{adapter.path}')"
    by_key, _ = weights_by_key(model, adapted)
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


def check_base_model(model, adapter):
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
            adapted_by = (
                f"adapted by {lora_class.__name__}" if lora_class
                else "which keras-lora cannot adapt"
            )
            raise ValueError(
                f"{where}: layer '{record.path}' is a {type(layer).__name__} "
                f"({adapted_by}), but the file records a {record.lora_class} "
                f"for it (base class {record.base_class}). Nothing was changed."
            )
        if not layer.built:
            raise ValueError(
                f"{where}: layer '{record.path}' is not built; build the "
                "model first. Nothing was changed."
            )
        kernel_shape = tuple(lora_class.kernel_shape(layer))
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
        _check_extra_factors(where, record, lora_class.extra_factor_shapes(
            layer, record.rank))
    for name in ("dropout", "use_rslora", "train_bias", "use_dora"):
        values = {getattr(r, name) for r in adapter.layers.values()}
        if len(values) > 1:
            raise ValueError(
                f"{where}: the file records several values of `{name}` "
                f"({sorted(values)}), which one `apply_lora` call cannot "
                "re-create. Apply LoRA to the model yourself, then load. "
                "Nothing was changed."
            )


def recorded_arguments(adapter):
    """The `apply_lora` arguments that re-create the file's adaptation."""
    first = next(iter(adapter.layers.values()))
    return dict(
        rank=first.rank,
        alpha=first.alpha,
        targets=[_ExactPath(path) for path in adapter.layers],
        rank_pattern={_ExactPath(r.path): r.rank for r in adapter.layers.values()},
        alpha_pattern={_ExactPath(r.path): r.alpha for r in adapter.layers.values()},
        dropout=first.dropout,
        use_rslora=first.use_rslora,
        use_dora=first.use_dora,
        train_bias=first.train_bias,
        trainable=[_ExactPath(path) for path in adapter.trainable_layers] or None,
    )


def check_adapted_model(adapted, adapter):
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
        if layer.class_name != record.lora_class:
            raise ValueError(
                f"{at} is a {layer.class_name} in the model but a "
                f"{record.lora_class} in the file. Nothing was changed."
            )
        if layer.rank != record.rank:
            raise ValueError(
                f"{at} has rank {layer.rank} in the model but {record.rank} "
                "in the file. Nothing was changed."
            )
        kernel_shape = tuple(layer.kernel_shape)
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
        _check_extra_factors(where, record, {
            name: tuple(v.shape) for name, v in layer.extra_factors.items()
        })
        if layer.use_dora != record.use_dora:
            raise ValueError(
                f"{at} has use_dora={layer.use_dora} in the model but "
                f"use_dora={record.use_dora} in the file. Nothing was changed."
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


def _check_extra_factors(where, record, in_model):
    """The file holds the further pairs (`extra_factors`) the model's layer
    has, of the same shapes (an untied ReversibleEmbedding's reverse pair)."""
    in_file = record.extra_factor_shapes
    if set(in_model) != set(in_file):
        raise ValueError(
            f"{where}: layer '{record.path}' has the further adapter factors "
            f"{sorted(in_model)} in the model but {sorted(in_file)} in the "
            "file (e.g. a tied vs an untied ReversibleEmbedding). Nothing was "
            "changed."
        )
    for name, shape in in_model.items():
        _check_shape(where, record.path, name, shape, in_file[name])


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


def check_plan(plan, adapter):
    """The planned adaptation covers exactly the file's layers."""
    where = f"load_adapter('{adapter.path}')"
    planned = set(plan.paths)
    for path in adapter.layers:
        if path not in planned:
            reason = (
                "the file also lists it (or a layer holding it) as fully "
                "trainable" if any(
                    path == t or path.startswith(t + "/")
                    for t in adapter.trainable_layers
                ) else "apply_lora would not adapt it"
            )
            raise ValueError(
                f"{where}: the file adapts layer '{path}', but {reason}. "
                "Nothing was changed."
            )


def fits_in_place(adapted, adapter):
    """Whether the model's LoRA layers are the file's, one for one (then
    its values load in place, without re-tracing)."""
    if set(adapted) != set(adapter.layers):
        return False
    for path, record in adapter.layers.items():
        layer = adapted[path]
        if (
            layer.class_name != record.lora_class
            or layer.rank != record.rank
            or layer.alpha != record.alpha
            or layer.use_rslora != record.use_rslora
            or layer.dropout != record.dropout
            or layer.use_dora != record.use_dora
            or layer.train_bias != record.train_bias
        ):
            return False
    return True


def layer_keys(model):
    """`{path: structural key}` of every layer, LoRA layers not entered."""
    entries = model_walk.walk(
        model, descend_into=lambda layer: not isinstance(layer, LoRALayer)
    )
    return {entry.path: entry.key for entry in entries.values()}


def in_model_names(model, adapter):
    """The adapter with its layer paths renamed to `model`'s own.

    A file records each layer's structural key beside its name path (see
    `model_walk.walk`); matching by key lets an adapter load into any
    instance of the architecture, whatever names Keras generated for it.
    Files written before format 4 have no keys and are matched by name.

    Raises:
        ValueError: if a recorded layer's key is not in the model.
    """
    keys = getattr(adapter, "layer_keys", None) or {}
    if not keys:
        return adapter
    by_key = {key: path for path, key in layer_keys(model).items()}
    renamed = {}
    for path, key in keys.items():
        if key not in by_key:
            raise ValueError(
                f"load_adapter('{adapter.path}'): layer '{path}' (structural "
                f"key '{key}') is not in model '{model.name}'. Layers there: "
                f"{_sample(list(by_key.values()))}. Nothing was changed."
            )
        renamed[path] = by_key[key]
    if all(old == new for old, new in renamed.items()):
        return adapter

    def rename_key(key):
        owner, name = key.rsplit("/", 1)
        return f"{renamed.get(owner, owner)}/{name}"

    return dataclasses.replace(
        adapter,
        layers={
            renamed[path]: dataclasses.replace(record, path=renamed[path])
            for path, record in adapter.layers.items()
        },
        tensors={rename_key(k): v for k, v in adapter.tensors.items()},
        trainable_layers=tuple(
            renamed.get(path, path) for path in adapter.trainable_layers
        ),
        extra_tensors={
            rename_key(k): v for k, v in adapter.extra_tensors.items()
        },
        layer_keys={renamed[path]: key for path, key in keys.items()},
    )
