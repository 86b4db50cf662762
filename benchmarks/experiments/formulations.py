"""Other ways to write keras-lora's low-rank path, for experiments.

Each class is a `LoRADense` / `LoRAEinsumDense` subclass that swaps the
low-rank path (and, for `RankLastDense`, the adapter layout), so a
benchmark can time it next to the library's own classes in one process.
`combo("rank_last")` is the layer as it was before the changes measured in
FINDINGS section 1 (commit f81009c); `combo("nd")` keeps the rank-first
`A` but drops the 2-D view and the fused torch kernel.

The hand-written-gradient and merged-forward variants that FINDINGS
section 4 mentions lived here at commit f81009c; they were written for the
rank-last layout and were removed with it.
"""

import keras
from keras import ops

from keras_lora.layers import LoRADense
from keras_lora.layers import LoRAEinsumDense


class NDDense(LoRADense):
    """Rank-first `A`, products on the N-D input, generic ops only."""

    def _add_lora_output(self, outputs, inputs, lora_a, lora_b):
        low = ops.matmul(inputs, ops.transpose(lora_a))
        update = ops.matmul(ops.multiply(low, self.scaling), lora_b)
        return ops.add(outputs, update)


class RankLastDense(LoRADense):
    """The layer before FINDINGS section 1: `A` stored `(d_in, rank)`,
    products on the N-D input."""

    def _create_adapters(self):
        contracted, free = self._kernel_split(self.base_layer)
        self.lora_a = self.add_weight(
            name="lora_a",
            shape=tuple(contracted) + (self.rank,),
            initializer=self.lora_a_initializer,
            dtype="float32",
        )
        self.lora_b = self.add_weight(
            name="lora_b",
            shape=(self.rank,) + tuple(free),
            initializer=self.lora_b_initializer,
            dtype="float32",
        )

    def _add_lora_output(self, outputs, inputs, lora_a, lora_b):
        low = ops.multiply(ops.matmul(inputs, lora_a), self.scaling)
        return ops.add(outputs, ops.matmul(low, lora_b))

    def _delta_kernel(self, lora_a, lora_b):
        return ops.matmul(lora_a, lora_b)


DENSE_CLASSES = {
    "current": LoRADense,
    "nd": NDDense,
    "rank_last": RankLastDense,
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


def _flat_plan(split):
    """`(kept, contracted, free)` letter groups when the equation is a
    plain matmul on 2-D views, else `None`."""
    inputs, rest = split.project_equation.split(",")
    a_spec, low_spec = rest.split("->")
    contracted = a_spec[1:]  # lora_a is rank-first
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

    def _add_lora_output(self, outputs, inputs, lora_a, lora_b):
        plan = _flat_plan(self._split)
        if plan is None:
            return super()._add_lora_output(outputs, inputs, lora_a, lora_b)
        kept, _, _ = plan
        kept_shape = tuple(inputs.shape[: len(kept)])
        d_in = 1
        for n in lora_a.shape[1:]:
            d_in *= n
        x2 = ops.reshape(inputs, (-1, d_in))
        a2 = ops.reshape(lora_a, (self.rank, d_in))
        b2 = ops.reshape(lora_b, (self.rank, -1))
        low = ops.multiply(ops.matmul(x2, ops.transpose(a2)), self.scaling)
        out = ops.matmul(low, b2)
        out = ops.reshape(out, kept_shape + tuple(lora_b.shape[1:]))
        return ops.add(outputs, out)


EINSUM_CLASSES = {"current": LoRAEinsumDense, "flat": FlatEinsumDense}


def combo(name):
    """`"dense+einsum"` names, e.g. `"current+flat"`; a bare name keeps the
    library's EinsumDense class."""
    dense, _, einsum = name.partition("+")
    return class_table(
        DENSE_CLASSES[dense], EINSUM_CLASSES[einsum or "current"]
    )
