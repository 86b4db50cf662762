"""The arguments of a drop-in LoRA layer: its base layer's and its own."""


# Arguments that belong to the wrapper itself, not to the base layer.
_WRAPPER_ONLY = (
    "trainable", "adapter_enabled", "merged", "adapter_name",
    "extra_adapters", "active_adapters", "use_dora", "init",
)


def base_from_arguments(base_class, base_layer, base_args, kwargs, who):
    """Builds the base layer of a drop-in LoRA layer, or checks `base_layer`.

    Args:
        base_class: the Keras layer class to build.
        base_layer: an existing layer, or `None` to build one.
        base_args: the new layer's positional arguments (all `None` when
            `base_layer` is given).
        kwargs: the remaining keyword arguments.
        who: the LoRA class name, for error messages.

    Returns:
        `(base_layer, wrapper_kwargs)`.
    """
    wrapper_kwargs = {k: kwargs.pop(k) for k in _WRAPPER_ONLY if k in kwargs}
    given = [a for a in base_args if a is not None]
    if base_layer is not None:
        extra = sorted(set(kwargs) - {"name", "dtype"})
        if given or extra:
            raise ValueError(
                f"{who}: pass either `base_layer` or the arguments of a new "
                f"`{base_class.__name__}`, not both. Received: "
                f"{given + extra}"
            )
        wrapper_kwargs.update(kwargs)
        return base_layer, wrapper_kwargs
    if len(given) != len(base_args):
        raise ValueError(
            f"{who} needs the positional arguments of a "
            f"`{base_class.__name__}` or an existing `base_layer`."
        )
    for name in ("name", "dtype"):
        if name in kwargs:
            wrapper_kwargs[name] = kwargs[name]
    return base_class(*base_args, **kwargs), wrapper_kwargs
