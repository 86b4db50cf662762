"""The three ways to fine-tune a model that every step benchmark compares.

* `full`: every weight trainable.
* `keras_lora`: keras-lora adapters on the targets, everything else frozen.
* `keras_enable_lora`: Keras's built-in `layer.enable_lora(rank)` on the
  same targets (for a keras-hub backbone with query/value targets:
  `backbone.enable_lora(rank)`), everything else frozen.

Both LoRA variants train exactly the A and B matrices: the targets' biases
are frozen in both (Keras's `enable_lora` would leave them trainable).
"""

from unittest import mock

import keras

from benchmarks import workloads

from benchmarks.names import FULL
from benchmarks.names import KERAS_ENABLE_LORA  # noqa: F401
from benchmarks.names import KERAS_LORA
from benchmarks.names import VARIANTS  # noqa: F401

_KERAS_LORA_NAMES = ("lora_a", "lora_b")
_KERAS_BUILTIN_NAMES = ("lora_kernel_a", "lora_kernel_b")


def apply_lora_or_reason():
    """Returns `(keras_lora.apply_lora, None)` or `(None, why_not)`."""
    try:
        from keras_lora import apply_lora
    except ImportError as error:
        return None, f"keras_lora.apply_lora is not importable ({error})"
    return apply_lora, None


def build(workload, variant, targets, sizes, lora_class_for=None):
    """Builds one variant of a workload.

    Args:
        workload: `workloads.MLP` or `workloads.TRANSFORMER`.
        variant: one of `VARIANTS`.
        targets: `workloads.QUERY_VALUE` or `workloads.ALL_LINEAR`.
        sizes: a `sizes.Sizes`.
        lora_class_for: experiments only: `layer -> LoRA class` to swap in
            instead of calling `apply_lora`.

    Returns:
        `(model, note)`: the model and a line on how it was adapted (or
        `None`).
    """
    if workload == workloads.MLP:
        model, backbone = workloads.build_mlp(sizes), None
    else:
        model, backbone = workloads.build_transformer(sizes)
    note = None
    if variant == KERAS_LORA:
        model, note = adapt_with_keras_lora(
            model, targets, sizes.rank, lora_class_for
        )
    elif variant == KERAS_ENABLE_LORA:
        adapt_with_keras_builtin(model, backbone, targets, sizes.rank)
    return model, note


def adapt_with_keras_lora(model, targets, rank, lora_class_for=None):
    """Adapts `model` with keras-lora and freezes everything else.

    Uses `keras_lora.apply_lora` when it exists; before it does, swaps the
    target layers for `LoRADense` / `LoRAEinsumDense.from_layer` wrappers by
    hand (same variables, same compute).

    Returns:
        `(model, note)`: the adapted model and how it was adapted.
    """
    apply_lora, why_not = apply_lora_or_reason()
    if lora_class_for is not None and apply_lora is not None:
        # Experiments: apply_lora with another `layer -> class` table.
        with mock.patch("keras_lora.surgery.lora_class_for", lora_class_for):
            model = apply_lora(
                model,
                rank=rank,
                targets=lambda path, layer: workloads.is_target(
                    layer, targets),
            )
        note = "experiment: apply_lora with experiment LoRA classes"
    elif lora_class_for is not None:
        model = swap_in_wrappers(model, targets, rank, lora_class_for)
        note = "experiment: LoRA classes swapped in by hand"
    elif apply_lora is not None:
        model = apply_lora(
            model,
            rank=rank,
            targets=lambda path, layer: workloads.is_target(layer, targets),
        )
        note = "keras_lora.apply_lora"
    else:
        model = swap_in_wrappers(model, targets, rank)
        note = f"{why_not}; swapped in LoRA wrappers by hand"
    _train_only(model, _KERAS_LORA_NAMES)
    return model, note


def adapt_with_keras_builtin(model, backbone, targets, rank):
    """Enables Keras's built-in LoRA on the targets of `model`."""
    if backbone is not None and targets == workloads.QUERY_VALUE:
        backbone.enable_lora(rank)
    else:
        for layer in workloads.target_layers(model, targets):
            layer.enable_lora(rank)
    _train_only(model, _KERAS_BUILTIN_NAMES)
    return model


def adapter_variables(model, variant):
    """The adapter variables of a LoRA variant of `model`."""
    names = _KERAS_LORA_NAMES if variant == KERAS_LORA else _KERAS_BUILTIN_NAMES
    return [v for v in model.weights if _leaf_name(v) in names]


def _leaf_name(variable):
    return variable.path.split("/")[-1]


def _train_only(model, names):
    """Freezes every variable of `model` whose name is not in `names`."""
    model.trainable = True
    for layer in workloads.all_layers(model):
        layer.trainable = True
    for variable in model.weights:
        variable.trainable = _leaf_name(variable) in names


def _lora_class(layer):
    from keras_lora.layers import lora_class_for

    return lora_class_for(layer)


def swap_in_wrappers(model, targets, rank, lora_class_for=None):
    """Replaces the targets of `model` by LoRA wrappers, by hand.

    Args:
        model: a Sequential model (rebuilt) or a model whose targets are
            attributes of subclassed layers (swapped in place).
        targets: a target-set name of `workloads`.
        rank: the adapters' rank.
        lora_class_for: `layer -> LoRA class`; keras-lora's own table by
            default. Experiments pass variant classes here.

    Returns:
        The adapted model.
    """
    from keras_lora.layers import LoRALayer

    lora_class_for = lora_class_for or _lora_class

    def wrap(layer):
        return lora_class_for(layer).from_layer(layer, rank=rank)

    if isinstance(model, keras.Sequential):
        layers = [
            wrap(layer) if workloads.is_target(layer, targets) else layer
            for layer in model.layers
        ]
        return keras.Sequential(
            [keras.Input(model.input_shape[1:]), *layers], name=model.name
        )
    wrapped = {}
    for parent in workloads.all_layers(model):
        if isinstance(parent, LoRALayer):
            continue
        for attribute, value in list(vars(parent).items()):
            if isinstance(value, keras.layers.Layer) and workloads.is_target(
                value, targets
            ):
                if id(value) not in wrapped:
                    wrapped[id(value)] = wrap(value)
                _replace_attribute(parent, attribute, wrapped[id(value)])
    return model


def _replace_attribute(parent, attribute, new_layer):
    # Stand-in for apply_lora's in-place swap: the parent's layer list must
    # hold the wrapper instead of the old layer, or the model never sees the
    # adapter variables.
    tracker = parent._tracker
    was_locked = tracker.locked
    tracker.unlock()
    old_layer = getattr(parent, attribute)
    if tracker.is_in_store("layers", old_layer):
        tracker.replace_tracked_value("layers", old_layer, new_layer)
    setattr(parent, attribute, new_layer)
    if was_locked:
        tracker.lock()
