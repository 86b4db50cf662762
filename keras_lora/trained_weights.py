"""The base values of the non-adapter weights that adapters train.

An adapter can carry more than `lora_a` / `lora_b`: the weights of layers
kept fully trainable (`apply_lora(trainable=["head"])`) and `train_bias`
biases. Loading another adapter that does not carry them must give that
adapter's model, i.e. the *base* values, not the previous task's. So the
first time keras-lora lets such a weight train (`apply_lora`) or overwrites
it (`load_adapter`), it keeps a host copy of its base value here, weakly
keyed by the model: the memory of those few layers, nothing for plain LoRA.
"""

import weakref

import numpy as np
from keras import ops

# model -> {id(variable): (variable, base value as a numpy array)}
_BASE_VALUES = weakref.WeakKeyDictionary()


def remember(model, variables):
    """Keeps the current value of each variable not remembered yet.

    Args:
        model: the model the variables belong to.
        variables: Keras variables about to train or be overwritten.
    """
    known = _BASE_VALUES.setdefault(model, {})
    for variable in variables:
        if id(variable) not in known:
            known[id(variable)] = (
                variable, np.array(ops.convert_to_numpy(variable.value))
            )


def remembered(model):
    """`{id(variable): (variable, base value)}` for `model` (a copy)."""
    return dict(_BASE_VALUES.get(model, {}))


def forget(model):
    """Drops what was remembered for `model` (its adapters are gone)."""
    _BASE_VALUES.pop(model, None)
