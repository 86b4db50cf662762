"""keras-lora: LoRA fine-tuning for Keras 3 on JAX, TensorFlow and PyTorch.

The public names are imported on first use (PEP 562), so `import
keras_lora` and the `keras-lora inspect` command do not import Keras or a
backend until something needs them.
"""

import importlib
import importlib.util

__version__ = "0.1.0"

# {public name: module defining it}
_EXPORTS = {
    "LoRAConv1D": "keras_lora.layers",
    "LoRAConv2D": "keras_lora.layers",
    "LoRAConv3D": "keras_lora.layers",
    "LoRADense": "keras_lora.layers",
    "LoRAEinsumDense": "keras_lora.layers",
    "LoRAEmbedding": "keras_lora.layers",
    "LoRAReversibleEmbedding": "keras_lora.layers",
    "LoRALayer": "keras_lora.layers",
    "active_adapters": "keras_lora.multi",
    "add_adapter": "keras_lora.multi",
    "add_weighted_adapter": "keras_lora.weighted",
    "apply_lora": "keras_lora.surgery",
    "clone_with_lora": "keras_lora.clone",
    "disable_adapters": "keras_lora.merge",
    "enable_adapters": "keras_lora.merge",
    "export_merged": "keras_lora.export",
    "export_multi_adapter": "keras_lora.multi_export",
    "extend_layout_map": "keras_lora.distribution",
    "delete_adapter": "keras_lora.multi",
    "list_adapters": "keras_lora.multi",
    "load_adapter": "keras_lora.adapters",
    "load_model": "keras_lora.model_io",
    "lora_layers": "keras_lora.surgery",
    "loraplus_optimizer": "keras_lora.loraplus",
    "merge_adapters": "keras_lora.merge",
    "merge_lora": "keras_lora.merge",
    "mixed_batch_model": "keras_lora.mixed_batch",
    "print_trainable_parameters": "keras_lora.surgery",
    "read_adapter": "keras_lora.adapter_file",
    "save_adapter": "keras_lora.adapters",
    "save_model": "keras_lora.model_io",
    "set_adapter": "keras_lora.multi",
    "trainable_parameter_report": "keras_lora.surgery",
    "unmerge_adapters": "keras_lora.merge",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")  # a submodule
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


# Routes model.save / keras.saving.load_model / load_weights / quantize of LoRA
# models through keras-lora (keras_lora/keras_hooks.py); imports no backend.
importlib.import_module("keras_lora.keras_hooks").install()
