"""keras-lora: LoRA fine-tuning for Keras 3 on JAX, TensorFlow and PyTorch."""

from keras_lora.adapters import load_adapter
from keras_lora.adapters import read_adapter
from keras_lora.adapters import save_adapter
from keras_lora.distribution import extend_layout_map
from keras_lora.export import export_merged
from keras_lora.layers import LoRADense
from keras_lora.layers import LoRAEinsumDense
from keras_lora.layers import LoRALayer
from keras_lora.merge import disable_adapters
from keras_lora.merge import enable_adapters
from keras_lora.merge import merge_adapters
from keras_lora.merge import merge_lora
from keras_lora.merge import unmerge_adapters
from keras_lora.model_io import load_model
from keras_lora.model_io import save_model
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
    "disable_adapters",
    "enable_adapters",
    "export_merged",
    "extend_layout_map",
    "load_adapter",
    "load_model",
    "lora_layers",
    "merge_adapters",
    "merge_lora",
    "print_trainable_parameters",
    "read_adapter",
    "save_adapter",
    "save_model",
    "trainable_parameter_report",
    "unmerge_adapters",
]
