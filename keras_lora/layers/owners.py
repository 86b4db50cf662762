"""Which models each LoRA layer sits in, to reset their traced functions."""

import weakref

# The models each LoRA layer was adapted in (weakly held): switching one
# layer's adapter must reset their traced functions.
_OWNER_MODELS = weakref.WeakKeyDictionary()


def register_owner(layer, model):
    """Records that `layer` sits in `model` (see `disable_adapter`)."""
    _OWNER_MODELS.setdefault(layer, weakref.WeakSet()).add(model)


def _reset_owner_functions(layer):
    from keras_lora.hub import reset_compiled_functions

    for model in list(_OWNER_MODELS.get(layer, ())):
        reset_compiled_functions(model)
