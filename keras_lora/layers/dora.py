"""DoRA (weight-decomposed LoRA), computed without forming `W + s·A·B`.

DoRA replaces a kernel `W` by `W' = m ⊙ V / ‖V‖` with `V = W + s·AᵀB`,
the norm taken per output unit over the contracted (input) axes and the
trainable magnitude `m` initialized to `‖V‖` (so a fresh adapter changes
nothing). As in PEFT and the DoRA paper, `‖V‖` is a constant in the
backward pass (detached). The forward adds, to the base output `x·W + b`,

    (m/‖V‖ − 1) ⊙ (x·W) + s · (x·Aᵀ)·(B ⊙ m/‖V‖)

which is PEFT's formula, with the per-unit factor folded into `B`.

PEFT forms `V` (a `d_in × d_out` temporary) every step to take its norm;
here it comes from small products instead:
`‖V_j‖² = ‖W_j‖² + 2s·Σ_r (A·W)_rj B_rj + s²·Σ_rr' B_rj (A·Aᵀ)_rr' B_r'j`,
with `‖W_j‖²` computed once (the kernel is frozen), `A·W` an `r × d_out`
product and `A·Aᵀ` an `r × r` one.
"""

import numpy as np
from keras import ops

from keras_lora.layers import dora_kernels


def contracted_axes_of_a(layer):
    """The axes of `lora_a` (rank first) that pair with the kernel's
    contracted axes, in order."""
    contracted, _ = layer._kernel_axes(layer.base_layer)
    return list(range(1, 1 + len(contracted)))


def kernel_norm_squared(layer, lora_a=None, lora_b=None, scaling=0.0):
    """`‖W + s·AᵀB‖²` per output unit as a float32 numpy array (free shape),
    computed on the host, once: at creation (with the initial A, B)."""
    kernel = np.asarray(ops.convert_to_numpy(layer.kernel.value), "float64")
    contracted, free = layer._kernel_axes(layer.base_layer)
    if lora_a is not None:
        a = np.asarray(ops.convert_to_numpy(lora_a), "float64")
        b = np.asarray(ops.convert_to_numpy(lora_b), "float64")
        # (contracted..., free...) -> the kernel's own axis order.
        delta = np.tensordot(a, b, axes=([0], [0]))
        delta = np.transpose(delta, np.argsort(tuple(contracted) + tuple(free)))
        kernel = kernel + scaling * delta
    return np.sum(np.square(kernel), axis=tuple(contracted)).astype("float32")


def weight_norm(layer, adapter, lora_a, lora_b):
    """`‖W + s·AᵀB‖` per output unit (free shape, float32), detached."""
    contracted, _ = layer._kernel_axes(layer.base_layer)
    return dora_kernels.dora_weight_norm(
        ops.cast(ops.convert_to_tensor(layer.kernel), "float32"),
        ops.convert_to_tensor(adapter.kernel_norm_sq),
        ops.cast(lora_a, "float32"), ops.cast(lora_b, "float32"),
        adapter.scaling, tuple(contracted_axes_of_a(layer)), tuple(contracted),
    )


def add_dora_output(layer, outputs, base, x, adapter):
    """`outputs` plus one DoRA adapter's term (see the module docstring),
    as one fused call (`dora_kernels.add_dora_update`).

    Args:
        layer: the LoRA layer.
        outputs: what the layer has computed so far (may be `base`).
        base: `x·W + bias`, the base pre-activation of the LoRA input `x`.
        x: the (dropped-out) LoRA input.
        adapter: the DoRA `Adapter`.
    """
    contracted, _ = layer._kernel_axes(layer.base_layer)
    bias = layer.bias
    return dora_kernels.add_dora_update(
        outputs, base, None if bias is None else ops.convert_to_tensor(bias), x,
        ops.convert_to_tensor(layer.kernel),
        ops.convert_to_tensor(adapter.kernel_norm_sq),
        ops.convert_to_tensor(adapter.lora_a),
        ops.convert_to_tensor(adapter.lora_b),
        ops.convert_to_tensor(adapter.lora_magnitude),
        adapter.scaling, tuple(contracted_axes_of_a(layer)), tuple(contracted),
    )


def merge_factor(layer, adapter):
    """`m / ‖W + s·AᵀB‖` in the kernel's layout (1 on contracted axes)."""
    kernel = ops.cast(ops.convert_to_tensor(layer.kernel.value), "float32")
    v = ops.add(kernel, layer._scaled_delta_kernel(adapter))
    contracted, _ = layer._kernel_axes(layer.base_layer)
    norm = ops.sqrt(ops.sum(ops.square(v), axis=tuple(contracted), keepdims=True))
    magnitude = ops.convert_to_tensor(adapter.lora_magnitude.value)
    for axis in contracted:  # free shape -> kernel layout, 1 on contracted
        magnitude = ops.expand_dims(magnitude, axis)
    return ops.divide(magnitude, norm)


def merged_kernel_delta(layer, adapter):
    """`W' − W` for a DoRA adapter: `m ⊙ V/‖V‖ − W`, in float32."""
    kernel = ops.cast(ops.convert_to_tensor(layer.kernel.value), "float32")
    v = ops.add(kernel, layer._scaled_delta_kernel(adapter))
    return ops.subtract(ops.multiply(merge_factor(layer, adapter), v), kernel)
