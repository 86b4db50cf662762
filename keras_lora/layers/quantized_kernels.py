"""Exact int8 x int8 contractions, faster than Keras's on CPU backends.

Keras's int8 layers contract their int8-quantized inputs with the int8
kernel as `ops.matmul` / `ops.einsum` on int8 operands, which gives int32.
On a CPU, TensorFlow's graph runtime computes that with an integer kernel
about 2x slower than its float32 matmul, and Keras's torch backend casts
both operands to int32 and runs torch's integer matmul (no BLAS), also
about 2x slower than float32 (`torch._int_mm`, which Keras uses on CUDA
only, is 5x faster than float32 on a VNNI CPU). The functions here compute
the same int32 values faster where a backend allows it:

- torch on CPU, matmul: `torch._int_mm` (int8 x int8 -> int32);
- TensorFlow on a CPU-only machine outside XLA (`jit_compile=False`; XLA's
  own int8 dot is faster than float32 there, and is kept), and torch
  einsum: a float32
  contraction of the int8 values, which is exact (every product is at most
  128·128 = 2**14 in magnitude, so any partial sum over at most 1024 terms
  stays within 2**24, where float32 holds every integer); a matmul
  contracting more than 1024 terms is split into chunks of 1024 summed in
  int32; an einsum contracting more falls back to Keras's own op.

Everything else (JAX, GPUs, where TF32 would round a float32 matmul) uses
Keras's own `ops.matmul` / `ops.einsum`. The results are bit-for-bit what
Keras's op gives, cast to the requested dtype.
"""

import math

import keras
from keras import ops

# The most int8 products whose float32 partial sums are all exact.
EXACT_FLOAT_TERMS = 2**24 // (128 * 128)

# Set to False to use Keras's own int8 ops everywhere (benchmarks, tests).
ENABLED = True

_TF_CPU_ONLY = None


def _tf_cpu_only():
    global _TF_CPU_ONLY
    if _TF_CPU_ONLY is None:
        import tensorflow as tf

        _TF_CPU_ONLY = not tf.config.list_logical_devices("GPU")
    return _TF_CPU_ONLY


def _tf_in_xla():
    # Under XLA (`jit_compile=True`) Keras's int8 dot is the faster one.
    import tensorflow as tf
    from tensorflow.python.ops import control_flow_util

    return control_flow_util.GraphOrParentsInXlaContext(
        tf.compat.v1.get_default_graph())


def _torch_cpu():
    from keras.src.backend.torch.core import get_device

    return get_device() == "cpu"


def fast_path_available():
    """Whether this backend and device have a faster exact int8 path."""
    return _path() is not None


def _path():
    """`"int_mm"`, `"float"` or `None` (Keras's op) for this backend."""
    if not ENABLED:
        return None
    backend = keras.backend.backend()
    if backend == "torch" and _torch_cpu():
        return "int_mm"
    if backend == "tensorflow" and _tf_cpu_only() and not _tf_in_xla():
        return "float"
    return None


def _from_exact_float(x, dtype):
    # `x` holds integers of magnitude <= 2**24 in float32: the same value
    # as the int32 result; cast through int32 unless float32 is asked for,
    # so that rounding to a narrower float matches `cast(int32, dtype)`.
    if keras.backend.standardize_dtype(dtype) == "float32":
        return x
    return ops.cast(ops.cast(x, "int32"), dtype)


def int8_matmul(inputs, kernel, dtype):
    """`cast(ops.matmul(inputs, kernel), dtype)` for int8 operands.

    Args:
        inputs: int8 tensor `(..., k)`.
        kernel: int8 tensor `(k, n)`.
        dtype: the dtype of the result.

    Returns:
        The int32 product cast to `dtype`, bit-for-bit as Keras's.
    """
    path = _path()
    if path == "int_mm":
        import torch

        k, n = kernel.shape
        flat = torch.reshape(inputs, (-1, k))
        # torch._int_mm needs more than 16 rows on some builds: pad.
        rows = flat.shape[0]
        if rows <= 16:
            flat = torch.nn.functional.pad(flat, (0, 0, 0, 17 - rows))
        out = torch._int_mm(flat.contiguous(), kernel.contiguous())[:rows]
        out = torch.reshape(out, tuple(inputs.shape[:-1]) + (n,))
        return ops.cast(out, dtype)
    if path == "float":
        k = int(kernel.shape[0])
        x = ops.cast(inputs, "float32")
        w = ops.cast(kernel, "float32")
        if k <= EXACT_FLOAT_TERMS:
            return _from_exact_float(ops.matmul(x, w), dtype)
        total = None
        for start in range(0, k, EXACT_FLOAT_TERMS):
            stop = min(start + EXACT_FLOAT_TERMS, k)
            part = ops.cast(ops.matmul(x[..., start:stop], w[start:stop]), "int32")
            total = part if total is None else ops.add(total, part)
        return ops.cast(total, dtype)
    return ops.cast(ops.matmul(inputs, kernel), dtype)


def _contracted_terms(equation, inputs_shape, kernel_shape):
    """How many products each output element sums, or `None` if unknown."""
    operands, output = equation.replace(" ", "").split("->")
    sizes = {}
    for labels, shape in zip(operands.split(","), (inputs_shape, kernel_shape)):
        for label, size in zip(labels, shape):
            if label not in output:
                if size is None:
                    return None
                sizes[label] = int(size)
    return math.prod(sizes.values())


def int8_einsum(equation, inputs, kernel, dtype):
    """`cast(ops.einsum(equation, inputs, kernel), dtype)` for int8 operands.

    Args:
        equation: a two-operand einsum equation (`EinsumDense`'s).
        inputs: int8 tensor.
        kernel: int8 tensor.
        dtype: the dtype of the result.

    Returns:
        The int32 contraction cast to `dtype`, bit-for-bit as Keras's.
    """
    terms = None
    if _path() is not None:
        terms = _contracted_terms(
            equation, tuple(inputs.shape), tuple(kernel.shape))
    if terms is not None and terms <= EXACT_FLOAT_TERMS:
        x = ops.einsum(
            equation, ops.cast(inputs, "float32"), ops.cast(kernel, "float32")
        )
        return _from_exact_float(x, dtype)
    return ops.cast(ops.einsum(equation, inputs, kernel), dtype)
