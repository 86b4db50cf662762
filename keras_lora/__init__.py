"""keras-lora: LoRA fine-tuning for Keras 3 on JAX, TensorFlow and PyTorch."""

from keras_lora.layers import LoRADense
from keras_lora.layers import LoRAEinsumDense
from keras_lora.layers import LoRALayer
from keras_lora.surgery import apply_lora
from keras_lora.surgery import lora_layers
from keras_lora.surgery import print_trainable_parameters
from keras_lora.surgery import trainable_parameter_report

__version__ = "0.1.0"

__all__ = [
    "LoRADense",
    "LoRAEinsumDense",
    "LoRALayer",
    "apply_lora",
    "lora_layers",
    "print_trainable_parameters",
    "trainable_parameter_report",
]
