"""Alternative ways to write keras-lora's low-rank path, for experiments.

Each class is a `LoRADense` / `LoRAEinsumDense` subclass that only
overrides `_lora_output`, so a benchmark can swap them in next to the
library's own classes and time them side by side in one process.
"""

import keras
from keras import ops

from keras_lora.layers import LoRADense
from keras_lora.layers import LoRAEinsumDense


def _flat(x):
    return ops.reshape(x, (-1, x.shape[-1]))


class FlatDense(LoRADense):
    """The low-rank path on a 2-D view of the input."""

    def _lora_output(self, inputs, lora_a, lora_b):
        low = ops.multiply(ops.matmul(_flat(inputs), lora_a), self.scaling)
        out = ops.matmul(low, lora_b)
        return ops.reshape(out, tuple(inputs.shape[:-1]) + (out.shape[-1],))


class SwappedExpandDense(LoRADense):
    """Expand as `(B^T low^T)^T`: the big cotangent becomes the LHS of dB."""

    def _lora_output(self, inputs, lora_a, lora_b):
        low = ops.multiply(ops.matmul(_flat(inputs), lora_a), self.scaling)
        out = ops.transpose(
            ops.matmul(ops.transpose(lora_b), ops.transpose(low))
        )
        return ops.reshape(out, tuple(inputs.shape[:-1]) + (out.shape[-1],))


def low_rank_product(x, lora_a, lora_b, scaling):
    """`scaling · (x·A)·B` for 2-D `x` with a hand-written gradient.

    The gradient is the textbook one, written so that every rank-r dot
    keeps the big (N × d) tensor as its left operand: dB is computed as
    `(g^T · low)^T`, so XLA transposes only the N × r tensor.
    """

    @ops.custom_gradient
    def product(x, lora_a, lora_b):
        low = ops.multiply(ops.matmul(x, lora_a), scaling)

        def grad(*args, upstream=None):
            g = args[0] if upstream is None else upstream
            g_low = ops.multiply(ops.matmul(g, ops.transpose(lora_b)), scaling)
            d_x = ops.matmul(g_low, ops.transpose(lora_a))
            d_a = ops.matmul(ops.transpose(x), g_low)
            d_b = ops.transpose(ops.matmul(ops.transpose(g), low))
            return d_x, d_a, d_b

        return ops.matmul(low, lora_b), grad

    return product(x, lora_a, lora_b)


class CustomGradDense(LoRADense):
    """The low-rank path with `low_rank_product`'s custom gradient."""

    def _lora_output(self, inputs, lora_a, lora_b):
        out = low_rank_product(_flat(inputs), lora_a, lora_b, self.scaling)
        return ops.reshape(out, tuple(inputs.shape[:-1]) + (out.shape[-1],))


def merged_forward(x, kernel, lora_a, lora_b, scaling):
    """`x·(W + s·A·B)` with a gradient that never forms `x^T g`.

    Forward: one GEMM with the kernel-sized `W + s·A·B` (d_in·d_out·r extra
    work). Backward: `dx = g·(W + sAB)^T` (one GEMM), `dA`, `dB` from the
    rank-r factors; the frozen kernel gets no gradient.
    """

    @ops.custom_gradient
    def product(x, lora_a, lora_b):
        effective = ops.add(
            kernel, ops.multiply(ops.matmul(lora_a, lora_b), scaling)
        )

        def grad(*args, upstream=None):
            g = args[0] if upstream is None else upstream
            g_low = ops.multiply(ops.matmul(g, ops.transpose(lora_b)), scaling)
            low = ops.multiply(ops.matmul(x, lora_a), scaling)
            d_x = ops.matmul(g, ops.transpose(effective))
            d_a = ops.matmul(ops.transpose(x), g_low)
            d_b = ops.transpose(ops.matmul(ops.transpose(g), low))
            return d_x, d_a, d_b

        return ops.matmul(x, effective), grad

    return product(x, lora_a, lora_b)


class MergedForwardDense(LoRADense):
    """Base and low-rank path in one GEMM with `merged_forward`."""

    def call(self, inputs, training=None):
        if not self.adapter_enabled or self.merged or (
            training and self.dropout > 0
        ):
            return super().call(inputs, training=training)
        kernel = ops.convert_to_tensor(self.base_layer.kernel)
        out = merged_forward(
            _flat(inputs),
            kernel,
            self._in_compute_dtype(self.lora_a, inputs),
            self._in_compute_dtype(self.lora_b, inputs),
            self.scaling,
        )
        out = ops.reshape(out, tuple(inputs.shape[:-1]) + (out.shape[-1],))
        if self.base_layer.bias is not None:
            out = ops.add(out, self.base_layer.bias)
        if self.base_layer.activation is not None:
            out = self.base_layer.activation(out)
        return out


DENSE_CLASSES = {
    "current": LoRADense,
    "flat": FlatDense,
    "swapped": SwappedExpandDense,
    "customgrad": CustomGradDense,
    "merged_fwd": MergedForwardDense,
}


def class_table(dense_class, einsum_class=LoRAEinsumDense):
    """A `layer -> LoRA class` function for `variants.build`."""

    def lora_class_for(layer):
        if isinstance(layer, keras.layers.EinsumDense):
            return einsum_class
        if isinstance(layer, keras.layers.Dense):
            return dense_class
        return None

    return lora_class_for


def _flat_plan(split, input_rank):
    """`(kept, contracted, free)` letter groups when the equation is a
    plain matmul on 2-D views, else `None`."""
    inputs, rest = split.project_equation.split(",")
    a_spec, low_spec = rest.split("->")
    contracted = a_spec[:-1]
    kept = low_spec[:-1]
    if inputs != kept + contracted:
        return None
    _, expand_rest = split.expand_equation.split(",")
    b_spec, output = expand_rest.split("->")
    if output != kept + b_spec[1:]:
        return None
    return kept, contracted, b_spec[1:]


class FlatEinsumDense(LoRAEinsumDense):
    """The low-rank path as 2-D matmuls when the equation allows it."""

    def _lora_output(self, inputs, lora_a, lora_b):
        plan = _flat_plan(self._split, len(inputs.shape))
        if plan is None:
            return super()._lora_output(inputs, lora_a, lora_b)
        kept, contracted, free = plan
        kept_shape = tuple(inputs.shape[: len(kept)])
        d_in = 1
        for n in lora_a.shape[:-1]:
            d_in *= n
        x2 = ops.reshape(inputs, (-1, d_in))
        a2 = ops.reshape(lora_a, (d_in, self.rank))
        b2 = ops.reshape(lora_b, (self.rank, -1))
        low = ops.multiply(ops.matmul(x2, a2), self.scaling)
        out = ops.matmul(low, b2)
        return ops.reshape(out, kept_shape + tuple(lora_b.shape[1:]))


EINSUM_CLASSES = {"current": LoRAEinsumDense, "flat": FlatEinsumDense}


def combo(name):
    """`"dense+einsum"` names, e.g. `"flat+flat"`; a bare name keeps the
    library's EinsumDense class."""
    dense, _, einsum = name.partition("+")
    return class_table(
        DENSE_CLASSES[dense], EINSUM_CLASSES[einsum or "current"]
    )
