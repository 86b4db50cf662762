"""LoRADense: a frozen `keras.layers.Dense` plus a trainable `A·B`."""

import keras
from keras import ops

from keras_lora.layers import quantized
from keras_lora.layers.base import LoRALayer
from keras_lora.layers.layer_args import base_from_arguments
from keras_lora.layers.kernels import add_low_rank_update


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRADense(LoRALayer):
    """A `Dense` layer whose kernel is frozen and updated by `A·B`.

    Computes `activation(x·W + b + scaling · (dropout(x)·A)·B)` with
    `A` of shape `(d_in, rank)` and `B` of shape `(rank, d_out)`.
    `W + A·B` is never formed while training. `lora_a` stores `A`
    rank-first, as `(rank, d_in)` (PEFT's `lora_A.weight` layout), which
    makes its gradient cheaper; `lora_b` stores `B` as `(rank, d_out)`.

    Use it as a drop-in `Dense` (`LoRADense(units, rank=8, activation=...)`)
    or adopt an existing built layer with `LoRADense.from_layer(dense)`,
    which shares that layer's kernel and bias variables.

    Args:
        units: output size, as for `Dense`; omit when passing `base_layer`.
        rank: positive int, the adapter rank.
        alpha: positive float, the LoRA alpha; defaults to `rank`.
        dropout: float in [0, 1), dropout on the LoRA path's input.
        use_rslora: scale by `alpha / sqrt(rank)` instead of `alpha / rank`.
        lora_a_initializer: initializer of `lora_a` (He-uniform).
        lora_b_initializer: initializer of `lora_b` (zeros).
        train_bias: keep the bias trainable.
        base_layer: an existing `Dense` to adapt (see `from_layer`).
        **kwargs: any other `Dense` argument (`activation`, `use_bias`,
            `kernel_initializer`, ...) and `name` / `dtype`.

    Input shape:
        N-D tensor `(batch_size, ..., d_in)`.

    Returns:
        N-D tensor `(batch_size, ..., units)` in the layer's compute dtype.

    Example:

    >>> layer = LoRADense(4, rank=2, activation="relu")
    >>> y = layer(np.ones((3, 5)))
    >>> tuple(layer.lora_a.shape), tuple(layer.lora_b.shape)
    ((2, 5), (2, 4))
    """

    base_layer_class = keras.layers.Dense
    supports_dora = True
    supports_quantized_base = True

    def __init__(
        self,
        units=None,
        rank=8,
        alpha=None,
        dropout=0.0,
        use_rslora=False,
        lora_a_initializer="he_uniform",
        lora_b_initializer="zeros",
        train_bias=False,
        base_layer=None,
        **kwargs,
    ):
        base_layer, kwargs = base_from_arguments(
            keras.layers.Dense, base_layer, (units,), kwargs, "LoRADense"
        )
        super().__init__(
            base_layer,
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            use_rslora=use_rslora,
            lora_a_initializer=lora_a_initializer,
            lora_b_initializer=lora_b_initializer,
            train_bias=train_bias,
            **kwargs,
        )

    @property
    def units(self):
        return self.base_layer.units

    @classmethod
    def _kernel_split(cls, base_layer):
        d_in, d_out = cls.kernel_shape(base_layer)
        return (d_in,), (d_out,)

    def _base_preactivation(self, inputs):
        if self.base_layer.quantization_mode is not None:
            return quantized.preactivation(self.base_layer, inputs)
        outputs = ops.matmul(inputs, self.base_layer.kernel)
        if self.base_layer.bias is not None:
            outputs = ops.add(outputs, self.base_layer.bias)
        return outputs

    def _fused_layout(self):
        return None, 1, (self.base_layer.units,)

    def _add_lora_output(self, outputs, inputs, lora_a, lora_b, scaling):
        return add_low_rank_update(
            outputs, inputs, lora_a, lora_b, scaling
        )

    def _delta_kernel(self, lora_a, lora_b):
        return ops.matmul(ops.transpose(lora_a), lora_b)
