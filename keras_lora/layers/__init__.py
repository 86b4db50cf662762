"""LoRA layers and the table that maps a base layer type to its LoRA type."""

import keras

from keras_lora.layers.base import LoRALayer
from keras_lora.layers.conv import LoRAConv1D
from keras_lora.layers.conv import LoRAConv2D
from keras_lora.layers.conv import LoRAConv3D
from keras_lora.layers.dense import LoRADense
from keras_lora.layers.einsum_dense import LoRAEinsumDense
from keras_lora.layers.embedding import LoRAEmbedding
from keras_lora.layers.embedding import LoRAReversibleEmbedding
from keras_lora.layers.embedding import reversible_embedding_class

# keras-hub's ReversibleEmbedding subclasses Keras's (Keras >= 3.12); on an
# older Keras, keras-hub's own class, if keras-hub is installed.
_REVERSIBLE_ROWS = (
    ((reversible_embedding_class(), LoRAReversibleEmbedding),)
    if reversible_embedding_class() is not None else ()
)

# First match wins (a ReversibleEmbedding is an Embedding); a new layer
# type adds a row here, nothing else changes. Transposed, depthwise and
# separable convolutions are not `Conv1D/2D/3D` subclasses: no row matches
# them, and `apply_lora` names them as unsupported.
LORA_LAYER_FOR = (
    (keras.layers.EinsumDense, LoRAEinsumDense),
    (keras.layers.Dense, LoRADense),
    *_REVERSIBLE_ROWS,
    (keras.layers.Embedding, LoRAEmbedding),
    (keras.layers.Conv1D, LoRAConv1D),
    (keras.layers.Conv2D, LoRAConv2D),
    (keras.layers.Conv3D, LoRAConv3D),
)


# The types `apply_lora` adapts when no `targets` are given (and the
# "all-linear" preset): a CNN's convolutions or a table's embeddings are
# adapted only when targeted by name, type, glob or the "all" preset.
DEFAULT_TARGET_TYPES = (keras.layers.EinsumDense, keras.layers.Dense)


def is_default_target(layer):
    """Whether `apply_lora` adapts `layer` when no `targets` are given."""
    return isinstance(layer, DEFAULT_TARGET_TYPES) and lora_class_for(layer) is not None


def lora_class_for(layer):
    """Returns the LoRA class that adapts `layer`, or `None`."""
    for base_class, lora_class in LORA_LAYER_FOR:
        if isinstance(layer, base_class):
            return lora_class
    return None


def supported_types():
    """Names of the layer types keras-lora can adapt."""
    return [base.__name__ for base, _ in LORA_LAYER_FOR]
