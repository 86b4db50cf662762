"""LoRA on a base quantized by Keras's own `model.quantize` (QLoRA-style).

A `Dense` or `EinsumDense` layer that `model.quantize("int8")` or
`model.quantize("int4")` turned into a quantized layer keeps its kernel as
int8 values (int4 values packed two to a byte) plus float scales (and, for
int4 in blocks, zero points). A LoRA layer on such a base:

- computes the base path with the layer's own quantized forward
  (`quantized_call`, i.e. Keras's `_int8_call` / `_int4_call`), before the
  activation, exactly as Keras adds its own `enable_lora` update there; so
  a freshly adapted model computes exactly what the quantized model did,
  and the base's int8 / packed int4 variables are used as they are (no
  float copy of the kernel is kept in the model);
- keeps float32 adapters and the same factored update as on a float base;
- merges by dequantizing, adding `s·A·B` and quantizing again with Keras's
  own `quantize` and the base's mode and config (or, on request, returns a
  float kernel `W_deq + s·A·B`).

What else Keras quantizes is refused by name: float8 (its scales and amax
histories are trained through the gradient, which a frozen base stops),
GPTQ and AWQ (calibrated 4-bit formats whose forward Keras does not combine
with a LoRA update: its GPTQ path refuses `enable_lora` and its AWQ forward
ignores it; keras-lora refuses rather than drop an update silently).

Everything here reads Keras's quantized variables through the attributes
Keras's own layers use for them (`_kernel`, `kernel_scale`, ...): Keras
has no public accessor for the stored quantized kernel.
"""

import contextlib

import keras
from keras import ops
from keras.src.quantizers.quantizers import dequantize_with_sz_map

from keras_lora.layers import quantized_kernels

SUPPORTED_MODES = ("int8", "int4")

_UNSUPPORTED_REASONS = {
    "float8": (
        "float8 layers train their scales and amax histories through the "
        "gradient, which a frozen base would stop"
    ),
    "gptq": (
        "GPTQ kernels are a calibrated 4-bit format whose forward Keras does "
        "not combine with a LoRA update (Keras's own `enable_lora` refuses it)"
    ),
    "awq": (
        "AWQ kernels are a calibrated 4-bit format whose forward Keras does "
        "not combine with a LoRA update (Keras's own AWQ forward ignores "
        "`enable_lora`); keras-lora refuses rather than drop the update"
    ),
}


def mode_of(layer):
    """The layer's Keras quantization mode (`"int8"`, `"int4"`, ...) or `None`."""
    return getattr(layer, "quantization_mode", None)


def check_base(lora_class, layer):
    """Raises unless `lora_class` can adapt `layer` as quantized (if it is).

    Args:
        lora_class: the LoRA class asked to adapt `layer`.
        layer: the base layer.

    Raises:
        ValueError: for a quantized layer of a type keras-lora adapts only
            in float, or a quantization mode other than int8 / int4.
    """
    mode = mode_of(layer)
    if mode is None:
        return
    if not getattr(lora_class, "supports_quantized_base", False):
        raise ValueError(
            f"Layer '{layer.name}' is quantized (quantization_mode={mode!r}); "
            f"{lora_class.__name__} adapts float layers only. keras-lora "
            "adapts quantized Dense and EinsumDense layers (int8, int4): "
            "exclude this layer or adapt a float one."
        )
    if mode not in SUPPORTED_MODES:
        reason = _UNSUPPORTED_REASONS.get(mode, "keras-lora does not know it")
        raise ValueError(
            f"Layer '{layer.name}' is quantized with mode {mode!r}, which "
            f"keras-lora cannot adapt: {reason}. Supported quantized bases: "
            "'int8' and 'int4' (Keras's `model.quantize(mode)`). Received: "
            f"quantization_mode={mode!r}"
        )


def check_specs(base_layer, specs, merged=False, where=""):
    """Refuses adapter kinds that do not fit a quantized base.

    DoRA normalizes by the float kernel and PiSSA / OLoRA replace it by a
    residual; on an int8 / int4 base neither can be done exactly, and a
    quantized kernel never holds a merged update (see `merge_refused`).

    Raises:
        ValueError: naming the layer, the mode and the argument.
    """
    mode = mode_of(base_layer)
    if mode is None:
        return
    if merged:
        raise merge_refused(base_layer)
    for spec in specs:
        if spec.use_dora:
            raise ValueError(
                f"{where}DoRA (use_dora=True) needs the float kernel's norm, "
                f"which the {mode} base (quantization_mode={mode!r}) does not "
                "hold; use plain LoRA on a quantized base. Received: "
                "use_dora=True"
            )
        check_init(base_layer, spec.init, where)


def check_init(base_layer, init, where=""):
    """Refuses an `init` that rewrites the kernel (PiSSA, OLoRA) on a
    quantized base, which cannot hold the residual `W - s·A·B` exactly."""
    mode = mode_of(base_layer)
    if mode is None or init in ("default", "gaussian"):
        return
    raise ValueError(
        f"{where}init={init!r} replaces the base kernel by a residual, which "
        f"the {mode} base of layer '{base_layer.name}' (quantization_mode="
        f"{mode!r}) cannot hold exactly; use init='default' or 'gaussian' "
        f"on a quantized base. Received: init={init!r}"
    )


def wrapper_dtype(base_layer):
    """The dtype policy of the LoRA layer around `base_layer`: the base's
    float source policy when it is quantized (a LoRA layer itself is not
    quantized: its `call` must not be routed to a quantized forward)."""
    policy = base_layer.dtype_policy
    if policy.quantization_mode is None:
        return policy
    # A quantized policy is named "<mode>_from_<source policy>".
    return keras.dtype_policies.get(policy.name.split("_from_", 1)[1])


def stored_kernel(layer):
    """The variable holding the quantized kernel (int8; packed for int4)."""
    return layer._kernel


def kernel_shape(layer):
    """The logical (unpacked) kernel shape of a quantized layer."""
    if mode_of(layer) == "int4":
        if isinstance(layer, keras.layers.EinsumDense):
            return tuple(layer.original_kernel_shape)
        return (layer._orig_input_dim, layer._orig_output_dim)
    return tuple(layer._kernel.shape)


@contextlib.contextmanager
def _without_activation(layer):
    activation = layer.activation
    layer.activation = None
    try:
        yield
    finally:
        layer.activation = activation


def preactivation(layer, inputs):
    """The base layer's own quantized forward, bias included, activation not.

    Args:
        layer: an int8 / int4 quantized `Dense` or `EinsumDense`.
        inputs: the layer input.

    Returns:
        What Keras's `_int8_call` / `_int4_call` computes before the
        activation, in the layer's compute dtype.
    """
    if _has_fast_int8_path(layer):
        return _int8_preactivation(layer, inputs)
    activation = getattr(layer, "activation", None)
    if activation is None or activation is keras.activations.linear:
        return layer.quantized_call(inputs)
    with _without_activation(layer):
        return layer.quantized_call(inputs)


def _has_fast_int8_path(layer):
    """Whether `_int8_preactivation` computes this layer's int8 forward with
    a faster exact contraction than Keras's (see `quantized_kernels`)."""
    return (
        mode_of(layer) == "int8"
        and getattr(layer, "inputs_quantizer", None) is not None
        and not getattr(layer, "lora_enabled", False)
        and quantized_kernels.fast_path_available()
    )


def _int8_preactivation(layer, inputs):
    """Keras's `_int8_call` before the activation, op for op, except that
    the int8 x int8 contraction is `quantized_kernels`' exact one.

    The outputs are bit-for-bit Keras's: the same input quantizer, the same
    int32 values (cast to the compute dtype), the same de-scaling and bias.
    The input gradient is Keras's custom gradient, unchanged: the upstream
    gradient contracted with the dequantized kernel `q / scale`; the frozen
    int8 kernel and its scale get none.
    """
    einsum = isinstance(layer, keras.layers.EinsumDense)
    dtype = layer.compute_dtype

    @ops.custom_gradient
    def forward(inputs, kernel, kernel_scale):
        def grad_fn(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            if einsum:
                float_kernel = ops.divide(
                    ops.cast(kernel, dtype=dtype),
                    layer._adjust_scale_for_dequant(kernel_scale),
                )
                inputs_grad = ops.einsum(
                    layer._custom_gradient_equation, upstream, float_kernel
                )
            else:
                float_kernel = ops.divide(ops.cast(kernel, dtype=dtype), kernel_scale)
                inputs_grad = ops.matmul(upstream, ops.transpose(float_kernel))
            return (inputs_grad, None, None)

        if einsum:
            quantized, inputs_scale = layer.inputs_quantizer(
                inputs, axis=layer.quantization_axis
            )
            inputs_scale = layer._adjust_scale_for_quant(inputs_scale, "input")
            x = quantized_kernels.int8_einsum(layer.equation, quantized, kernel, dtype)
            return ops.divide(x, ops.multiply(inputs_scale, kernel_scale)), grad_fn
        quantized, inputs_scale = layer.inputs_quantizer(inputs, axis=-1)
        x = quantized_kernels.int8_matmul(quantized, kernel, dtype)
        return ops.divide(x, ops.multiply(kernel_scale, inputs_scale)), grad_fn

    x = forward(
        inputs,
        ops.convert_to_tensor(layer._kernel),
        ops.convert_to_tensor(layer.kernel_scale),
    )
    if layer.bias is not None:
        x = ops.add(x, layer.bias)
    return x


def dequantized_kernel(layer):
    """`W_deq`, the float32 kernel the quantized forward stands for.

    As Keras's own forward and `save` dequantize it: int8 `q / scale`;
    int4 unpacked, then `q / scale` (per channel) or `(q - zero) · scale`
    (in blocks), in the logical kernel shape.

    Args:
        layer: an int8 / int4 quantized `Dense` or `EinsumDense`.

    Returns:
        A float32 tensor of shape `kernel_shape(layer)`.
    """
    mode = mode_of(layer)
    einsum = isinstance(layer, keras.layers.EinsumDense)
    kernel = ops.convert_to_tensor(layer._kernel)
    scale = ops.cast(ops.convert_to_tensor(layer.kernel_scale), "float32")
    if mode == "int8":
        if einsum:
            scale = layer._adjust_scale_for_dequant(scale)
        return ops.divide(ops.cast(kernel, "float32"), scale)
    columns = layer._int4_unpacked_column_size if einsum else layer._orig_output_dim
    unpacked = keras.quantizers.unpack_int4(kernel, columns, axis=-1)
    if getattr(layer, "_int4_block_size", None) in (None, -1):
        flat = ops.divide(ops.cast(unpacked, "float32"), scale)
    else:
        flat = dequantize_with_sz_map(
            ops.cast(unpacked, "float32"), scale,
            ops.convert_to_tensor(layer.kernel_zero),
            ops.convert_to_tensor(layer.g_idx), group_axis=0,
        )
    return ops.reshape(ops.cast(flat, "float32"), kernel_shape(layer))


def requantized_values(layer, float_kernel):
    """The quantized state Keras's own `quantize` gives `float_kernel`.

    A float twin of `layer` (same config, the base's float dtype policy)
    receives `float_kernel` and is quantized with the layer's mode and
    quantization config, as `model.quantize` quantized the layer itself.

    Args:
        layer: an int8 / int4 quantized `Dense` or `EinsumDense`.
        float_kernel: a float kernel of shape `kernel_shape(layer)`.

    Returns:
        `{variable name: value}` for the layer's quantized variables
        (`kernel`, `kernel_scale`, and for int4 in blocks `kernel_zero`,
        `g_idx`); the bias is not included.
    """
    config = layer.get_config()
    config.pop("quantization_config", None)
    config.update(
        dtype=wrapper_dtype(layer), kernel_initializer="zeros",
        bias_initializer="zeros", name=f"{layer.name}_requantized",
    )
    twin = type(layer).from_config(config)
    twin.build_from_config(layer.get_build_config())
    twin._kernel.assign(ops.cast(float_kernel, twin._kernel.dtype))
    twin.quantize(mode_of(layer), type_check=False,
                  config=layer.quantization_config)
    values = {v.name: v.value for v in twin.weights if v.name != "bias"}
    for name, variable in own_quantized_variables(layer).items():
        if name not in values or tuple(values[name].shape) != tuple(variable.shape):
            raise ValueError(
                f"Layer '{layer.name}': quantizing the merged kernel again "
                f"gave no '{name}' of shape {tuple(variable.shape)}; "
                "nothing was changed."
            )
    return values


def own_quantized_variables(layer):
    """`{name: variable}` of the layer's quantized state (bias excluded)."""
    return {v.name: v for v in layer.weights if v.name != "bias"}


def merge_refused(layer):
    """The error for an in-place, reversible merge on a quantized base
    (`layer`: the LoRA layer or its base)."""
    mode = mode_of(getattr(layer, "base_layer", layer))
    return ValueError(
        f"Layer '{layer.name}': its base is {mode}-quantized "
        f"(quantization_mode={mode!r}). Folding the update into it means "
        "quantizing W + s·A·B again, which changes the outputs and cannot be "
        "undone exactly, so `merge()` / `merge_adapters` refuse it. Use "
        "`keras_lora.merge_lora(model)` (re-quantized copy) or "
        "`merge_lora(model, dequantize=True)` (float kernels). Nothing was "
        "changed."
    )


def merged_weights(lora_layer):
    """`[(variable, value)]`: the base's quantized state holding `W + s·A·B`.

    The dequantized kernel plus the active updates (checked finite by
    `merged_kernel`), quantized again with the base's mode and config.

    Args:
        lora_layer: a LoRA layer on an int8 / int4 base.

    Returns:
        One pair per quantized variable of the base (the bias is unchanged).
    """
    base = lora_layer.base_layer
    values = requantized_values(base, lora_layer.merged_kernel())
    return [
        (variable, values[name])
        for name, variable in own_quantized_variables(base).items()
    ]
