"""`clone_with_lora`: an adapted copy of a model; the original stays as it was."""

import keras
from keras.src.models.functional import Functional

from keras_lora import model_copy
from keras_lora import surgery


def clone_with_lora(model, **apply_lora_arguments):
    """Returns a new model: a copy of `model` with LoRA applied to the copy.

    `apply_lora` adapts a model in place (the right default for large
    models: no weight is copied). `clone_with_lora` instead rebuilds a
    functional or `Sequential` model (keras-hub's functional subclasses
    included, whose class is kept: a `CausalLM` still generates) from its
    config, gives the copy its own copies of every weight and asset, and
    adapts the copy. The original keeps its layers, weights, trainable flags
    and compile state, and stays usable and trainable whatever is done to
    the clone (training, `merge_lora(clone, in_place=True)`, ...). Layer
    names are the original's, so an adapter saved from the clone loads onto
    the original base. Memory: one extra copy of the weights.

    The arguments are validated on the original before anything is copied.
    If the original was compiled, the clone is compiled with the same
    settings (a fresh optimizer).

    Args:
        model: a built functional or `Sequential` Keras model without LoRA
            layers.
        **apply_lora_arguments: any `apply_lora` argument (`rank`,
            `alpha`, `targets`, `trainable`, ...).

    Returns:
        The adapted copy.

    Raises:
        TypeError: for a subclassed model (its layers are made by its own
            code, not by a config Keras can rewrite): use `apply_lora`.
        ValueError: as `apply_lora` does, before anything is copied.

    Example:

    >>> base = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> clone = clone_with_lora(base, rank=2)
    >>> [type(layer).__name__ for layer in clone.layers]
    ['LoRADense']
    >>> [type(layer).__name__ for layer in base.layers]
    ['Dense']
    """
    surgery.check_model(model)
    if not isinstance(model, (Functional, keras.Sequential)):
        raise TypeError(
            f"clone_with_lora copies functional and Sequential models; model "
            f"'{model.name}' is a subclassed {type(model).__name__}, whose "
            "layers its own code creates. Use `keras_lora.apply_lora(model, "
            "...)` to adapt it in place (build a second instance first if "
            f"the original must stay as it is). Received: model={model.name!r}"
        )
    # Everything apply_lora would refuse is refused here, on the original.
    surgery.plan_lora(model, **apply_lora_arguments)
    clone = model_copy.rebuild(model, who="clone_with_lora")
    if not clone.built:
        clone.build_from_config(model.get_build_config())
    model_copy.copy_state(model, clone)
    surgery.compile_like(clone, model)
    return surgery.apply_lora(clone, **apply_lora_arguments)
