"""Other ways to write keras-lora's low-rank path, for experiments.

Each class is a `LoRADense` / `LoRAEinsumDense` subclass that swaps the
low-rank path (and, for `RankLastDense`, the adapter layout), so a
benchmark can time it next to the library's own classes in one process.
`combo("rank_last+einsum")` is close to the layers before the changes
measured in FINDINGS sections 1-1c (commit f81009c); `combo("nd")` keeps
the rank-first `A` but drops the 2-D views, the JAX `jit` kernel and the
fused torch kernel from `LoRADense`.

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


class UnfusedDense(LoRADense):
    """The base product and the update as separate kernels (before
    FINDINGS section 6)."""

    def _fused_layout(self):
        return None


class UnfusedEinsumDense(LoRAEinsumDense):
    """`UnfusedDense` for `EinsumDense`."""

    def _fused_layout(self):
        return None


DENSE_CLASSES = {
    "current": LoRADense,
    "unfused": UnfusedDense,
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


class EinsumOnlyDense(LoRAEinsumDense):
    """The low-rank path as two einsums, even where the equation is a
    matmul on 2-D views (the layer before FINDINGS section 1c)."""

    def _add_lora_output(self, outputs, inputs, lora_a, lora_b):
        low = ops.einsum(self._split.project_equation, inputs, lora_a)
        low = ops.multiply(low, self.scaling)
        update = ops.einsum(self._split.expand_equation, low, lora_b)
        return ops.add(outputs, update)


EINSUM_CLASSES = {
    "current": LoRAEinsumDense,
    "einsum": EinsumOnlyDense,
    "unfused": UnfusedEinsumDense,
}


def combo(name):
    """`"dense+einsum"` names, e.g. `"nd+einsum"`; a bare name keeps the
    library's EinsumDense class."""
    dense, _, einsum = name.partition("+")
    return class_table(
        DENSE_CLASSES[dense], EINSUM_CLASSES[einsum or "current"]
    )
