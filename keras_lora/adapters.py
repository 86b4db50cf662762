"""save_adapter / load_adapter: adapter files in and out of a model.

The file format (safetensors tensors `"<layer path>/lora_a"` and
`"<layer path>/lora_b"`, the other trained weights as
`"<layer path>/<variable name>"`, one JSON document in the header) lives in
`keras_lora.adapter_file`; this module matches a file against a model and
changes the model only once everything has been checked.
"""

import numpy as np
from keras import ops

from keras_lora import adapter_matching as matching
from keras_lora import init_methods
from keras_lora import multi
from keras_lora import surgery
from keras_lora import trained_weights
from keras_lora.adapter_file import AdapterFile  # noqa: F401  (public type)
from keras_lora.adapter_file import read_adapter
from keras_lora.adapter_file import write_adapter_file
from keras_lora.layers.adapter import DEFAULT_ADAPTER
from keras_lora.layers.adapter import validate_adapter_name
from keras_lora.transaction import Transaction


def save_adapter(model, path, adapter_name=None, format="keras-lora",
                 base_model=None):
    """Writes one of the model's adapters and its other trained weights to a file.

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

    A file holds one adapter (PEFT's habit): with several adapters in the
    model, name the one to save; layers without it are not in the file.

    With `format="peft"`, the adapter of a keras-hub model converted from
    Hugging Face is written as a PEFT LoRA adapter directory
    (`adapter_config.json`, `adapter_model.safetensors`) that
    `peft.PeftModel.from_pretrained` loads into the Hugging Face model (see
    docs/huggingface_interop.md).

    Args:
        model: a Keras model with LoRA layers.
        path: the file to write (conventionally `*.safetensors`). Its parent
            directory must exist. With `format="peft"`, the directory.
        adapter_name: the adapter to save; `None` means the model's only
            adapter, or its only active one.
        format: `"keras-lora"` (this library's file) or `"peft"`.
        base_model: with `format="peft"`, the Hugging Face checkpoint
            directory (or hub name) the model came from, written as
            `base_model_name_or_path`; a local directory also gives the
            checkpoint's exact module names.

    Returns:
        The absolute path written.

    Raises:
        ValueError: if the model has no LoRA layers, `adapter_name` is
            unknown or needed but not given, an adapter or trained
            weight holds NaN or infinite values, or a trainable weight
            belongs to no layer that can be re-created (the model itself,
            or a layer holding LoRA layers).
        FileNotFoundError: if the parent directory does not exist.

    Example:

    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model = apply_lora(model, rank=2)
    >>> save_adapter(model, "/tmp/task.safetensors")  # doctest: +SKIP
    """
    if format not in ("keras-lora", "peft"):
        raise ValueError(
            "save_adapter: format must be 'keras-lora' or 'peft'. "
            f"Received: format={format!r}"
        )
    all_layers = multi._lora_layers(model, "save_adapter")
    name = _chosen_adapter(model, adapter_name, "save_adapter")
    if format == "peft":
        from keras_lora.peft_interop.peft_export import save_peft_adapter

        return save_peft_adapter(model, path, name, base_model=base_model)
    layers = matching.views_of(all_layers, name)
    _check_initial_factors(layers, name)
    tensors, records = {}, {}
    for layer_path, layer in layers.items():
        record = matching.record_of(layer)
        values = {
            key: ops.convert_to_numpy(getattr(layer, key).value)
            for key in ("lora_a", "lora_b")
        }
        if layer.adapter.initial_factors is not None:
            # PiSSA / OLoRA: PEFT's plain LoRA of rank 2r for the original
            # base (the residual kernel is not in the file).
            values["lora_a"], values["lora_b"], alpha = (
                init_methods.converted_factors(layer.adapter)
            )
            record.update(
                rank=2 * layer.rank, alpha=alpha,
                lora_a_shape=list(values["lora_a"].shape),
                lora_b_shape=list(values["lora_b"].shape),
            )
        for name, variable in layer.extra_factors.items():
            values[name] = ops.convert_to_numpy(variable.value)
        for name in ("lora_a", "lora_b", *layer.extra_factors):
            value = np.ascontiguousarray(values[name], "float32")
            if not np.all(np.isfinite(value)):
                raise ValueError(
                    f"save_adapter: layer '{layer_path}': {name} holds NaN "
                    "or infinite values; refusing to save it."
                )
            tensors[f"{layer_path}/{name}"] = value
        if layer.use_dora:
            tensors[f"{layer_path}/lora_magnitude"] = np.ascontiguousarray(
                ops.convert_to_numpy(layer.lora_magnitude.value), "float32"
            )
        records[layer_path] = record
    extras, trainable_layers = matching.trained_extras(model, layers)
    keys = matching.layer_keys(model)
    owners = set(records) | set(trainable_layers) | {
        key.rsplit("/", 1)[0] for key in extras
    }
    return write_adapter_file(
        path, tensors, records, extras=extras,
        trainable_layers=trainable_layers,
        layer_keys={owner: keys[owner] for owner in owners},
    )


def load_adapter(model, path, adapter_name=None):
    """Loads an adapter file into a model; the model then is the file's model.

    - A base model (no LoRA layers): LoRA is applied exactly as the file
      records it (same layers, ranks, alphas, rsLoRA, dropout, `train_bias`,
      the same fully trainable layers) and the weights are loaded.
    - An adapted model whose LoRA layers are the file's, one for one (same
      ranks and options): the values are assigned in place; traced
      functions stay valid (no re-trace).
    - An adapted model with another adapter (other rank, targets or
      options): its LoRA layers are taken out and the file's applied, as on
      a base model (merged layers are refused: unmerge first).

    A Hugging Face PEFT LoRA adapter (a directory with
    `adapter_config.json`, or its `adapter_model.safetensors`) is detected
    and loaded into a keras-hub model converted from the same architecture:
    LoRA is applied to the layers the PEFT modules correspond to, with the
    adapter's ranks, alphas, rsLoRA and DoRA, and the factors are mapped
    (see docs/huggingface_interop.md).

    In every case the file's other trained weights (fully trainable layers,
    `train_bias` biases) are assigned, weights that a previously loaded or
    trained adapter changed and this file does not carry get their base
    values back, and trainable flags are set as the file records them.

    Layers are matched by structural key (class and position, see
    `keras_lora.model_walk.walk`), not by name, so an adapter loads into
    any instance of the same architecture (a model built twice in one
    process gets `dense_2`, `gemma_backbone_1`, ...); files written before
    format 4 are matched by name. Everything is checked (the file's digests
    and header, every layer, class, rank, alpha, tensor shape and dtype,
    base kernel shape) and the change runs in a `Transaction`: on any
    mismatch the error names the first offending layer or key (and both
    shapes) and the model is exactly as before. Files load on every
    backend, whichever backend saved them.

    With `adapter_name`, the file is the adapter of that name: its values
    replace that adapter's in place (when it has the file's layers, ranks
    and options; else that adapter is replaced), or it is added under that
    name, not active until `set_adapter` (as in PEFT). Other adapters are
    left as they are.

    Args:
        model: a built Keras model, base or adapted.
        path: an adapter file written by `save_adapter`, or a PEFT adapter
            directory.
        adapter_name: the adapter to load into; `None` means the model's
            only adapter (`"default"` on a base model).

    Returns:
        `model`, with the adapter loaded.

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: if the file or the model does not match.

    Example:

    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model = load_adapter(model, "/tmp/task.safetensors")  # doctest: +SKIP
    """
    surgery.check_model(model)
    from keras_lora.peft_interop import peft_config

    if peft_config.adapter_directory(path) is not None:
        from keras_lora.peft_interop.peft_import import load_peft_adapter

        return load_peft_adapter(model, path, adapter_name)
    adapter = matching.in_model_names(model, read_adapter(path))
    names = multi.list_adapters(model)
    if adapter_name is None:
        if len(names) > 1:
            raise ValueError(
                f"load_adapter('{adapter.path}'): model '{model.name}' has "
                f"several adapters ({names}); pass adapter_name= to say which "
                "to load into (or a new name to add). Nothing was changed."
            )
        adapter_name = names[0] if names else DEFAULT_ADAPTER
    validate_adapter_name(adapter_name, "load_adapter: ")
    layers = surgery.lora_layers(model)
    views = matching.views_of(layers, adapter_name)
    # A PiSSA / OLoRA adapter sits on residual kernels: replace it (which
    # restores them) rather than assigning the file's values in place.
    residual = any(v.adapter.initial_factors is not None for v in views.values())
    if views and not residual and matching.fits_in_place(views, adapter):
        _load_in_place(model, views, adapter)
    elif not names or names == [adapter_name]:
        _load_replacing(model, views, adapter, adapter_name)
    else:
        _load_as_named(model, adapter, adapter_name, replace=bool(views))
    return model


def _check_initial_factors(views, adapter_name):
    """A PiSSA / OLoRA adapter whose initial factors are gone (the model was
    re-created from a config or a `.keras` file) cannot be converted."""
    for path, view in views.items():
        if init_methods.modifies_base(view.adapter.init) and (
            view.adapter.initial_factors is None
        ):
            raise ValueError(
                f"save_adapter: layer '{path}': adapter {adapter_name!r} was "
                f"initialized with init={view.adapter.init!r}, but its initial "
                "factors are not known in this process (they are kept in "
                "memory from `apply_lora` / `add_adapter`), so no adapter for "
                "the original base can be written. Save it from the model "
                "that was initialized, or use `merge_lora`."
            )


def _chosen_adapter(model, adapter_name, who):
    names = multi.list_adapters(model)
    if adapter_name is None:
        active = multi.active_adapters(model)
        if len(names) == 1:
            return names[0]
        if len(active) == 1:
            return active[0]
        raise ValueError(
            f"{who}: model '{model.name}' has adapters {names} ({active} "
            "active); pass adapter_name= to say which one."
        )
    validate_adapter_name(adapter_name, f"{who}: ")
    if adapter_name not in names:
        raise ValueError(
            f"{who}: model '{model.name}' has no adapter named "
            f"{adapter_name!r}. Its adapters: {names}."
        )
    return adapter_name


def _load_as_named(model, adapter, adapter_name, replace):
    """Adds the file as adapter `adapter_name` (replacing one of that name)
    beside the model's other adapters."""
    arguments = matching.recorded_arguments(adapter)
    arguments.pop("trainable")
    with Transaction(model) as change:
        if replace:
            multi.delete_adapter(model, adapter_name)
        multi.add_adapter(model, adapter_name, **arguments)
        views = matching.views_of(surgery.lora_layers(model), adapter_name)
        matching.check_adapted_model(views, adapter)
        extras = matching.check_extras(model, views, adapter)
        _assign(change, model, views, adapter, extras)


def _load_in_place(model, adapted, adapter):
    """Same layers, ranks and options: assign the values, re-trace nothing."""
    matching.check_adapted_model(adapted, adapter)
    extras = matching.check_extras(model, adapted, adapter)
    before = {id(v) for v in model.trainable_weights}
    with Transaction(model) as change:
        _assign(change, model, adapted, adapter, extras)
        surgery.freeze(
            model, list(surgery.lora_layers(model).values()),
            [_layer_at(model, path) for path in adapter.trainable_layers],
        )
    if {id(v) for v in model.trainable_weights} != before:
        surgery.recompile(model)


def _load_replacing(model, adapted, adapter, adapter_name):
    """Takes out the model's LoRA layers (if any), then applies the file's.

    Runs in a `Transaction`: any failure puts the old adapter back.
    """
    merged = [path for path, layer in adapted.items() if layer.merged]
    if merged:
        raise ValueError(
            f"load_adapter('{adapter.path}'): layer '{merged[0]}' is merged; "
            "call `unmerge_adapters(model)` before loading another adapter. "
            "Nothing was changed."
        )
    with Transaction(model) as change:
        for entry in surgery.lora_entries(model):
            init_methods.restore_base_kernel(
                entry.layer, list(entry.layer.adapters), change
            )
            for parent in entry.parents:
                change.swap(parent, entry.layer, entry.layer.base_layer)
        matching.check_base_model(model, adapter)
        plan = surgery.plan_lora(
            model, adapter_name=adapter_name,
            **matching.recorded_arguments(adapter),
        )
        matching.check_plan(plan, adapter)
        surgery.execute_plan(plan, change)
        adapted = matching.views_of(surgery.lora_layers(model), adapter_name)
        matching.check_adapted_model(adapted, adapter)
        extras = matching.check_extras(model, adapted, adapter)
        _assign(change, model, adapted, adapter, extras)
    surgery.recompile(model)


def _assign(change, model, adapted, adapter, extras):
    """Assigns the file's tensors; weights another adapter trained and this
    file does not carry get their base values back."""
    for layer_path, layer in adapted.items():
        change.assign(layer.lora_a, adapter.tensors[f"{layer_path}/lora_a"])
        change.assign(layer.lora_b, adapter.tensors[f"{layer_path}/lora_b"])
        if layer.use_dora:
            change.assign(layer.lora_magnitude,
                          adapter.tensors[f"{layer_path}/lora_magnitude"])
        for name, variable in layer.extra_factors.items():
            change.assign(variable, adapter.tensors[f"{layer_path}/{name}"])
    trained_weights.remember(model, extras.values())
    carried = {id(variable) for variable in extras.values()}
    for key, variable in extras.items():
        change.assign(variable, ops.cast(adapter.tensors[key], variable.dtype))
    for variable_id, (variable, base) in trained_weights.remembered(model).items():
        if variable_id not in carried:
            change.assign(variable, base)


def _layer_at(model, path):
    from keras_lora import model_walk

    for entry in model_walk.walk(model).values():
        if entry.path == path:
            return entry.layer
    raise ValueError(f"load_adapter: layer '{path}' is not in the model.")
