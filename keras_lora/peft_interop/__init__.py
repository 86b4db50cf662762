"""Hugging Face PEFT interop: PEFT LoRA adapters in and out of keras-hub models.

`keras_lora.load_adapter(model, path)` loads a PEFT adapter directory
(detected by its `adapter_config.json`) and `keras_lora.save_adapter(model,
path, format="peft")` writes one; see docs/huggingface_interop.md. The
mapping between keras-hub layers and Hugging Face modules is recorded from
keras-hub's own checkpoint converters (`hf_mapping`).
"""
