"""Many named adapters on one model: add, switch, list, delete.

Each LoRA layer holds a dict of named adapters and the names of the active
ones (see `LoRALayer`); these functions act on every LoRA layer of a model
at once, PEFT's names and habits in Keras style. Adding or deleting an
adapter replaces the affected LoRA layers by new ones holding the new set
of adapters (the other adapters' values copied), inside a `Transaction`, so
a failure leaves the model as it was; switching only changes which adapters
are applied and trainable.
"""

from keras_lora import init_methods
from keras_lora import surgery
from keras_lora import traced_cache
from keras_lora import trained_weights
from keras_lora.layers.adapter import validate_adapter_name
from keras_lora.transaction import Transaction


def list_adapters(model):
    """The names of the model's adapters, in the order they were added.

    Args:
        model: a Keras model.

    Returns:
        A list of names (empty for a model without LoRA layers).

    Example:

    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model = apply_lora(model, rank=2)
    >>> model = add_adapter(model, "task_b", rank=4)
    >>> list_adapters(model)
    ['default', 'task_b']
    """
    return _names_in(surgery.lora_layers(model))


def _names_in(layers):
    names = []
    for layer in layers.values():
        for spec in layer.adapter_specs:
            if spec.name not in names:
                names.append(spec.name)
    return names


def active_adapters(model):
    """The names of the adapters the model applies (and trains).

    Args:
        model: a Keras model with LoRA layers.

    Returns:
        A list of names.

    Example:

    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> active_adapters(apply_lora(model, rank=2))
    ['default']
    """
    layers = surgery.lora_layers(model)
    if not layers:
        return []
    return list(next(iter(layers.values())).active_adapters)


def set_adapter(model, adapter_name):
    """Makes `adapter_name` (a name or a list of names) the active adapter(s).

    Active adapters are applied (their updates add up) and are the only
    trainable ones: `fit` then changes them and no other adapter. The
    model's traced functions are reset and, if it was compiled, it is
    compiled again with its settings (a fresh optimizer for the new
    trainable variables), so `predict` / `fit` / keras-hub `generate`
    follow the switch. Switching back to adapters the model has already
    run with traces nothing again: their traced `predict` and `generate`
    functions are kept (up to 8 states per model) and restored.

    Args:
        model: a Keras model with LoRA layers.
        adapter_name: a name, or a list of names.

    Returns:
        `model`.

    Raises:
        ValueError: for an unknown name, or while adapters are merged
            (nothing is changed).

    Example:

    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model = add_adapter(apply_lora(model, rank=2), "task_b", rank=4)
    >>> active_adapters(set_adapter(model, "task_b"))
    ['task_b']
    """
    names = _as_names(adapter_name, "set_adapter")
    layers = _lora_layers(model, "set_adapter")
    _check_known(model, names, "set_adapter", known=_names_in(layers))
    merged = [path for path, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(
            f"set_adapter: layer '{merged[0]}' has its adapters merged; call "
            "`unmerge_adapters(model)` first. Nothing was changed."
        )
    # The state is computed before and after the switch, not per layer;
    # compiling inside clears nothing the switch would keep.
    with traced_cache.deferred(model):
        for layer in layers.values():
            layer.set_active_adapters(names)
        surgery.compile_like(model, model)
    return model


def add_adapter(model, adapter_name, rank=8, targets=None, **apply_lora_arguments):
    """Adds a new named adapter to the model; the active ones stay active.

    Takes `apply_lora`'s arguments (`alpha`, `exclude`, `dropout`,
    `use_rslora`, `rank_pattern`, ...); `targets` may pick a subset of the
    layers (an adapter absent from a layer contributes nothing there), and
    layers not yet adapted become LoRA layers holding only this adapter. On
    a model without LoRA layers it is `apply_lora(..., adapter_name=...)`
    and the adapter is active. Otherwise it is not active until
    `set_adapter` (as in PEFT). `init="pissa"` / `"olora"` (see
    `apply_lora`) replaces the kernels by their residuals, which the other
    adapters then see too (as in PEFT); `delete_adapter` puts them back.

    Args:
        model: a built Keras model.
        adapter_name: the new adapter's name (a Python identifier, not yet
            used in the model).
        rank: positive int, the default rank.
        targets: which layers (see `apply_lora`).
        **apply_lora_arguments: the other `apply_lora` arguments.

    Returns:
        `model`.

    Raises:
        ValueError, TypeError: as `apply_lora`, and for a name that is
            invalid or already used (nothing is changed).

    Example:

    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model = add_adapter(apply_lora(model, rank=2), "task_b", rank=4)
    >>> {n: a.rank for n, a in lora_layers(model)["dense"].adapters.items()}
    {'default': 2, 'task_b': 4}
    """
    validate_adapter_name(adapter_name, "add_adapter: ")
    surgery.check_model(model)
    existing = list_adapters(model)
    if adapter_name in existing:
        raise ValueError(
            f"add_adapter: model '{model.name}' already has an adapter named "
            f"{adapter_name!r} (adapters: {existing}). Delete it first or "
            "choose another name. Nothing was changed."
        )
    arguments = dict(apply_lora_arguments, rank=rank, targets=targets,
                     adapter_name=adapter_name)
    if not existing:
        return surgery.apply_lora(model, **arguments)
    active = active_adapters(model)
    with Transaction(model) as change:
        old = _swap_out_lora_layers(model, change)
        plan = surgery.plan_lora(model, **arguments)
        planned = set()
        for item in plan.layers:
            planned.add(id(item.layer))
            previous = old.get(id(item.layer))
            if previous is not None:
                init_methods.check_beside(
                    previous, plan.init, plan.options["use_dora"],
                    f"add_adapter: layer '{item.path}': ",
                )
            # A layer holding only the new adapter, initialized as planned.
            fresh = item.lora_class(
                base_layer=item.layer, rank=item.rank, alpha=item.alpha,
                active_adapters=active, **surgery.layer_options(plan, item),
            )
            fresh._check_initial_values()
            layer = fresh if previous is None else _with_adapters(
                previous, previous.adapter_specs + fresh.adapter_specs,
                active, values_from=(previous, fresh),
            )
            # PiSSA / OLoRA change the kernel all adapters share (as PEFT).
            init_methods.initialize(layer, adapter_name, plan.init, change)
            for parent in item.parents:
                change.swap(parent, item.layer, layer)
            surgery.register_owner(layer, model)
            layer.trainable = True
        for base_id, previous in old.items():
            if base_id not in planned:
                for parent in _parents_of(model, previous.base_layer):
                    change.swap(parent, previous.base_layer, previous)
        trained_weights.remember(model, [
            v for layer in plan.trainable_layers for v in layer.weights
        ])
        for layer in plan.trainable_layers:
            layer.trainable = True
    surgery.recompile(model)
    return model


def delete_adapter(model, adapter_name):
    """Deletes a named adapter from every layer that has it.

    Layers left without adapters become their plain base layers again. If
    the adapter was active, the other active ones stay active (or, if none,
    the first remaining adapter becomes active).

    Args:
        model: a Keras model with LoRA layers.
        adapter_name: the adapter to delete.

    Returns:
        `model`.

    Raises:
        ValueError: for an unknown name, for the model's last adapter while
            it is active, or while adapters are merged (nothing is changed).

    Example:

    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model = add_adapter(apply_lora(model, rank=2), "task_b", rank=4)
    >>> list_adapters(delete_adapter(model, "task_b"))
    ['default']
    """
    _check_known(model, [adapter_name], "delete_adapter")
    names = list_adapters(model)
    active = active_adapters(model)
    if names == [adapter_name]:
        raise ValueError(
            f"delete_adapter: {adapter_name!r} is the last adapter of model "
            f"'{model.name}'; use `merge_lora(model, in_place=True)` to drop "
            "the LoRA layers, or add another adapter first. Nothing was "
            "changed."
        )
    layers = _lora_layers(model, "delete_adapter")
    merged = [path for path, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(
            f"delete_adapter: layer '{merged[0]}' has its adapters merged; "
            "call `unmerge_adapters(model)` first. Nothing was changed."
        )
    remaining = [name for name in names if name != adapter_name]
    new_active = [name for name in active if name != adapter_name] or remaining[:1]
    with Transaction(model) as change:
        for entry in surgery.lora_entries(model):
            layer = entry.layer
            # A PiSSA / OLoRA adapter leaving gives the kernel its part back.
            init_methods.restore_base_kernel(layer, [adapter_name], change)
            specs = [s for s in layer.adapter_specs if s.name != adapter_name]
            if len(specs) == len(layer.adapter_specs):
                replacement = None
            elif not specs:
                replacement = layer.base_layer
            else:
                replacement = _with_adapters(layer, specs, new_active,
                                             values_from=(layer,))
                surgery.register_owner(replacement, model)
            if replacement is not None:
                for parent in entry.parents:
                    change.swap(parent, layer, replacement)
        for layer in surgery.lora_layers(model).values():
            layer.set_active_adapters(new_active)
            layer.trainable = True
    surgery.recompile(model)
    return model


# Shared steps -------------------------------------------------------------


def _with_adapters(layer, specs, active, values_from):
    """A new LoRA layer over `layer`'s base holding `specs`, each adapter's
    values copied from the first of `values_from` that has it."""
    first, rest = specs[0], specs[1:]
    new = type(layer)(
        base_layer=layer.base_layer,
        rank=first.rank, alpha=first.alpha, dropout=first.dropout,
        use_rslora=first.use_rslora, use_dora=first.use_dora,
        lora_a_initializer=first.lora_a_initializer,
        lora_b_initializer=first.lora_b_initializer,
        adapter_name=first.name, extra_adapters=list(rest),
        active_adapters=list(active), train_bias=layer.train_bias,
        adapter_enabled=layer.adapter_enabled,
    )
    for name, adapter in new.adapters.items():
        source = next(s for s in values_from if name in s.adapters)
        for variable, value in zip(adapter.variables,
                                   source.adapters[name].variables):
            variable.assign(value.value)
        init_methods.copy_initial_factors(source.adapters[name], adapter)
    # The first adapter's spec was rebuilt from arguments, which lack `init`.
    new._specs[0] = first
    new.adapters[first.name].spec = first
    return new


def _swap_out_lora_layers(model, change):
    """Puts every LoRA layer's base layer in its place; returns
    `{id(base layer): LoRA layer}`."""
    old = {}
    for entry in surgery.lora_entries(model):
        for parent in entry.parents:
            change.swap(parent, entry.layer, entry.layer.base_layer)
        old[id(entry.layer.base_layer)] = entry.layer
    return old


def _parents_of(model, layer):
    from keras_lora import model_walk

    for entry in model_walk.walk(model).values():
        if entry.layer is layer:
            return entry.parents
    return []


def _as_names(adapter_name, who):
    names = [adapter_name] if isinstance(adapter_name, str) else adapter_name
    if not isinstance(names, (list, tuple)) or not names:
        raise TypeError(
            f"{who}: `adapter_name` must be a name or a non-empty list of "
            f"names. Received: adapter_name={adapter_name!r}"
        )
    for name in names:
        validate_adapter_name(name, f"{who}: ")
    if len(set(names)) != len(names):
        raise ValueError(
            f"{who}: an adapter is named twice. Received: adapter_name={names!r}"
        )
    return list(names)


def _lora_layers(model, who):
    surgery.check_model(model)
    layers = surgery.lora_layers(model)
    if not layers:
        raise ValueError(
            f"{who}: model '{model.name}' has no LoRA layers. Use "
            "`apply_lora` first."
        )
    return layers


def _check_known(model, names, who, known=None):
    known = list_adapters(model) if known is None else known
    for name in names:
        validate_adapter_name(name, f"{who}: ")
        if name not in known:
            raise ValueError(
                f"{who}: model '{model.name}' has no adapter named {name!r}. "
                f"Its adapters: {known}. Nothing was changed."
            )
