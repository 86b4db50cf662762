"""The LoRA update of a Dense layer, written for speed on each backend.

`add_dense_update(outputs, x, A, B, s)` returns `outputs + s · (x·Aᵀ)·B`
with `A` stored as `(rank, d_in)`. Three measured choices live here (see
`benchmarks/FINDINGS.md`), and nothing else in keras-lora depends on the
backend for speed:

- `A` is stored rank-first (PEFT's layout), so autodiff computes `dA` as
  the wide `(r, N)·(N, d_in)` product. Stored `(d_in, r)`, `dA` is the tall
  `(d_in, N)·(N, r)` product, which XLA's CPU dot emits 12x slower
  (3.5 ms against 0.25 ms for N = d_in = 1024, r = 8, one core).
- On `(batch, seq, d)` inputs the rank-r products run on a 2-D view. On
  3-D tensors XLA lowers `dB` (a contraction over batch and sequence) with
  a transposed copy of the whole output cotangent, which cost more than
  the step's largest GEMM. Reshaping is free under a trace and on torch,
  but a copy in eager JAX, so eager JAX keeps the N-D form.
- On torch, `torch.addmm` adds `s · low·B` to the base output in the GEMM
  itself: no separate multiply, no `(N, d_out)` temporary and add.
"""

import keras
from keras import ops

_BACKEND = keras.backend.backend()

if _BACKEND == "torch":
    import torch
elif _BACKEND == "jax":
    try:
        # Concrete means eager, even inside `jax.grad`; not under `jit`.
        from jax._src.core import is_concrete as _jax_is_concrete
    except ImportError:  # pragma: no cover - a JAX without it
        _jax_is_concrete = None


def add_dense_update(outputs, inputs, lora_a, lora_b, scaling):
    """Returns `outputs + scaling · (inputs · lora_aᵀ) · lora_b`.

    Args:
        outputs: the base layer's pre-activation, `(..., d_out)`.
        inputs: the (dropped-out) layer input, `(..., d_in)`.
        lora_a: `(rank, d_in)` tensor, in the inputs' dtype.
        lora_b: `(rank, d_out)` tensor, in the inputs' dtype.
        scaling: a Python float.

    Returns:
        A tensor shaped and typed like `outputs`.
    """
    if _BACKEND == "torch":
        return _torch_update(outputs, inputs, lora_a, lora_b, scaling)
    if len(inputs.shape) > 2 and not _is_eager_jax(inputs):
        flat = ops.reshape(inputs, (-1, inputs.shape[-1]))
        update = _update_2d(flat, lora_a, lora_b, scaling)
        return ops.add(outputs, ops.reshape(update, ops.shape(outputs)))
    return ops.add(outputs, _update_2d(inputs, lora_a, lora_b, scaling))


def _update_2d(inputs, lora_a, lora_b, scaling):
    # Scale the rank-r intermediate: the smallest tensor on the path.
    low_rank = ops.matmul(inputs, ops.transpose(lora_a))
    return ops.matmul(ops.multiply(low_rank, scaling), lora_b)


def _torch_update(outputs, inputs, lora_a, lora_b, scaling):
    flat = inputs.reshape(-1, inputs.shape[-1])
    low_rank = torch.mm(flat, lora_a.t())
    flat_outputs = outputs.reshape(-1, outputs.shape[-1])
    updated = torch.addmm(flat_outputs, low_rank, lora_b, alpha=scaling)
    return updated.reshape(outputs.shape)


def _is_eager_jax(x):
    if _BACKEND != "jax":
        return False
    if _jax_is_concrete is None:  # pragma: no cover
        import jax

        return not isinstance(x, jax.core.Tracer)
    return _jax_is_concrete(x)
