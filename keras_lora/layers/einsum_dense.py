"""LoRAEinsumDense: a frozen `keras.layers.EinsumDense` plus `A·B`.

The low-rank split follows the equation: `lora_a` spans the kernel's
contracted (input) axes, `lora_b` its free (output) axes, each group in the
order the axes have in the kernel.
"""

import dataclasses
import math

import keras
from keras import ops

from keras_lora.layers import quantized
from keras_lora.layers.base import LoRALayer
from keras_lora.layers.layer_args import base_from_arguments
from keras_lora.layers.kernels import add_low_rank_update

_RANK_LETTER_CHOICES = "zyxwvutsrqponmlkjihgfedcbaZYXWVUTSRQPONMLKJIHGFEDCBA"


@dataclasses.dataclass(frozen=True)
class EinsumSplit:
    """How an EinsumDense equation splits into `A` and `B`.

    Attributes:
        contracted_axes: kernel axis indices summed with the input, in
            kernel order (the axes of `lora_a`, after the rank).
        free_axes: kernel axis indices that reach the output, in kernel
            order (the axes of `lora_b`, after the rank).
        project_equation: einsum of `(inputs, lora_a)` to the rank space.
        expand_equation: einsum of `(low_rank, lora_b)` to the output.
        delta_equation: einsum of `(lora_a, lora_b)` to a kernel-shaped
            delta.
        matmul_view: whether the update is a plain matmul on 2-D views:
            the input ends with the contracted axes and the output with the
            free axes, each in kernel order, after the same leading axes
            (`"abc,cde->abde"`, Gemma's `"btd,ndh->btnh"`; not
            `"abc,dce->abde"`-style reorderings).
    """

    contracted_axes: tuple
    free_axes: tuple
    project_equation: str
    expand_equation: str
    delta_equation: str
    matmul_view: bool = False


def split_equation(equation):
    """Parses an EinsumDense equation into a LoRA split.

    Args:
        equation: an equation such as `"abc,cde->abde"`.

    Returns:
        An `EinsumSplit`.

    Raises:
        ValueError: if the equation has a kernel axis that is neither purely
            contracted nor purely free (for example one shared by the input
            and the output), which a single `A·B` cannot express.

    Example:

    >>> split = split_equation("btd,ndh->btnh")
    >>> split.contracted_axes, split.free_axes
    ((1,), (0, 2))
    >>> split.delta_equation
    'zd,znh->ndh'
    """
    try:
        operands, output = equation.replace(" ", "").split("->")
        inputs, kernel = operands.split(",")
    except ValueError:
        raise ValueError(
            "LoRAEinsumDense needs an equation of the form "
            f"'input,kernel->output'. Received: equation={equation!r}"
        ) from None
    if "." in kernel or len(set(kernel)) != len(kernel):
        raise ValueError(
            "LoRAEinsumDense cannot split a kernel with an ellipsis or a "
            f"repeated axis. Received: equation={equation!r}"
        )
    contracted, free = [], []
    for axis, letter in enumerate(kernel):
        in_input, in_output = letter in inputs, letter in output
        if in_input and not in_output:
            contracted.append(axis)
        elif in_output and not in_input:
            free.append(axis)
        else:
            raise ValueError(
                f"LoRAEinsumDense cannot express the kernel axis '{letter}' "
                "as part of a low-rank update: it is "
                + ("in both the input and the output" if in_input else
                   "in neither the input nor the output")
                + f". Received: equation={equation!r}"
            )
    if not contracted or not free:
        raise ValueError(
            "LoRAEinsumDense needs a kernel with at least one contracted and "
            f"one free axis. Received: equation={equation!r}"
        )
    rank_letter = next(c for c in _RANK_LETTER_CHOICES if c not in equation)
    a_spec = rank_letter + "".join(kernel[i] for i in contracted)
    b_spec = rank_letter + "".join(kernel[i] for i in free)
    kept = "".join(c for c in inputs if c not in a_spec)
    low_rank = kept + rank_letter
    return EinsumSplit(
        contracted_axes=tuple(contracted),
        free_axes=tuple(free),
        project_equation=f"{inputs},{a_spec}->{low_rank}",
        expand_equation=f"{low_rank},{b_spec}->{output}",
        delta_equation=f"{a_spec},{b_spec}->{kernel}",
        matmul_view=(
            inputs == kept + a_spec[1:] and output == kept + b_spec[1:]
        ),
    )


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRAEinsumDense(LoRALayer):
    """An `EinsumDense` layer whose kernel is frozen and updated by `A·B`.

    For a kernel with contracted axes `C` and free axes `F` (read from the
    equation), `lora_a` has shape `(rank,) + C` (rank-first, as PEFT stores
    `lora_A`) and `lora_b` has shape `(rank,) + F`, each group in kernel
    order; the kernel-shaped delta contracts the two over the rank, with
    its axes put back in kernel order. The forward
    pass contracts the input with `lora_a`, then expands with `lora_b`.

    Args:
        equation: as for `EinsumDense`; omit when passing `base_layer`.
        output_shape: as for `EinsumDense`; omit when passing `base_layer`.
        rank: positive int, the adapter rank.
        alpha: positive float, the LoRA alpha; defaults to `rank`.
        dropout: float in [0, 1), dropout on the LoRA path's input.
        use_rslora: scale by `alpha / sqrt(rank)` instead of `alpha / rank`.
        lora_a_initializer: initializer of `lora_a` (He-uniform).
        lora_b_initializer: initializer of `lora_b` (zeros).
        train_bias: keep the bias trainable.
        base_layer: an existing `EinsumDense` to adapt (see `from_layer`).
        **kwargs: any other `EinsumDense` argument (`bias_axes`,
            `activation`, ...) and `name` / `dtype`.

    Returns:
        The `EinsumDense` output, in the layer's compute dtype.

    Example:

    >>> layer = LoRAEinsumDense("abc,cde->abde", (3, 4, 8), rank=2)
    >>> y = layer(np.ones((2, 3, 32)))
    >>> tuple(layer.lora_a.shape), tuple(layer.lora_b.shape)
    ((2, 32), (2, 4, 8))
    """

    base_layer_class = keras.layers.EinsumDense
    supports_dora = True
    supports_quantized_base = True

    def __init__(
        self,
        equation=None,
        output_shape=None,
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
            keras.layers.EinsumDense,
            base_layer,
            (equation, output_shape),
            kwargs,
            "LoRAEinsumDense",
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
        self._split = split_equation(base_layer.equation)

    @property
    def equation(self):
        return self.base_layer.equation

    @classmethod
    def _check_base_layer(cls, layer):
        super()._check_base_layer(layer)
        split_equation(layer.equation)

    @classmethod
    def _check_dora(cls, base_layer, where=""):
        # DoRA's per-unit factor broadcasts over the output's trailing free
        # axes: true for equations that are a matmul on reshaped operands.
        if not split_equation(base_layer.equation).matmul_view:
            raise ValueError(
                f"{where}DoRA (use_dora=True) needs an EinsumDense equation "
                "whose free axes are the output's trailing axes (a matmul on "
                f"reshaped operands). Received: equation={base_layer.equation!r}"
            )

    @classmethod
    def _kernel_split(cls, base_layer):
        split = split_equation(base_layer.equation)
        shape = cls.kernel_shape(base_layer)
        return (
            tuple(shape[i] for i in split.contracted_axes),
            tuple(shape[i] for i in split.free_axes),
        )

    @classmethod
    def _kernel_axes(cls, base_layer):
        split = split_equation(base_layer.equation)
        return split.contracted_axes, split.free_axes

    def _base_preactivation(self, inputs):
        if self.base_layer.quantization_mode is not None:
            return quantized.preactivation(self.base_layer, inputs)
        outputs = ops.einsum(self.equation, inputs, self.base_layer.kernel)
        if self.base_layer.bias is not None:
            outputs = ops.add(outputs, self.base_layer.bias)
        return outputs

    def _fused_layout(self):
        split = self._split
        contracted = split.contracted_axes
        # A 2-D view of the kernel needs its contracted axes first, and a
        # bias one value per output unit.
        if not split.matmul_view or contracted != tuple(range(len(contracted))):
            return None
        shape = self.kernel_shape(self.base_layer)
        free_shape = tuple(shape[i] for i in split.free_axes)
        bias = self.base_layer.bias
        if bias is not None and tuple(bias.shape) != free_shape:
            return None
        matrix_shape = (
            math.prod(shape[: len(contracted)]), math.prod(free_shape)
        )
        return matrix_shape, len(contracted), free_shape

    def _add_lora_output(self, outputs, inputs, lora_a, lora_b, scaling):
        if self._split.matmul_view:
            return add_low_rank_update(
                outputs, inputs, lora_a, lora_b, scaling
            )
        low_rank = ops.einsum(self._split.project_equation, inputs, lora_a)
        low_rank = ops.multiply(low_rank, scaling)
        update = ops.einsum(self._split.expand_equation, low_rank, lora_b)
        return ops.add(outputs, update)

    def _delta_kernel(self, lora_a, lora_b):
        return ops.einsum(self._split.delta_equation, lora_a, lora_b)


