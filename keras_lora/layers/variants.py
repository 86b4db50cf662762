"""Variants: how one adapter's low-rank update enters its layer.

A LoRA layer holds named adapters; each adapter's `variant` (a strategy
object, one per kind of update) says which extra variables it owns, how
its update is added to the layer's output, what it changes in the merged
kernel and how a merge is undone. `LoRALayer.call`, `delta_kernel`,
`merge` and `unmerge`, and the mixed-batch router, only ask the variant:
adding a variant touches this file, not the layer.

Every variant's merged kernel has the form `W·(1 + c) + u` (`c` a per-unit
factor minus one, or `None`; `u` an additive update), so several adapters
of different variants merge and unmerge together exactly.
"""

import numpy as np
from keras import ops

from keras_lora.layers import dora


class LoRAVariant:
    """Plain LoRA: adds `scaling · (dropout(x)·A)·B`, factored."""

    name = "lora"
    fuses_with_base = True
    """Whether a layer may compute base and update as one kernel
    (`fused_kernels.dense_with_update`) when this is its only adapter."""

    def check(self, layer_class, base_layer, where=""):
        """Raises unless this variant can adapt `base_layer`."""

    def create_variables(self, layer, spec, lora_a, lora_b):
        """Creates the variant's own variables beside `lora_a` / `lora_b`.

        Returns:
            A dict of `Adapter` keyword arguments (`{}` for plain LoRA).
        """
        return {}

    def initial_variables(self, adapter):
        """`[(variable, what initialized it)]` to check for NaN / inf."""
        return []

    def add_output(self, layer, outputs, base, inputs, training, adapter):
        """`outputs` plus this adapter's term.

        Args:
            layer: the LoRA layer.
            outputs: what the layer has computed so far.
            base: the base pre-activation of `inputs`.
            inputs: the layer's inputs.
            training: the `training` flag of the call.
            adapter: the `Adapter`.
        """
        x, lora_a, lora_b = layer._factors_for(inputs, training, adapter)
        return layer._add_lora_output(outputs, x, lora_a, lora_b, adapter.scaling)

    def merge_record(self, layer, adapter):
        """What `unmerge_parts` needs once the kernel has changed (`None`)."""
        return None

    def kernel_delta(self, layer, adapter):
        """`W' − W`: what merging this adapter alone adds to the kernel."""
        return layer._scaled_delta_kernel(adapter)

    def unmerge_parts(self, layer, adapter, record):
        """`(c, u)` with the merged kernel `W·(1 + Σc) + Σu` (`c` or `None`)."""
        return None, layer._scaled_delta_kernel(adapter)

    def routed_factor(self, layer, adapter):
        """A per-output-unit factor on the base output and `B` in a mixed
        batch, or `None` (plain LoRA has none)."""
        return None


class DoRAVariant(LoRAVariant):
    """DoRA: a magnitude `m` per output unit, the norm from small products
    (see `keras_lora/layers/dora.py`)."""

    name = "dora"
    fuses_with_base = False

    def check(self, layer_class, base_layer, where=""):
        layer_class._check_dora(base_layer, where)

    def create_variables(self, layer, spec, lora_a, lora_b):
        from keras_lora.layers.initializers import Constant

        _, free = layer._kernel_split(layer.base_layer)
        squared = dora.kernel_norm_squared(layer)
        initial = np.sqrt(dora.kernel_norm_squared(
            layer, lora_a.value, lora_b.value, spec.scaling
        ))
        magnitude = layer.add_weight(
            name="lora_magnitude", shape=tuple(free),
            initializer=Constant(initial), dtype="float32", trainable=True,
            # Read in float32 under a mixed policy too: the DoRA kernels
            # compute the norm and factor in float32.
            autocast=False,
        )
        norm_sq = layer.add_weight(
            name="lora_kernel_norm_sq", shape=tuple(free),
            initializer=Constant(squared), dtype="float32",
            trainable=False, autocast=False,
        )
        return {"lora_magnitude": magnitude, "kernel_norm_sq": norm_sq}

    def initial_variables(self, adapter):
        return [(adapter.lora_magnitude, "‖W + s·A·B‖")]

    def add_output(self, layer, outputs, base, inputs, training, adapter):
        # With dropout active the base product is taken again on the
        # dropped-out input, as PEFT does.
        x = layer._lora_input(inputs, training, adapter.dropout)
        base_x = base if x is inputs else layer._base_preactivation(x)
        return dora.add_dora_output(layer, outputs, base_x, x, adapter)

    def merge_record(self, layer, adapter):
        # DoRA rescales W itself: keep its per-unit factor to undo it.
        return ops.convert_to_numpy(dora.merge_factor(layer, adapter))

    def kernel_delta(self, layer, adapter):
        return dora.merged_kernel_delta(layer, adapter)

    def unmerge_parts(self, layer, adapter, record):
        if record is None:
            raise ValueError(
                f"Layer '{layer.name}': DoRA adapter '{adapter.name}' was "
                "merged before this layer was built (a merged layer loaded "
                "from a config or file), so the per-unit factors that undo "
                "the merge are unknown; `unmerge()` cannot restore the base "
                "kernel. Nothing was changed."
            )
        factor = ops.convert_to_tensor(record)
        return (
            ops.subtract(factor, 1.0),
            ops.multiply(factor, layer._scaled_delta_kernel(adapter)),
        )

    def routed_factor(self, layer, adapter):
        lora_a = ops.convert_to_tensor(adapter.lora_a)
        lora_b = ops.convert_to_tensor(adapter.lora_b)
        return ops.divide(
            ops.convert_to_tensor(adapter.lora_magnitude),
            dora.weight_norm(layer, adapter, lora_a, lora_b),
        )


LORA = LoRAVariant()
DORA = DoRAVariant()


def of_spec(spec):
    """The variant of an `AdapterSpec` (its `use_dora` flag picks it)."""
    return DORA if spec.use_dora else LORA
