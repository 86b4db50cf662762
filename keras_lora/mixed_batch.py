"""Mixed batches: every example of one batch with its own adapter, one pass.

`mixed_batch_model(model, ["a", "b"])` wraps an adapted model into a model
taking one more input, `adapter_index` (`int32`, shape `(batch,)`). Its call
opens `batch_routing.routed(router)` around the original model, so every
LoRA layer hands its update to the router instead of adding its active
adapters. The router stacks the layer's adapters `(slots, rank, ...)`,
zero-padded to the largest rank, scaling folded into `B`, with a zero slot
for the base (index -1) and for the adapters the layer lacks, gathers each
example's `A` and `B` with `ops.take` and adds `(x·Aᵢ)·Bᵢ` with two batched
contractions: no loop over adapters, no sub-batches. The stacks are built
from the variables inside the call, so a traced `predict` follows in-place
changes of adapter values.
"""

import math

import keras
from keras import ops

from keras_lora import multi
from keras_lora.layers import batch_routing
from keras_lora.layers.dense import LoRADense
from keras_lora.layers.einsum_dense import LoRAEinsumDense

ADAPTER_INDEX = "adapter_index"


def mixed_batch_model(model, adapter_names):
    """A model computing each example of a batch with its own adapter.

    The returned functional model takes the original inputs plus an
    `int32` input `adapter_index` of shape `(batch,)`: an extra key of the
    input dict for dict inputs (keras-hub backbones), else one more
    positional input (`[x, adapter_index]`). Example `i` is computed with
    adapter `adapter_names[adapter_index[i]]`, or with the base model where
    the index is -1, in one forward pass; indices outside
    `[-1, len(adapter_names))` are not checked (they give the base output).
    The active adapters of `model` do not matter, and LoRA dropout is not
    applied. The new model shares `model`'s variables: in-place adapter
    changes (`load_adapter`, `assign`) show in its next call, without a
    retrace.

    Args:
        model: a built functional or `Sequential` Keras model (a keras-hub
            backbone or task included) whose LoRA layers are `LoRADense` /
            `LoRAEinsumDense`, adapters not merged.
        adapter_names: the list of adapter names the indices refer to.

    Returns:
        A `keras.Model`.

    Raises:
        TypeError: if `adapter_names` is not a non-empty list of names.
        ValueError: for an unknown or duplicate name, a model without LoRA
            layers or without declared inputs, merged adapters, or a layer
            whose update cannot be routed per example (DoRA adapters are
            routed too: their per-unit factor is gathered per example).

    Example:

    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model = add_adapter(apply_lora(model, rank=2), "task_b", rank=4)
    >>> mixed = mixed_batch_model(model, ["default", "task_b"])
    >>> y = mixed.predict([np.ones((3, 8)), np.array([0, 1, -1])], verbose=0)
    >>> y.shape
    (3, 4)
    """
    names = check_request(model, adapter_names, "mixed_batch_model")
    inputs = keras.tree.map_structure(_fresh_input, _declared_inputs(model))
    index = keras.Input(shape=(), dtype="int32", name=ADAPTER_INDEX)
    routed = RoutedCall(model, names, name=f"{model.name}_routed")
    outputs = routed(inputs, index)
    if isinstance(inputs, dict):
        all_inputs = dict(inputs, **{ADAPTER_INDEX: index})
    elif isinstance(inputs, (list, tuple)):
        all_inputs = [*inputs, index]
    else:
        all_inputs = [inputs, index]
    return keras.Model(all_inputs, outputs, name=f"{model.name}_mixed_batch")


def check_request(model, adapter_names, who):
    """Validates `(model, adapter_names)` for a mixed batch; returns the names.

    Nothing is changed. See `mixed_batch_model` for the errors.
    """
    names = _as_name_list(adapter_names, who)
    layers = multi._lora_layers(model, who)
    multi._check_known(model, names, who)
    if _declared_inputs(model) is None:
        raise ValueError(
            f"{who}: model '{model.name}' has no declared inputs (a "
            "subclassed model). Use a functional or Sequential model, or wrap "
            "yours: `keras.Model(inputs, model(inputs))`."
        )
    if ADAPTER_INDEX in _input_names(model):
        raise ValueError(
            f"{who}: model '{model.name}' already has an input named "
            f"{ADAPTER_INDEX!r}."
        )
    for path, layer in layers.items():
        if layer.merged:
            raise ValueError(
                f"{who}: layer '{path}' has its adapters merged into its "
                "kernel; call `unmerge_adapters(model)` first."
            )
        if not layer._present(names):
            continue
        if not isinstance(layer, (LoRADense, LoRAEinsumDense)):
            raise ValueError(
                f"{who}: layer '{path}' is a {type(layer).__name__}; mixed "
                "batches route LoRADense and LoRAEinsumDense updates only. "
                f"Received: adapter_names={names}"
            )
        if isinstance(layer, LoRAEinsumDense) and not _routable_equation(
            layer.equation
        ):
            raise ValueError(
                f"{who}: layer '{path}' has equation {layer.equation!r}, "
                "whose first input axis is not a batch axis of the output; "
                "its update cannot be chosen per example."
            )
    return names


@keras.saving.register_keras_serializable(package="keras_lora")
class RoutedCall(keras.layers.Layer):
    """Calls `model` with every LoRA update chosen per example.

    Args:
        model: the adapted model (its variables are shared, not copied).
        adapter_names: the names `adapter_index` refers to.
        **kwargs: base `keras.layers.Layer` arguments.
    """

    def __init__(self, model, adapter_names, **kwargs):
        super().__init__(**kwargs)
        self.model = model
        self.adapter_names = list(adapter_names)

    def call(self, inputs, adapter_index):
        router = Router(self.adapter_names, adapter_index)
        with batch_routing.routed(router):
            return self.model(inputs)

    def compute_output_spec(self, inputs, adapter_index):
        # Routing never changes shapes; the model's own symbolic pass
        # avoids tracing `call` with symbolic batch and sequence sizes.
        return self.model.compute_output_spec(inputs)

    def get_config(self):
        return {
            **super().get_config(),
            "model": keras.saving.serialize_keras_object(self.model),
            "adapter_names": self.adapter_names,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(config["model"])
        return cls(**config)


class Router:
    """Adds each example's adapter update (see `batch_routing`).

    Args:
        adapter_names: the names the indices refer to.
        adapter_index: `int` tensor `(batch,)`; -1 is the base model.
    """

    def __init__(self, adapter_names, adapter_index):
        self.adapter_names = list(adapter_names)
        base_slot = len(self.adapter_names)
        index = ops.cast(adapter_index, "int32")
        # Slot `base_slot` holds zeros: -1 (and anything out of range) adds
        # nothing.
        self.slot = ops.where(
            ops.logical_or(ops.less(index, 0), ops.greater(index, base_slot)),
            ops.full_like(index, base_slot), index,
        )

    def apply(self, layer, outputs, inputs, training=None):
        """Returns `outputs` plus each example's update of `layer`."""
        if not layer._present(self.adapter_names):
            return outputs
        # Each variant's per-unit factor (DoRA's), computed once per call.
        factors = routed_factors(layer, self.adapter_names)
        lora_a, lora_b = stacked_adapters(layer, self.adapter_names, inputs, factors)
        lora_a = ops.take(lora_a, self.slot, axis=0)
        lora_b = ops.take(lora_b, self.slot, axis=0)
        updated = ops.add(outputs, _per_example_update(layer, inputs, outputs,
                                                       lora_a, lora_b))
        factors = stacked_factors(layer, self.adapter_names, factors, inputs)
        if factors is None:
            return updated
        # DoRA: each example also rescales its base output, (f − 1)·(x·W).
        base_x = outputs
        if layer.bias is not None:
            base_x = ops.subtract(base_x, ops.cast(layer.bias, outputs.dtype))
        scale = ops.take(factors, self.slot, axis=0)  # (batch, *free)
        _, free = layer._kernel_split(layer.base_layer)
        middle = len(outputs.shape) - 1 - len(free)
        scale = ops.reshape(
            scale, (-1,) + (1,) * middle + tuple(free)
        )
        return ops.add(updated, ops.multiply(ops.subtract(scale, 1.0), base_x))


def routed_factors(layer, adapter_names):
    """`{name: per-unit factor or None}` of `layer`'s adapters among
    `adapter_names` (see `LoRAVariant.routed_factor`)."""
    return {
        name: layer.adapters[name].variant.routed_factor(layer, layer.adapters[name])
        for name in layer._present(adapter_names)
    }


def stacked_adapters(layer, adapter_names, reference=None, factors=None):
    """`(A, B)` of `layer`'s adapters stacked along a new first axis.

    Slot `k` holds adapter `adapter_names[k]` (zeros where the layer lacks
    it), zero-padded to the largest rank, its scaling folded into `B`; a
    last slot of zeros serves the base model.

    Args:
        layer: a LoRA layer.
        adapter_names: the names, in slot order.
        reference: a tensor whose float dtype the stacks take (default: the
            layer's compute dtype).
        factors: `routed_factors(layer, adapter_names)`, if already computed.

    Returns:
        `A` of shape `(len(adapter_names) + 1, rank, *contracted)` and `B`
        of shape `(len(adapter_names) + 1, rank, *free)`.
    """
    contracted, free = layer._kernel_split(layer.base_layer)
    present = [layer.adapters[n] for n in layer._present(adapter_names)]
    rank = max(adapter.rank for adapter in present)
    reference = reference if reference is not None and _is_float(reference) else None
    if factors is None:
        factors = routed_factors(layer, adapter_names)
    a_slots, b_slots = [], []
    for name in adapter_names:
        if name not in layer.adapters:
            a_slots.append(None)
            b_slots.append(None)
            continue
        adapter = layer.adapters[name]
        lora_a = layer._in_compute_dtype(adapter.lora_a, reference)
        lora_b = ops.multiply(
            layer._in_compute_dtype(adapter.lora_b, reference),
            ops.cast(adapter.scaling, lora_a.dtype),
        )
        factor = factors[name]
        if factor is not None:  # a per-unit factor (DoRA's) folds into B
            lora_b = ops.multiply(lora_b, ops.cast(factor, lora_b.dtype))
        a_slots.append(_padded(lora_a, rank))
        b_slots.append(_padded(lora_b, rank))
    dtype = keras.backend.standardize_dtype(
        next(a for a in a_slots if a is not None).dtype
    )
    a_zeros = ops.zeros((rank,) + tuple(contracted), dtype)
    b_zeros = ops.zeros((rank,) + tuple(free), dtype)
    a_slots = [a_zeros if a is None else a for a in a_slots] + [a_zeros]
    b_slots = [b_zeros if b is None else b for b in b_slots] + [b_zeros]
    return _stacked(a_slots), _stacked(b_slots)


def stacked_factors(layer, adapter_names, factors, reference=None):
    """The per-unit factors `factors` (DoRA's `m/‖W + s·AᵀB‖`) stacked by
    slot (1 for adapters without one, missing adapters and the base slot),
    or `None` when no adapter has one."""
    if all(factor is None for factor in factors.values()):
        return None
    _, free = layer._kernel_split(layer.base_layer)
    dtype = layer._in_compute_dtype(layer.kernel, reference).dtype
    ones = ops.ones(tuple(free), dtype)
    slots = []
    for name in adapter_names:
        factor = factors.get(name)
        slots.append(ones if factor is None else ops.cast(factor, dtype))
    return _stacked(slots + [ones])


def _stacked(tensors):
    # Not `ops.stack`: TensorFlow's `tf.stack` fails on variable reads.
    return ops.concatenate([ops.expand_dims(t, 0) for t in tensors], axis=0)


def _padded(factor, rank):
    missing = rank - factor.shape[0]
    if missing == 0:
        return factor
    zeros = ops.zeros((missing,) + tuple(factor.shape[1:]), factor.dtype)
    return ops.concatenate([factor, zeros], axis=0)


def _per_example_update(layer, inputs, outputs, lora_a, lora_b):
    """`(x_i · A_i) · B_i` for every example `i`, shaped like `outputs`.

    `lora_a` is `(batch, rank, *contracted)`, `lora_b` `(batch, rank,
    *free)`. Dense layers and matmul-shaped equations run on 3-D views
    `(batch, positions, d)`; other equations use the layer's own split
    equations with a batch axis added to `A` and `B`.
    """
    x = inputs
    if _is_float(x) and keras.backend.standardize_dtype(x.dtype) != (
        keras.backend.standardize_dtype(lora_a.dtype)
    ):
        x = ops.cast(x, lora_a.dtype)
    if isinstance(layer, LoRAEinsumDense) and not layer._split.matmul_view:
        split = layer._split
        project_in, project_out = split.project_equation.split("->")
        x_spec, a_spec = project_in.split(",")
        batch = x_spec[0]
        low = ops.einsum(f"{x_spec},{batch}{a_spec}->{project_out}", x, lora_a)
        expand_in, expand_out = split.expand_equation.split("->")
        low_spec, b_spec = expand_in.split(",")
        return ops.einsum(f"{low_spec},{batch}{b_spec}->{expand_out}", low, lora_b)
    contracted, free = layer._kernel_split(layer.base_layer)
    d_in, d_out = math.prod(contracted), math.prod(free)
    batch_size = ops.shape(x)[0]
    rank = lora_a.shape[1]
    x = ops.reshape(x, (batch_size, -1, d_in))
    lora_a = ops.reshape(lora_a, (batch_size, rank, d_in))
    lora_b = ops.reshape(lora_b, (batch_size, rank, d_out))
    low = ops.einsum("bnd,brd->bnr", x, lora_a)
    update = ops.einsum("bnr,bro->bno", low, lora_b)
    return ops.reshape(update, ops.shape(outputs))


def _routable_equation(equation):
    operands, output = equation.replace(" ", "").split("->")
    inputs, kernel = operands.split(",")
    return bool(inputs) and inputs[0] not in kernel and output[:1] == inputs[0]


def _as_name_list(adapter_names, who):
    if isinstance(adapter_names, str) or not isinstance(
        adapter_names, (list, tuple)
    ) or not adapter_names:
        raise TypeError(
            f"{who}: `adapter_names` must be a non-empty list of adapter "
            f"names. Received: adapter_names={adapter_names!r}"
        )
    return multi._as_names(list(adapter_names), who)


def _declared_inputs(model):
    """The model's symbolic inputs, nested as it takes them, or `None`."""
    try:
        return model.input
    except (AttributeError, ValueError):
        # A `Sequential` model reports its inputs only as a list.
        inputs = getattr(model, "inputs", None)
        if not inputs:
            return None
        return inputs[0] if len(inputs) == 1 else list(inputs)


def _input_names(model):
    inputs = _declared_inputs(model)
    if isinstance(inputs, dict):
        return set(inputs)
    return {getattr(t, "name", None) for t in keras.tree.flatten(inputs)}


def input_structure(mixed_model):
    """The inputs of a `mixed_batch_model`, nested as it takes them."""
    return mixed_model.input


def _fresh_input(tensor):
    # The input layer's name, which a saved and loaded model keeps (a
    # symbolic tensor's own automatic name is not kept).
    history = getattr(tensor, "_keras_history", None)
    name = getattr(getattr(history, "operation", None), "name", None)
    if not name:
        name = getattr(tensor, "name", None)
    if name and name.startswith("keras_tensor"):
        name = None  # an automatic name: let Keras choose a fresh one
    return keras.Input(
        batch_shape=tuple(tensor.shape), dtype=tensor.dtype, name=name
    )


def _is_float(x):
    return "float" in keras.backend.standardize_dtype(x.dtype)
