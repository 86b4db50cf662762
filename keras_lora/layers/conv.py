"""LoRA for `Conv1D`, `Conv2D` and `Conv3D`: an r-filter conv, then a 1×1.

For a kernel `(*kernel_size, in, out)` the contracted axes are the window
and the input channels, the free axis the output channels: `lora_a` is
`(rank, *kernel_size, in)` and `lora_b` is `(rank, out)`. The update runs
`lora_a` as a `rank`-filter convolution with the base's strides, padding,
dilation and data format (PEFT's conv `lora_A`), then mixes the `rank`
channels into `out` with `lora_b` (PEFT's 1×1 `lora_B`), so the
kernel-shaped update is formed only to merge.

Transposed, depthwise, separable and grouped (`groups > 1`) convolutions
are not supported: their kernels do not split into these two factors the
same way. They are refused with a `TypeError` (or a `ValueError` for
`groups`).
"""

import keras
from keras import ops

from keras_lora.layers.base import LoRALayer

# Keras convolution types with a kernel that is not `(*window, in, out)`
# contracted over `(*window, in)`; named in the refusal.
_UNSUPPORTED = (
    "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
    "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D",
    "SeparableConv2D",
)


class LoRAConv(LoRALayer):
    """Shared by `LoRAConv1D`, `LoRAConv2D` and `LoRAConv3D`.

    Computes `activation(conv(x, W) + b + s · conv(x, A) · B)`, the second
    conv having `rank` filters and the base's strides, padding and
    dilation. Adopt a built layer with `from_layer` or let `apply_lora` do
    it (convolutions are adapted only when targeted: by name, type, glob or
    the `"all"` preset).

    Args:
        base_layer: a built convolution of `base_layer_class`.
        rank: positive int, the adapter rank.
        alpha: positive float, the LoRA alpha; defaults to `rank`.
        dropout: float in [0, 1), dropout on the LoRA path's input.
        use_rslora: scale by `alpha / sqrt(rank)` instead of `alpha / rank`.
        lora_a_initializer: initializer of `lora_a` (He-uniform, with the
            window and input channels as fan-in).
        lora_b_initializer: initializer of `lora_b` (zeros).
        train_bias: keep the bias trainable.
        **kwargs: `name` / `dtype` and the other `LoRALayer` arguments.

    Returns:
        The convolution's output, in the layer's compute dtype.
    """

    @classmethod
    def _check_base_layer(cls, layer):
        name = type(layer).__name__
        if any(base.__name__ in _UNSUPPORTED for base in type(layer).__mro__):
            raise TypeError(
                f"{cls.__name__}: keras-lora does not support {name} layers "
                "(transposed, depthwise and separable convolutions have no "
                "LoRA split). Received: layer "
                f"'{getattr(layer, 'name', layer)}' of type {name}"
            )
        super()._check_base_layer(layer)
        if layer.groups != 1:
            raise ValueError(
                f"{cls.__name__}: grouped convolutions are not supported. "
                f"Received: layer '{layer.name}' with groups={layer.groups}"
            )

    @classmethod
    def _kernel_split(cls, base_layer):
        shape = tuple(base_layer.kernel.shape)
        return shape[:-1], shape[-1:]

    def _convolve(self, inputs, kernel):
        base = self.base_layer
        padding = base.padding
        if padding == "causal":
            # Conv1D's causal padding, as its own `call` applies it.
            inputs = ops.pad(inputs, base._compute_causal_padding())
            padding = "valid"
        return ops.conv(
            inputs,
            kernel,
            strides=list(base.strides),
            padding=padding,
            dilation_rate=base.dilation_rate,
            data_format=base.data_format,
        )

    def _channels_last(self):
        return self.base_layer.data_format == "channels_last"

    def _base_preactivation(self, inputs):
        base = self.base_layer
        outputs = self._convolve(inputs, base.kernel)
        if base.use_bias:
            spatial = (1,) * len(base.kernel_size)
            shape = ((1,) + spatial + (base.filters,) if self._channels_last()
                     else (1, base.filters) + spatial)
            outputs = ops.add(outputs, ops.reshape(base.bias, shape))
        return outputs

    def _add_lora_output(self, outputs, inputs, lora_a, lora_b, scaling):
        # `lora_a` as a (*window, in, rank) kernel: a rank-sized copy.
        low_rank = self._convolve(inputs, ops.moveaxis(lora_a, 0, -1))
        low_rank = ops.multiply(low_rank, scaling)
        if self._channels_last():
            return ops.add(outputs, ops.matmul(low_rank, lora_b))
        update = ops.matmul(ops.moveaxis(low_rank, 1, -1), lora_b)
        return ops.add(outputs, ops.moveaxis(update, -1, 1))

    def _delta_kernel(self, lora_a, lora_b):
        return ops.tensordot(lora_a, lora_b, axes=[[0], [0]])


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRAConv1D(LoRAConv):
    """A `Conv1D` whose kernel is frozen and updated by `A·B` (see
    `LoRAConv`): `lora_a` `(rank, width, in)`, `lora_b` `(rank, out)`.

    Example:

    >>> conv = keras.layers.Conv1D(4, 3)
    >>> conv.build((None, 8, 2))
    >>> layer = LoRAConv1D.from_layer(conv, rank=2)
    >>> tuple(layer.lora_a.shape), tuple(layer.lora_b.shape)
    ((2, 3, 2), (2, 4))
    """

    base_layer_class = keras.layers.Conv1D


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRAConv2D(LoRAConv):
    """A `Conv2D` whose kernel is frozen and updated by `A·B` (see
    `LoRAConv`): `lora_a` `(rank, kh, kw, in)`, `lora_b` `(rank, out)`.

    Example:

    >>> conv = keras.layers.Conv2D(4, 3)
    >>> conv.build((None, 8, 8, 2))
    >>> layer = LoRAConv2D.from_layer(conv, rank=2)
    >>> tuple(layer.lora_a.shape), tuple(layer.lora_b.shape)
    ((2, 3, 3, 2), (2, 4))
    """

    base_layer_class = keras.layers.Conv2D


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRAConv3D(LoRAConv):
    """A `Conv3D` whose kernel is frozen and updated by `A·B` (see
    `LoRAConv`): `lora_a` `(rank, kd, kh, kw, in)`, `lora_b` `(rank, out)`.

    Example:

    >>> conv = keras.layers.Conv3D(4, 2)
    >>> conv.build((None, 4, 4, 4, 2))
    >>> layer = LoRAConv3D.from_layer(conv, rank=2)
    >>> tuple(layer.lora_a.shape), tuple(layer.lora_b.shape)
    ((2, 2, 2, 2, 2), (2, 4))
    """

    base_layer_class = keras.layers.Conv3D
