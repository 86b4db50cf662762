"""Small helpers of adapter creation: initializers and a null scope."""

import keras
import numpy as np
from keras import initializers
from keras import ops


class RankFirst:
    """Draws `lora_a` as a `contracted + (rank,)` kernel, stored rank-first.

    `lora_a` is stored `(rank,) + contracted` (PEFT's layout: autodiff then
    computes its gradient as the fast wide product, see
    `keras_lora/layers/kernels.py`), but initializers compute their fans
    from the kernel layout `contracted + (rank,)`, so `he_uniform` keeps
    drawing from `sqrt(6 / fan_in)` with `fan_in` the input size.
    """

    def __init__(self, initializer):
        self.initializer = initializers.get(initializer)

    def __call__(self, shape, dtype=None):
        kernel_layout = tuple(shape[1:]) + (shape[0],)
        value = self.initializer(kernel_layout, dtype=dtype)
        # A contiguous copy: on torch `moveaxis` is a strided view, and a
        # variable made from it would keep the rank-last memory layout
        # (and its slow gradient) under the rank-first shape.
        return np.ascontiguousarray(
            np.moveaxis(ops.convert_to_numpy(value), -1, 0)
        )


class Constant:
    """An initializer returning a fixed numpy array (DoRA's magnitude)."""

    def __init__(self, value):
        self.value = value

    def __call__(self, shape, dtype=None):
        return np.asarray(self.value, dtype or "float32").reshape(shape)


class NullScope:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def is_float(x):
    return "float" in keras.backend.standardize_dtype(x.dtype)
