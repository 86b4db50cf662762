"""One adapted linear layer, `x·W + b + s · (x·Aᵀ)·B`, as one kernel.

`kernels.add_low_rank_update` adds the update to a base output computed
apart. Where a layer has one plain LoRA adapter applied to its own input
(no dropout active, no DoRA, a float base), the base product and the
update can be one unit instead, which saves passes over the activations
that no compiler fuses on these paths (measured in `benchmarks/FINDINGS.md`,
section 6):

- **torch**: a `torch.autograd.Function`. Its forward adds the bias in
  the base GEMM (`addmm`) and the update into that output in place; its
  backward computes the input gradient `g·Wᵀ + (s·g·Bᵀ)·A` as one GEMM
  plus one in-place `addmm_`, where autograd would write both terms and
  add them, and it skips every gradient no one asks for (the frozen `W`
  and bias).
- **JAX**: one `jax.jit` function for the base product, the bias and the
  update (`kernels.update_on_views`, shared with the separate kernels). Eager JAX (`jit_compile=False`) otherwise dispatches the base
  matmul, the bias add and the update one by one, and so does its
  backward; under an outer `jit` the function is inlined.
- **TensorFlow**: the base product on 2-D views with the bias as a
  `BiasAdd` (which grappler fuses into the MatMul), then
  `kernels.update_on_views`. A Keras model on TF runs as a
  graph; without XLA, each of the separate kernels' reshapes, einsums and
  broadcast adds is a kernel of its own (BERT all-linear step, no XLA:
  0.68 × full against 0.77 with the separate kernels). Under XLA the
  training step is the same within noise and `predict` faster (0.98-0.99 ×
  base against 1.07-1.14 with the separate kernels).

The products run on 2-D views: `x` `(N, d_in)`, `W` `(d_in, d_out)`,
`b` `(d_out,)` or `None`, `A` `(rank, d_in)`, `B` `(rank, d_out)`.
"""

import keras

from keras_lora.layers.kernels import update_on_views

_BACKEND = keras.backend.backend()
ENABLED = _BACKEND in ("torch", "jax", "tensorflow")
"""Whether `dense_with_update` has a fused path on this backend (not on
Keras's other backends, which keep the separate kernels)."""

if _BACKEND == "torch":
    import torch
elif _BACKEND == "jax":
    import jax
elif _BACKEND == "tensorflow":
    import tensorflow as tf


def dense_with_update(inputs, kernel, bias, lora_a, lora_b, scaling,
                      matrix_shape, batch_ndim, free_shape):
    """`x·W + b + scaling · (x·Aᵀ)·B`, or `None` where not fused.

    Every operand is cast to the inputs' dtype (the layer's compute dtype
    under a mixed policy) where it differs, as the separate kernels do.

    Args:
        inputs: tensor whose first `batch_ndim` axes are kept and whose
            other axes are contracted (viewed as `(N, d_in)`).
        kernel: the base kernel tensor, `(d_in, d_out)` or reshaped to it.
        bias: the bias tensor (`d_out` values), or `None`.
        lora_a: `(rank, *contracted)` tensor.
        lora_b: `(rank, *free)` tensor.
        scaling: a Python float.
        matrix_shape: `(d_in, d_out)` to reshape `kernel` to, or `None`
            when it is 2-D already.
        batch_ndim: the number of leading (kept) axes of `inputs`.
        free_shape: the output's trailing (free) axes, a tuple of ints
            whose product is `d_out`.

    Returns:
        The pre-activation, `inputs.shape[:batch_ndim] + free_shape`, or
        `None` when this backend or the inputs' dtype has no fused path
        (the caller then computes it apart).
    """
    if not ENABLED:
        return None
    if _BACKEND == "torch":
        if not inputs.is_floating_point():
            return None
        dtype = inputs.dtype
        kernel, lora_a, lora_b = (
            t if t.dtype == dtype else t.to(dtype)
            for t in (kernel, lora_a, lora_b)
        )
        if matrix_shape is not None:
            kernel = kernel.reshape(matrix_shape)
        if bias is not None:
            bias = (bias if bias.dtype == dtype else bias.to(dtype)).reshape(-1)
        rank = lora_a.shape[0]
        flat = inputs.reshape(-1, kernel.shape[0])
        outputs = _TorchDenseWithUpdate.apply(
            flat, kernel, bias, lora_a.reshape(rank, -1),
            lora_b.reshape(rank, -1), float(scaling),
        )
        return outputs.reshape(tuple(inputs.shape[:batch_ndim]) + free_shape)
    if _BACKEND == "tensorflow":
        if not inputs.dtype.is_floating:
            return None
        return _tf_dense_with_update(
            inputs, kernel, bias, lora_a, lora_b, float(scaling),
            matrix_shape, batch_ndim, tuple(free_shape),
        )
    if not jax.numpy.issubdtype(inputs.dtype, jax.numpy.floating):
        return None
    return _jax_dense_with_update(
        inputs, kernel, bias, lora_a, lora_b, float(scaling), matrix_shape,
        batch_ndim, tuple(free_shape),
    )


if _BACKEND == "jax":

    def _jax_body(inputs, kernel, bias, lora_a, lora_b, scaling, matrix_shape,
                  batch_ndim, free_shape):
        flat, outputs, lora_a, lora_b = _base_on_views(
            inputs, kernel, bias, lora_a, lora_b, matrix_shape,
            lambda t, dtype: t.astype(dtype), lambda t, shape: t.reshape(shape),
            lambda x, w: x @ w,
        )
        outputs = update_on_views(outputs, flat, lora_a, lora_b, scaling)
        return outputs.reshape(inputs.shape[:batch_ndim] + free_shape)

    _jax_dense_with_update = jax.jit(_jax_body, static_argnums=(5, 6, 7, 8))


if _BACKEND == "torch":

    class _TorchDenseWithUpdate(torch.autograd.Function):
        """`x·W + b + s·(x·Aᵀ)·B` on 2-D operands, with its own backward."""

        @staticmethod
        def forward(ctx, flat, kernel, bias, lora_a, lora_b, scaling):
            low_rank = torch.mm(flat, lora_a.t())
            if bias is None:
                outputs = torch.mm(flat, kernel)
            else:
                outputs = torch.addmm(bias, flat, kernel)
            outputs.addmm_(low_rank, lora_b, alpha=scaling)
            ctx.save_for_backward(flat, kernel, lora_a, lora_b, low_rank)
            ctx.scaling = scaling
            return outputs

        @staticmethod
        def backward(ctx, grad):
            flat, kernel, lora_a, lora_b, low_rank = ctx.saved_tensors
            scaling = ctx.scaling
            need_x, need_kernel, need_bias, need_a, need_b, _ = (
                ctx.needs_input_grad
            )
            grad_low = None
            if need_x or need_a:
                grad_low = torch.mm(grad, lora_b.t()).mul_(scaling)
            grad_x = grad_kernel = grad_bias = grad_a = grad_b = None
            if need_x:
                grad_x = torch.mm(grad, kernel.t())
                grad_x.addmm_(grad_low, lora_a)
            if need_kernel:
                grad_kernel = torch.mm(flat.t(), grad)
            if need_bias:
                grad_bias = grad.sum(0)
            if need_a:
                grad_a = torch.mm(grad_low.t(), flat)
            if need_b:
                grad_b = torch.mm(low_rank.t(), grad).mul_(scaling)
            return grad_x, grad_kernel, grad_bias, grad_a, grad_b, None


def _tf_dense_with_update(inputs, kernel, bias, lora_a, lora_b, scaling,
                          matrix_shape, batch_ndim, free_shape):
    # The bias as a BiasAdd, which grappler fuses into the MatMul.
    flat, outputs, lora_a, lora_b = _base_on_views(
        inputs, kernel, bias, lora_a, lora_b, matrix_shape, tf.cast,
        tf.reshape, tf.matmul, tf.nn.bias_add,
    )
    outputs = update_on_views(outputs, flat, lora_a, lora_b, scaling)
    leading = [
        d if d is not None else tf.shape(inputs)[i]
        for i, d in enumerate(inputs.shape[:batch_ndim])
    ]
    return tf.reshape(outputs, leading + list(free_shape))


def _base_on_views(inputs, kernel, bias, lora_a, lora_b, matrix_shape, cast,
                   reshape, matmul, add_bias=lambda x, b: x + b):
    """`(x as (N, d_in), x·W + b, A, B)` in the inputs' dtype, for the
    shared update (`kernels.update_on_views`), with this backend's ops."""
    dtype = inputs.dtype

    def as_input_dtype(t):
        return t if t.dtype == dtype else cast(t, dtype)

    kernel = as_input_dtype(kernel)
    if matrix_shape is not None:
        kernel = reshape(kernel, matrix_shape)
    flat = reshape(inputs, (-1, kernel.shape[0]))
    outputs = matmul(flat, kernel)
    if bias is not None:
        outputs = add_bias(outputs, reshape(as_input_dtype(bias), (-1,)))
    return flat, outputs, as_input_dtype(lora_a), as_input_dtype(lora_b)
