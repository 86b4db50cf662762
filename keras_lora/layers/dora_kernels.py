"""DoRA's per-layer term, fused for speed on each backend.

One DoRA adapter adds to a layer's output (see `keras_lora/layers/dora.py`)

    (f − 1) ⊙ (base − bias) + s · (x·Aᵀ)·(B ⊙ f),   f = m / ‖W + s·AᵀB‖

with the norm detached. Written op by op through `keras.ops` that is about
fifteen small ops per layer, and in eager steps (`jit_compile=False`) each
op is a dispatch, forward and backward: DoRA cost 1.3× LoRA per eager JAX
step on an MLP. Here it is one fused call per backend:

- JAX: the whole term (norm, factor, combine, low-rank product) is one
  `jax.jit` function, so an eager step dispatches it once forward and once
  backward; under an outer `jit` it is inlined.
- torch: the norm runs under `torch.no_grad()` (it is detached anyway, so
  autograd records nothing for it), and the combine is two fused ops,
  `torch.addcmul` and `torch.addmm` (the low-rank product added inside the
  GEMM). When nothing else was added to the base output yet (the usual
  case), `outputs + (f−1)⊙(base − bias)` is `f⊙base − (f−1)⊙bias`: one
  `(N, d_out)` op with the bias term a broadcast vector.
- TensorFlow: the same `keras.ops` code as JAX, not jitted (its eager
  steps measured within 1.1× LoRA without fusing).
"""

import keras
from keras import ops

from keras_lora.layers import kernels

_BACKEND = keras.backend.backend()

if _BACKEND == "torch":
    import torch
elif _BACKEND == "jax":
    import jax


def dora_weight_norm(kernel, kernel_norm_sq, lora_a, lora_b, scaling, a_axes,
                     kernel_axes):
    """DoRA's `‖W + s·AᵀB‖` per output unit from small products (detached).

    `‖W_j‖²` (`kernel_norm_sq`) is a constant of the frozen kernel;
    `A·W` is a `rank × d_out` product and `A·Aᵀ` a `rank × rank` one (see
    `keras_lora/layers/dora.py`).

    Args:
        kernel: the base kernel, float32.
        kernel_norm_sq: `‖W_j‖²`, free-axes shaped, float32.
        lora_a: `(rank, *contracted)`, float32.
        lora_b: `(rank, *free)`, float32.
        scaling: a Python float.
        a_axes: the contracted axes of `lora_a` (a tuple).
        kernel_axes: the kernel's contracted axes, in the same order.

    Returns:
        The norm, free-axes shaped, float32, with no gradient.
    """
    args = (kernel, kernel_norm_sq, lora_a, lora_b, float(scaling),
            tuple(a_axes), tuple(kernel_axes))
    if _BACKEND == "jax":
        return _jax_norm(*args)
    if _BACKEND == "torch":
        with torch.no_grad():
            return _torch_norm(*args)
    return _norm(*args)


def add_dora_update(outputs, base, bias, inputs, kernel, kernel_norm_sq,
                    lora_a, lora_b, magnitude, scaling, a_axes, kernel_axes):
    """Returns `outputs + (f − 1)⊙(base − bias) + s·(x·Aᵀ)·(B⊙f)`.

    `f = magnitude / ‖W + s·AᵀB‖` per output unit, the norm detached (as in
    PEFT). The contracted axes must be the trailing axes of `inputs`, in
    `lora_a`'s order, and the free axes the trailing axes of `outputs` (as
    for `kernels.add_low_rank_update`).

    Args:
        outputs: what the layer has computed so far, `(..., *free)`; may be
            `base` itself.
        base: the base layer's pre-activation `x·W + bias` for the LoRA
            input `x` (`inputs`).
        bias: the base layer's bias tensor, or `None`.
        inputs: the (dropped-out) LoRA input `x`, `(..., *contracted)`.
        kernel: the base kernel tensor.
        kernel_norm_sq: `‖W_j‖²`, free-axes shaped, float32.
        lora_a: `(rank, *contracted)`, float32.
        lora_b: `(rank, *free)`, float32.
        magnitude: `m`, free-axes shaped, float32.
        scaling: a Python float.
        a_axes: the contracted axes of `lora_a` (a tuple).
        kernel_axes: the kernel's contracted axes, in the same order.

    Returns:
        A tensor shaped and typed like `outputs`.
    """
    statics = (float(scaling), tuple(a_axes), tuple(kernel_axes))
    if _BACKEND == "torch" and _broadcasts(bias, magnitude.shape):
        return _torch_update(outputs, base, bias, inputs, kernel,
                             kernel_norm_sq, lora_a, lora_b, magnitude,
                             *statics)
    # `None` outputs stand for `base` (one fewer operand to pass and
    # differentiate through).
    fused = None if outputs is base else outputs
    update = _jax_update if _BACKEND == "jax" else _update
    return update(fused, base, bias, inputs, kernel, kernel_norm_sq, lora_a,
                  lora_b, magnitude, *statics)


def _broadcasts(bias, free_shape):
    """Whether `bias` (or its absence) broadcasts to the free axes alone
    (an EinsumDense bias may also span a batch axis)."""
    if bias is None:
        return True
    shape = tuple(bias.shape)
    if len(shape) > len(free_shape):
        return False
    return all(b in (1, f) for b, f in zip(reversed(shape), reversed(free_shape)))


def _norm(kernel, kernel_norm_sq, lora_a, lora_b, scaling, a_axes,
          kernel_axes):
    kernel = ops.cast(kernel, "float32")
    a_w = ops.tensordot(lora_a, kernel, axes=(list(a_axes), list(kernel_axes)))
    gram = ops.tensordot(lora_a, lora_a, axes=(list(a_axes), list(a_axes)))
    g_b = ops.tensordot(gram, lora_b, axes=([1], [0]))
    squared = (
        kernel_norm_sq
        + (2.0 * scaling) * ops.sum(ops.multiply(a_w, lora_b), axis=0)
        + (scaling * scaling) * ops.sum(ops.multiply(g_b, lora_b), axis=0)
    )
    return ops.stop_gradient(ops.sqrt(ops.maximum(squared, 1e-12)))


def _update(outputs, base, bias, inputs, kernel, kernel_norm_sq, lora_a,
            lora_b, magnitude, scaling, a_axes, kernel_axes):
    dtype = inputs.dtype
    # Float32 whatever a mixed-precision layer's autocast made of them.
    kernel_norm_sq, lora_a, lora_b, magnitude = (
        ops.cast(v, "float32") for v in (kernel_norm_sq, lora_a, lora_b, magnitude)
    )
    factor = ops.divide(
        magnitude,
        _norm(kernel, kernel_norm_sq, lora_a, lora_b, scaling, a_axes,
              kernel_axes),
    )
    base_x = base if bias is None else ops.subtract(base, ops.cast(bias, base.dtype))
    scaled = ops.multiply(ops.cast(ops.subtract(factor, 1.0), dtype), base_x)
    outputs = ops.add(base if outputs is None else outputs, scaled)
    return kernels.update_on_views(
        outputs, inputs, ops.cast(lora_a, dtype),
        ops.cast(ops.multiply(lora_b, factor), dtype), scaling,
    )


if _BACKEND == "jax":
    _jax_norm = jax.jit(_norm, static_argnums=(4, 5, 6))
    _jax_update = jax.jit(_update, static_argnums=(9, 10, 11))


def _torch_norm(kernel, kernel_norm_sq, lora_a, lora_b, scaling, a_axes,
                kernel_axes):
    rank = lora_a.shape[0]
    kernel = kernel.to(torch.float32)
    if len(a_axes) == 1 and a_axes[0] == 1 and kernel_axes == (0,):
        a_w = torch.mm(lora_a.reshape(rank, -1), kernel.reshape(kernel.shape[0], -1))
    else:
        a_w = torch.tensordot(lora_a, kernel, dims=(list(a_axes), list(kernel_axes)))
        a_w = a_w.reshape(rank, -1)
    flat_a = lora_a.reshape(rank, -1)
    flat_b = lora_b.reshape(rank, -1)
    # 2s·A·W + s²·(A·Aᵀ)·B in one GEMM, then Σ_r (·) ⊙ B.
    mixed = torch.addmm(a_w, torch.mm(flat_a, flat_a.t()), flat_b,
                        beta=2.0 * scaling, alpha=scaling * scaling)
    squared = torch.sum(mixed * flat_b, dim=0).add_(kernel_norm_sq.reshape(-1))
    return squared.clamp_min_(1e-12).sqrt_().reshape(kernel_norm_sq.shape)


def _torch_update(outputs, base, bias, inputs, kernel, kernel_norm_sq, lora_a,
                  lora_b, magnitude, scaling, a_axes, kernel_axes):
    rank = lora_a.shape[0]
    dtype = inputs.dtype
    kernel_norm_sq, lora_a, lora_b, magnitude = (
        v.float() for v in (kernel_norm_sq, lora_a, lora_b, magnitude)
    )
    with torch.no_grad():
        norm = _torch_norm(kernel, kernel_norm_sq, lora_a, lora_b, scaling,
                           a_axes, kernel_axes).reshape(-1)
    factor = magnitude.reshape(-1) / norm
    flat_a = lora_a.reshape(rank, -1)
    scaled_b = (lora_b.reshape(rank, -1) * factor).to(dtype)
    factor = factor.to(dtype)
    width = scaled_b.shape[1]
    flat_base = base.reshape(-1, width)
    low_rank = torch.mm(inputs.reshape(-1, flat_a.shape[1]), flat_a.to(dtype).t())
    if bias is not None:
        bias = torch.broadcast_to(bias, magnitude.shape).reshape(-1).to(dtype)
    if outputs is base:
        # outputs + (f−1)⊙(base − bias) = f⊙base − (f−1)⊙bias.
        if bias is None:
            combined = flat_base * factor
        else:
            combined = torch.addcmul((1.0 - factor) * bias, flat_base, factor)
    else:
        combined = torch.addcmul(outputs.reshape(-1, width), flat_base, factor - 1.0)
        if bias is not None:
            combined = combined - (factor - 1.0) * bias
    updated = torch.addmm(combined, low_rank, scaled_b, alpha=scaling)
    return updated.reshape(outputs.shape)
