"""keras-lora: LoRA fine-tuning for Keras 3 on JAX, TensorFlow and PyTorch."""

from keras_lora.layers import LoRADense
from keras_lora.layers import LoRAEinsumDense
from keras_lora.layers import LoRALayer

__version__ = "0.1.0"

__all__ = [
    "LoRADense",
    "LoRAEinsumDense",
    "LoRALayer",
]
