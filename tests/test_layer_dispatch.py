"""The table that maps a base layer type to the LoRA type that adapts it."""

import keras

from keras_lora import LoRADense
from keras_lora import LoRAEinsumDense
from keras_lora.layers import lora_class_for
from keras_lora.layers import supported_types


def test_dense_is_adapted_by_lora_dense():
    assert lora_class_for(keras.layers.Dense(2)) is LoRADense


def test_einsum_dense_is_adapted_by_lora_einsum_dense():
    layer = keras.layers.EinsumDense("ab,bc->ac", (2,))
    assert lora_class_for(layer) is LoRAEinsumDense


def test_a_dense_subclass_is_adapted_by_lora_dense():
    class ScaledDense(keras.layers.Dense):
        pass

    assert lora_class_for(ScaledDense(2)) is LoRADense


def test_unsupported_layers_get_none():
    assert lora_class_for(keras.layers.Conv2DTranspose(2, 3)) is None
    assert lora_class_for(keras.layers.DepthwiseConv2D(3)) is None
    assert lora_class_for(keras.layers.LSTM(2)) is None


def test_a_lora_layer_is_not_adapted_again():
    assert lora_class_for(LoRADense(2, rank=1)) is None


def test_supported_types_names_the_base_classes():
    assert supported_types() == [
        "EinsumDense", "Dense", "ReversibleEmbedding", "Embedding",
        "Conv1D", "Conv2D", "Conv3D",
    ]
