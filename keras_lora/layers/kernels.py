"""The LoRA update `outputs + s · (x·Aᵀ)·B`, written for speed on each backend.

Used by `LoRADense` and by `LoRAEinsumDense` where its equation is a matmul
on reshaped operands where the base product is computed apart (several
adapters, DoRA, dropout, quantized bases, mixed batches; a single plain
adapter takes `fused_kernels.py` instead). Four measured choices live here
(see `benchmarks/FINDINGS.md`, sections 1 and 1b), and, with DoRA's fused
term in `dora_kernels.py` and `fused_kernels.py`, nothing else in
keras-lora depends on the backend for speed:

- `A` is stored rank-first (PEFT's layout), so autodiff computes `dA` as
  the wide `(r, N)·(N, d_in)` product. Stored `(d_in, r)`, `dA` is the tall
  `(d_in, N)·(N, r)` product, 6-9x slower on one CPU core under XLA and
  in torch (3.7 / 4.0 ms against 0.4 / 0.6 ms for N = d_in = 1024, r = 8).
- The rank-r products run on 2-D views `(N, d_in)` / `(N, d_out)`. On
  `(batch, seq, d)` tensors XLA lowers `dB` (a contraction over batch and
  sequence) with a transposed copy of the whole output cotangent, which
  cost more than the step's largest GEMM.
- On JAX the update is one `jax.jit` function, so the reshapes are free
  bitcasts and the update fuses even when the model runs eagerly
  (`jit_compile=False`), where each reshape would otherwise be a copy.
  Under an outer `jit` it is inlined.
- On torch, `torch.addmm` adds `s · low·B` to the base output in the GEMM
  itself: no separate multiply, no `(N, d_out)` temporary and add.
"""

import keras
from keras import ops

_BACKEND = keras.backend.backend()

if _BACKEND == "torch":
    import torch
elif _BACKEND == "jax":
    import jax


def add_low_rank_update(outputs, inputs, lora_a, lora_b, scaling):
    """Returns `outputs + scaling · (x · Aᵀ) · B` computed on 2-D views.

    `A` is `lora_a` viewed as `(rank, d_in)` and `B` is `lora_b` viewed as
    `(rank, d_out)`; `x` is `inputs` viewed as `(N, d_in)`, so the
    contracted axes must be the trailing axes of `inputs`, in `lora_a`'s
    order, and the free axes the trailing axes of `outputs`, in `lora_b`'s
    order (true for every `Dense`; `LoRAEinsumDense` checks its equation).

    Args:
        outputs: the base layer's pre-activation, `(..., *free)`.
        inputs: the (dropped-out) layer input, `(..., *contracted)`.
        lora_a: `(rank, *contracted)` tensor, in the inputs' dtype.
        lora_b: `(rank, *free)` tensor, in the inputs' dtype.
        scaling: a Python float.

    Returns:
        A tensor shaped and typed like `outputs`.
    """
    scaling = float(scaling)
    if _BACKEND == "torch":
        return _torch_update(outputs, inputs, lora_a, lora_b, scaling)
    if _BACKEND == "jax":
        return _jax_update(outputs, inputs, lora_a, lora_b, scaling)
    return update_on_views(outputs, inputs, lora_a, lora_b, scaling)


def update_on_views(outputs, inputs, lora_a, lora_b, scaling):
    """`add_low_rank_update` in `keras.ops` (traceable inside `jax.jit`)."""
    rank = lora_a.shape[0]
    lora_a = _as_matrix(lora_a, rank)
    lora_b = _as_matrix(lora_b, rank)
    flat = _as_rows(inputs, lora_a.shape[1])
    flat_outputs = _as_rows(outputs, lora_b.shape[1])
    # Scale the rank-r intermediate: the smallest tensor on the path.
    low_rank = ops.matmul(flat, ops.transpose(lora_a))
    update = ops.matmul(ops.multiply(low_rank, scaling), lora_b)
    updated = ops.add(flat_outputs, update)
    if len(outputs.shape) == 2:
        return updated
    return ops.reshape(updated, ops.shape(outputs))


def _as_matrix(x, rank):
    return x if len(x.shape) == 2 else ops.reshape(x, (rank, -1))


def _as_rows(x, width):
    return x if len(x.shape) == 2 else ops.reshape(x, (-1, width))


if _BACKEND == "jax":
    _jax_update = jax.jit(update_on_views, static_argnums=(4,))


def _torch_update(outputs, inputs, lora_a, lora_b, scaling):
    rank = lora_a.shape[0]
    lora_a = lora_a.reshape(rank, -1)
    lora_b = lora_b.reshape(rank, -1)
    flat = inputs.reshape(-1, lora_a.shape[1])
    low_rank = torch.mm(flat, lora_a.t())
    flat_outputs = outputs.reshape(-1, lora_b.shape[1])
    updated = torch.addmm(flat_outputs, low_rank, lora_b, alpha=scaling)
    return updated.reshape(outputs.shape)

