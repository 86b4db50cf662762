"""All-or-nothing model changes: record every swap, flag and value, undo on error.

Every mutation keras-lora makes (`apply_lora`, `load_adapter`, merges) is
planned and validated first. Some failures can only show while changing the
model (an initializer that fails on the tenth layer, a file that turns out
not to fit the layers it would create), so the changes themselves run inside
a `Transaction`: it snapshots every layer's and variable's `trainable` flag
when it starts, and records each layer swap and each variable assignment as
it happens. If the block raises, the swaps are reversed, the old values put
back and the flags restored, and the error propagates: the model is as it
was, whatever step failed.
"""

import numpy as np
from keras import ops

from keras_lora import layer_swap
from keras_lora import model_walk


class Transaction:
    """A context manager that undoes its recorded changes if its block raises.

    Args:
        model: the model being changed.

    Example:

    >>> with Transaction(model) as change:  # doctest: +SKIP
    ...     change.swap(parent, dense, lora_dense)
    ...     change.assign(lora_dense.lora_b, values)
    """

    def __init__(self, model):
        self.model = model
        self._swaps = []
        self._assigned = []
        self._layer_flags = []
        self._variable_flags = []
        self._outer = None

    def __enter__(self):
        # A transaction opened inside another one on the same model (e.g.
        # `load_adapter` calling `add_adapter`) records into the outer one,
        # which alone undoes everything if anything fails.
        for open_transaction in reversed(_OPEN):
            if open_transaction.model is self.model:
                self._outer = open_transaction
                break
        _OPEN.append(self)
        if self._outer is not None:
            return self
        self._layer_flags.append((self.model, self.model.trainable))
        for entry in model_walk.walk(self.model).values():
            self._layer_flags.append((entry.layer, entry.layer.trainable))
        for variable in _unique(self.model.weights):
            self._variable_flags.append((variable, variable.trainable))
        return self

    def swap(self, parent, old, new):
        """Makes `parent` use `new` wherever it used `old` (undone on error)."""
        if self._outer is not None:
            return self._outer.swap(parent, old, new)
        layer_swap.replace_layer(parent, old, new)
        self._swaps.append((parent, old, new))

    def assign(self, variable, value):
        """Assigns `value` to `variable`, keeping the old value for undo."""
        if self._outer is not None:
            return self._outer.assign(variable, value)
        self._assigned.append(
            (variable, np.array(ops.convert_to_numpy(variable.value)))
        )
        variable.assign(value)

    def __exit__(self, error_type, error, traceback):
        _OPEN.remove(self)
        if error_type is None or self._outer is not None:
            return False
        for variable, old in reversed(self._assigned):
            variable.assign(old)
        for parent, old, new in reversed(self._swaps):
            layer_swap.replace_layer(parent, new, old)
        # Parents first (the walk is depth first): a parent's setter cascades
        # to its children, whose own flags are then put back.
        for layer, flag in self._layer_flags:
            layer.trainable = flag
        for variable, flag in self._variable_flags:
            variable.trainable = flag
        return False


# The transactions open now, innermost last.
_OPEN = []


def _unique(variables):
    seen, result = set(), []
    for variable in variables:
        if id(variable) not in seen:
            seen.add(id(variable))
            result.append(variable)
    return result
