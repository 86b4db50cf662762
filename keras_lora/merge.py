"""Folding adapters into kernels: a new plain model, in place, or reversibly.

Three ways, for three needs:

- `merge_lora(model)` builds a **new** model from the base's own layer
  classes (every LoRA layer becomes the `Dense` / `EinsumDense` it wraps,
  holding `W + scaling·A·B`). It loads and serves with plain Keras, no
  keras-lora needed, and the LoRA model is left as it was.
- `merge_lora(model, in_place=True)` does the same to `model` itself,
  without copying any weight (for models too big to hold twice): each LoRA
  layer's kernel receives the update and the layer is swapped back for its
  base layer. The adapters are gone afterwards.
- `merge_adapters(model)` / `unmerge_adapters(model)` fold the updates in
  and take them out again while keeping the LoRA layers, for fast
  inference between training runs.

Every route checks all updates for NaN / infinity before it changes
anything.
"""

import functools

import keras

from keras_lora import config as lora_config
from keras_lora import model_copy
from keras_lora import model_walk
from keras_lora import traced_cache
from keras_lora import trained_weights
from keras_lora.hub import reset_compiled_functions
from keras_lora.layers import LORA_LAYER_FOR
from keras_lora.layers import LoRALayer
from keras_lora.layers import quantized

# Every LoRA class of the dispatch table, as its serialized config names it.
_LORA_REGISTERED_NAMES = frozenset(
    keras.saving.get_registered_name(lora_class)
    for _, lora_class in LORA_LAYER_FOR
)


def merge_lora(model, in_place=False, dequantize=False):
    """Returns a model with every LoRA update folded into its kernel.

    The result contains only the base model's own layer classes: each LoRA
    layer becomes the layer it wraps (same name, same config) whose kernel
    is `W + scaling·A·B`, so the merged model computes what the LoRA model
    computes (to float32 rounding, about 1e-6 relative) at the cost of the
    base model, and saves to a `.keras` file that plain Keras loads without
    importing keras-lora. The model's class is kept (functional,
    `Sequential`, nested and subclassed models, keras-hub tasks). A layer
    whose adapter is disabled or already merged contributes its kernel as
    it is, matching what it computes.

    A LoRA layer on an int8 / int4 base (Keras's `model.quantize`) stays
    quantized: its kernel is dequantized, the update added and the sum
    quantized again by Keras's own `quantize` with the base's mode and
    config, which adds one more rounding of the kernel (see
    docs/quantized_bases.md for its size). With `dequantize=True` such a
    layer becomes a float layer holding `W_deq + scaling·A·B` instead,
    which computes what the LoRA model computes (exactly, up to float
    rounding, where the base quantizes weights only; Keras's int8 layers
    also quantize their inputs, a rounding the float layer no longer does).

    Args:
        model: a Keras model with LoRA layers.
        in_place: if `False` (default), build and return a new model and
            leave `model` untouched (memory: one extra copy of the weights).
            If `True`, change `model` itself: fold each update into the
            shared base kernel, swap every LoRA layer back for its base
            layer (made trainable again) and return `model`; no weight is
            copied. Other layers keep their trainable flags.
        dequantize: if `True`, LoRA layers on int8 / int4 bases become
            float layers (`W_deq + scaling·A·B`, in the base's float dtype
            policy) instead of being quantized again; other quantized
            layers are kept as they are. Needs `in_place=False`.

    Returns:
        The merged model. A new model is compiled with the LoRA model's
        compile settings when that one was compiled (a keras-hub
        `CausalLM`'s sampler included), with a fresh optimizer.

    Raises:
        ValueError: if the model has no LoRA layers, an update holds NaN
            or infinite values, or `dequantize=True` with `in_place=True`
            (nothing is changed).

    Example:

    >>> inputs = keras.Input((8,))
    >>> lora = LoRADense(4, rank=2, name="proj")
    >>> model = keras.Model(inputs, lora(inputs))
    >>> merged = merge_lora(model)
    >>> type(merged.get_layer("proj")).__name__
    'Dense'
    """
    for flag, value in (("in_place", in_place), ("dequantize", dequantize)):
        lora_config.validate_bool(value, flag, "merge_lora: ")
    entries = _lora_entries(model)
    if in_place and dequantize:
        raise ValueError(
            "merge_lora: dequantize=True makes new float layers for the "
            "quantized bases, which in_place=True (that keeps every base "
            "layer object) cannot do. Use `merge_lora(model, "
            "dequantize=True)` (a new model). Nothing was changed. Received: "
            "in_place=True, dequantize=True"
        )
    _check_finite(entries)
    if in_place:
        return _merge_in_place(model, entries)
    return _merge_to_new_model(model, dequantize)


def merge_adapters(model):
    """Folds every LoRA update into its kernel, keeping the LoRA layers.

    While merged, the LoRA layers skip the low-rank path, so inference costs
    what the base model costs. `unmerge_adapters` undoes it. The compiled
    `predict` / `train` / `test` functions are reset so they re-trace.

    Tolerance: `unmerge_adapters` subtracts the same update again, which
    restores each kernel up to float rounding (a few ulps of the kernel
    values, about 1e-7 relative in float32; more in float16/bfloat16). Where
    exact base weights matter, keep the adapters unmerged, or save the
    adapter and rebuild from the original base weights.

    Only enabled adapters are folded in: a layer whose adapter is disabled
    computes the base, and is left as it is (as `merge_lora` does), so
    outputs never move. Every update and merged kernel is checked first.

    Args:
        model: a Keras model with LoRA layers.

    Returns:
        `model`.

    Raises:
        ValueError: if the model has no LoRA layers, or an update or a
            merged kernel (in the kernel's dtype) is not finite (nothing is
            changed).

    Example:

    >>> inputs = keras.Input((8,))
    >>> model = keras.Model(inputs, LoRADense(4, rank=2)(inputs))
    >>> model = merge_adapters(model)
    >>> [layer.merged for layer in lora_layers(model).values()]
    [True]
    """
    entries = _lora_entries(model)
    _check_finite(entries)
    for entry in entries:
        if _folds_update(entry.layer):
            entry.layer.merge()
    reset_compiled_functions(model)
    return model


def unmerge_adapters(model):
    """Takes every merged LoRA update out of its kernel again.

    See `merge_adapters` for the float tolerance of the restored kernels.

    Args:
        model: a Keras model with LoRA layers.

    Returns:
        `model`.
    """
    return _on_every_lora_layer(model, "unmerge")


def disable_adapters(model):
    """Turns every LoRA layer's low-rank path off: the model computes the base.

    Takes effect at once, and returns a context manager that turns the
    adapters back on when its block ends, as PEFT's `disable_adapter()`
    (`with keras_lora.disable_adapters(model): ...`, see the example).

    Unlike `LoRALayer.disable_adapter()` on one layer, this also clears the
    model's traced `predict` / `fit` / `evaluate` (and keras-hub
    `generate`) functions, which would otherwise keep the adapter on JAX and
    TensorFlow.

    Args:
        model: a Keras model with LoRA layers.

    Returns:
        A context manager whose `__enter__` returns `model` and whose
        `__exit__` calls `enable_adapters(model)`.

    Example:

    >>> inputs = keras.Input((8,))
    >>> model = keras.Model(inputs, LoRADense(4, rank=2)(inputs))
    >>> with disable_adapters(model):
    ...     print([layer.adapter_enabled for layer in lora_layers(model).values()])
    [False]
    >>> [layer.adapter_enabled for layer in lora_layers(model).values()]
    [True]
    """
    _on_every_lora_layer(model, "disable_adapter")
    return _AdaptersDisabled(model)


class _AdaptersDisabled:
    """Re-enables a model's adapters when a `with` block ends."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        return self.model

    def __exit__(self, *exception):
        enable_adapters(self.model)
        return False


def enable_adapters(model):
    """Turns every LoRA layer's low-rank path back on (see `disable_adapters`).

    Args:
        model: a Keras model with LoRA layers.

    Returns:
        `model`.
    """
    return _on_every_lora_layer(model, "enable_adapter")


# Shared steps -------------------------------------------------------------


def _on_every_lora_layer(model, method):
    """Calls `method` on every LoRA layer, then resets the traced functions
    (which have the layers' Python flags baked in). Returns `model`."""
    with traced_cache.deferred(model):
        for entry in _lora_entries(model):
            getattr(entry.layer, method)()
    return model


def _lora_entries(model):
    from keras_lora.surgery import lora_entries

    entries = lora_entries(model)
    if not entries:
        raise ValueError(
            f"Model '{model.name}' has no LoRA layers. Use "
            "`apply_lora` or `load_adapter` first."
        )
    return entries


def _folds_update(layer):
    """Whether the layer's kernel still lacks the update it computes with."""
    return layer.adapter_enabled and not layer.merged


def _check_finite(entries):
    """Every update to fold, and its merged kernel in the kernel's dtype, is
    finite; one layer at a time, so a large model never holds every merged
    kernel at once (merging computes each again: twice the arithmetic, no
    extra memory)."""
    for entry in entries:
        if not _folds_update(entry.layer):
            continue
        try:
            if quantized.mode_of(entry.layer.base_layer):
                # W_deq + s·A·B; quantizing it again cannot add a NaN.
                entry.layer.merged_kernel()
            else:
                entry.layer.merged_weights()
        except ValueError as error:
            raise ValueError(
                f"Layer '{entry.path}': {str(error).split(': ', 1)[-1]}"
            ) from None


def _effective_weights(layer):
    """`{id(variable): value}` of the base weights the merge replaces."""
    if _folds_update(layer):
        return {id(v): value for v, value in layer.merged_weights()}
    return {}


def _dequantized_weights(layer):
    """For a quantized base: `model_copy.ByName` values of its float twin
    (`W_deq` plus the update it computes with, and the bias)."""
    base = layer.base_layer
    if not quantized.mode_of(base):
        return _effective_weights(layer)
    kernel = (
        layer.merged_kernel() if _folds_update(layer)
        else quantized.dequantized_kernel(base)
    )
    values = model_copy.ByName(kernel=kernel)
    if getattr(base, "bias", None) is not None:
        values["bias"] = base.bias.value
    return values


# In place -----------------------------------------------------------------


def _merge_in_place(model, entries):
    from keras_lora import layer_swap

    for entry in entries:
        layer = entry.layer
        if _folds_update(layer):
            for variable, value in layer.merged_weights():
                variable.assign(value)
        layer.base_layer.trainable = layer.trainable
        for parent in entry.parents:
            layer_swap.replace_layer(parent, layer, layer.base_layer)
    trained_weights.forget(model)
    reset_compiled_functions(model)
    return model


# New model ----------------------------------------------------------------


def _merge_to_new_model(model, dequantize=False):
    merged = model_copy.rebuild(
        model, functools.partial(_strip_lora, dequantize=dequantize),
        who="merge_lora",
    )
    leftover = [
        entry.path
        for entry in model_walk.walk(merged).values()
        if isinstance(entry.layer, LoRALayer)
    ]
    if leftover:
        raise ValueError(
            f"merge_lora: could not rebuild model '{model.name}' without "
            f"LoRA layers; still present: {leftover}."
        )
    model_copy.copy_state(
        model, merged,
        merged_of=_dequantized_weights if dequantize else _effective_weights,
    )
    from keras_lora.surgery import compile_like

    compile_like(merged, model)
    return merged


def _strip_lora(config, dequantize=False):
    """Replaces every serialized LoRA layer by its serialized base layer
    (with `dequantize`, a quantized base by its float form)."""
    if isinstance(config, list):
        return [_strip_lora(item, dequantize) for item in config]
    if not isinstance(config, dict):
        return config
    if config.get("registered_name") in _LORA_REGISTERED_NAMES:
        wrapper = config["config"]
        base = dict(wrapper["base_layer"])
        base["config"] = dict(
            base["config"],
            name=wrapper["name"],
            trainable=wrapper.get("trainable", True),
        )
        if dequantize and _is_quantized_policy(base["config"].get("dtype")):
            # The wrapper's policy is the base's float source policy.
            base["config"]["dtype"] = wrapper["dtype"]
            base["config"]["quantization_config"] = None
        # Graph wiring (`name`, `inbound_nodes`) belongs to the wrapper's slot.
        for key, value in config.items():
            if key not in ("module", "class_name", "config", "registered_name",
                           "build_config"):
                base[key] = value
        if "build_config" in config and "build_config" not in base:
            base["build_config"] = config["build_config"]
        return base
    return {key: _strip_lora(value, dequantize) for key, value in config.items()}


def _is_quantized_policy(dtype_config):
    if dtype_config is None:
        return False
    try:
        policy = keras.dtype_policies.deserialize(dtype_config)
    except (TypeError, ValueError):
        return False
    return getattr(policy, "quantization_mode", None) is not None


