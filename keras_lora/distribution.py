"""Adapter placement under `keras.distribution`: A and B follow the kernel.

Under a `keras.distribution.ModelParallel` distribution, Keras gives every
new variable the layout its path matches in the `LayoutMap`. A map written
for the base model knows nothing about adapters, and a loose key such as
`".*query.*"` also matches `".../query/lora_a"`, handing a 2-D adapter a 3-D
kernel layout (keras-team/keras#19496). So keras-lora never lets the map
decide: each adapter's layout is derived from its base kernel's layout at
creation and pinned to the variable.

The rule, for a kernel with contracted (input) axes `C` and free (output)
axes `F` and layout axes `L`:

- `lora_a`, shaped `(rank,) + C`, replicates the rank and takes `L` on `C`:
  `x · A` then contracts over the same mesh axes as `x · W`, with the same
  partial-sum reduction, and needs no resharding of `x`.
- `lora_b`, shaped `(rank,) + F`, replicates the rank and takes `L` on `F`:
  `(x · A) · B` comes out sharded exactly like the base output, so adding
  the two moves no data.

The rank axis is small (4 to 64) and replicating it costs `rank` rows per
device; every other adapter axis is as large as a kernel axis and shards
like it, so the adapters shrink with the mesh the way the kernel does. A
replicated kernel (`DataParallel`, or a path the map does not match) gets
replicated adapters.

`extend_layout_map` writes the same layouts into a `LayoutMap` as exact
paths, for code that consults the map itself; exact paths take precedence
over the map's regular expressions.
"""

import contextlib

import keras
from keras.distribution import TensorLayout


def adapter_axes(kernel_axes, contracted_axes, free_axes):
    """Returns the layout axes of `lora_a` and `lora_b` for a kernel's axes.

    Args:
        kernel_axes: the kernel's layout axes, one entry (a mesh axis name,
            a tuple of names, or `None`) per kernel axis.
        contracted_axes: kernel axis indices contracted with the input, in
            kernel order (the axes of `lora_a` after the rank).
        free_axes: kernel axis indices that reach the output, in kernel
            order (the axes of `lora_b` after the rank).

    Returns:
        `(lora_a_axes, lora_b_axes)`, tuples with the rank axis `None`.

    Example:

    >>> # Gemma's query kernel (heads, hidden, head_dim), "btd,ndh->btnh".
    >>> adapter_axes(("model", "batch", None), (1,), (0, 2))
    ((None, 'batch'), (None, 'model', None))
    """
    kernel_axes = tuple(kernel_axes)
    n_axes = len(contracted_axes) + len(free_axes)
    if len(kernel_axes) != n_axes:
        raise ValueError(
            f"The kernel layout has {len(kernel_axes)} axes but the kernel "
            f"has {n_axes} (contracted {tuple(contracted_axes)}, free "
            f"{tuple(free_axes)}). Received: kernel_axes={kernel_axes}"
        )
    lora_a_axes = (None,) + tuple(kernel_axes[i] for i in contracted_axes)
    lora_b_axes = (None,) + tuple(kernel_axes[i] for i in free_axes)
    return lora_a_axes, lora_b_axes


def kernel_axes_of(lora_layer):
    """Returns `(contracted_axes, free_axes)` of a LoRA layer's kernel."""
    return type(lora_layer)._kernel_axes(lora_layer.base_layer)


@contextlib.contextmanager
def adapter_layout_scope(kernel, contracted_axes, free_axes,
                         names=("lora_a", "lora_b")):
    """Pins the layouts of `lora_a` and `lora_b` created inside the scope.

    Used by `LoRALayer` when it creates its adapters. Outside any
    distribution, with a kernel that has no layout, it does nothing.

    Args:
        kernel: the base kernel variable (already created).
        contracted_axes: kernel axis indices of `lora_a`.
        free_axes: kernel axis indices of `lora_b`.
        names: the variable names of the A and B factors to pin (an extra
            pair's, e.g. `("reverse_lora_a", "reverse_lora_b")`).
    """
    layout = _kernel_layout(kernel)
    if layout is None or layout.device_mesh is None:
        yield
        return
    axes = tuple(layout.axes)
    if len(axes) != len(kernel.shape):
        # A layout that does not fit the kernel could not have placed it;
        # replicate the adapters rather than fail on someone else's map.
        axes = (None,) * len(kernel.shape)
    mesh = layout.device_mesh
    pins = keras.distribution.LayoutMap(mesh)
    # Only the two adapters are created in this scope, so their names
    # identify them; their full paths depend on the caller's name scope.
    for name, variable_axes in zip(
        names, adapter_axes(axes, contracted_axes, free_axes)
    ):
        pins[f"(.*/)?{name}"] = TensorLayout(variable_axes, mesh)
    pinned = keras.distribution.ModelParallel(layout_map=pins)
    with pinned.scope():
        yield


def extend_layout_map(layout_map, model):
    """Adds an exact-path entry for every adapter of `model` to `layout_map`.

    Each `lora_a` / `lora_b` gets the layout derived from its base kernel's
    entry in `layout_map` (see the module docstring), or a replicated layout
    where the map does not match the kernel. Exact paths take precedence
    over the map's regular expressions, so a loose key such as
    `".*query.*"` no longer reaches the adapters.

    keras-lora already places adapters this way when they are created under
    a distribution; use this where something reads the `LayoutMap` itself,
    or to see or edit the adapter layouts before creating the model under a
    `ModelParallel` distribution.

    Args:
        layout_map: a `keras.distribution.LayoutMap`, modified in place.
        model: a model adapted with `keras_lora.apply_lora` (it need not
            live on the mesh: only variable paths and shapes are read).

    Returns:
        `layout_map`, with the new entries.

    Raises:
        ValueError: if `layout_map` already holds an adapter path with a
            different layout.

    Example:

    ```python
    mesh = keras.distribution.DeviceMesh(
        (1, 2), ("batch", "model"), devices=["cpu:0", "cpu:1"]
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*dense.*kernel"] = (None, "model")
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(4, name="dense")], name="model"
    )
    keras_lora.apply_lora(model, rank=2)
    keras_lora.extend_layout_map(layout_map, model)
    layout_map["model/dense/lora_a"].axes  # (None, None)
    layout_map["model/dense/lora_b"].axes  # (None, "model")
    ```
    """
    from keras_lora.surgery import lora_layers

    adapter_paths = {}
    for layer in lora_layers(model).values():
        kernel = layer.kernel
        layout = layout_map[kernel.path]
        if layout is None:
            axes = (None,) * len(kernel.shape)
        else:
            axes = tuple(layout.axes)
        contracted_axes, free_axes = kernel_axes_of(layer)
        for variable, variable_axes in zip(
            (layer.lora_a, layer.lora_b),
            adapter_axes(axes, contracted_axes, free_axes),
        ):
            adapter_paths[variable.path] = variable_axes
        # Further pairs (an untied ReversibleEmbedding's reverse projection)
        # follow their own kernel's entry.
        for prefix, (extra_kernel, extra_contracted, extra_free) in (
            type(layer).extra_factor_kernels(layer.base_layer).items()
        ):
            extra_layout = layout_map[extra_kernel.path]
            extra_axes = (
                (None,) * len(extra_kernel.shape) if extra_layout is None
                else tuple(extra_layout.axes)
            )
            for name, variable_axes in zip(
                ("lora_a", "lora_b"),
                adapter_axes(extra_axes, extra_contracted, extra_free),
            ):
                variable = layer._primary().extra_factors[prefix + name]
                adapter_paths[variable.path] = variable_axes
    # Check everything before adding anything. (`path in layout_map` would
    # match the map's regular expressions too, hence the key set.)
    keys = set(layout_map)
    for path, axes in adapter_paths.items():
        if path in keys and tuple(layout_map[path].axes) != axes:
            raise ValueError(
                f"The LayoutMap already maps adapter '{path}' to "
                f"{tuple(layout_map[path].axes)}, but its kernel's layout "
                f"gives {axes}. Remove that entry or make it match."
            )
    for path, axes in adapter_paths.items():
        if path not in keys:
            layout_map[path] = TensorLayout(axes, layout_map.device_mesh)
    return layout_map


def _kernel_layout(kernel):
    """The kernel's `TensorLayout`, or `None` where it has none."""
    # Keras keeps a variable's layout in `_layout` (its optimizer reads it
    # the same way for slot variables); a kernel made under a scope that
    # has since closed still carries it.
    layout = getattr(kernel, "_layout", None)
    distribution = keras.distribution.distribution()
    if layout is None and distribution is not None:
        layout = distribution.get_variable_layout(kernel)
    if layout is None or isinstance(layout, TensorLayout):
        return layout
    # A backend layout passed to the variable by hand: its axes are not
    # ours to read, so replicate the adapters on the active mesh.
    if distribution is None:
        return None
    return TensorLayout((None,) * len(kernel.shape), distribution.device_mesh)
