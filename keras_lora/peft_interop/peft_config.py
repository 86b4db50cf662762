"""Reading and checking a Hugging Face PEFT LoRA adapter directory.

A PEFT adapter is a directory holding `adapter_config.json` and
`adapter_model.safetensors`, whose keys are
`base_model.model.<module>.lora_A.weight` `(r, in)`, `...lora_B.weight`
`(out, r)` and, for DoRA, `...lora_magnitude_vector` `(out,)`. This module
imports neither Keras nor a backend (`keras-lora inspect` uses it).
"""

import dataclasses
import json
import os
import re

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
_SUFFIXES = {
    ".lora_A.weight": "lora_A",
    ".lora_B.weight": "lora_B",
    ".lora_magnitude_vector": "magnitude",
}

# Options keras-lora cannot reproduce: {option: test that it is unused}.
_UNSUPPORTED = {
    "bias": lambda v: v in (None, "none"),
    "lora_bias": lambda v: not v,
    "layers_to_transform": lambda v: v is None,
    "layers_pattern": lambda v: not v,
    "modules_to_save": lambda v: not v,
    "trainable_token_indices": lambda v: not v,
    "layer_replication": lambda v: not v,
    "target_parameters": lambda v: not v,
    "use_qalora": lambda v: not v,
    "alora_invocation_tokens": lambda v: not v,
    "megatron_config": lambda v: not v,
    "arrow_config": lambda v: not v,
}


@dataclasses.dataclass
class PeftAdapter:
    """A PEFT LoRA adapter as read from disk.

    Attributes:
        directory: the adapter directory.
        config: `adapter_config.json` as a dict.
        modules: `{module name (prefix removed): {"lora_A": array,
            "lora_B": array, "magnitude": array}}` (magnitude for DoRA).
    """

    directory: str
    config: dict
    modules: dict

    def alpha_for(self, module):
        """PEFT's alpha of `module` (`alpha_pattern`, else `lora_alpha`)."""
        pattern = _pattern_key(self.config.get("alpha_pattern") or {}, module)
        if pattern is not None:
            return float(self.config["alpha_pattern"][pattern])
        return float(self.config.get("lora_alpha", 8))

    def rank_for(self, module):
        """PEFT's configured rank of `module` (`rank_pattern`, else `r`)."""
        pattern = _pattern_key(self.config.get("rank_pattern") or {}, module)
        if pattern is not None:
            return int(self.config["rank_pattern"][pattern])
        return int(self.config.get("r", 8))


def _pattern_key(patterns, module):
    # PEFT's `get_pattern_key`: a key matches a module name ending with it.
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def adapter_directory(path):
    """The PEFT adapter directory `path` names, or `None` if it is not one.

    `path` may be the directory or its `adapter_model.safetensors` (with
    `adapter_config.json` beside it).

    Example:

    >>> adapter_directory("/tmp/not-there") is None
    True
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return path if os.path.isfile(os.path.join(path, CONFIG_FILE)) else None
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.basename(path) == WEIGHTS_FILE and os.path.isfile(
        os.path.join(directory, CONFIG_FILE)
    ):
        return directory
    return None


def read_config(directory):
    """Reads and checks `adapter_config.json`.

    Raises:
        ValueError: for a PEFT type other than LORA, or an option keras-lora
            cannot reproduce (named in the message).
    """
    with open(os.path.join(directory, CONFIG_FILE), encoding="utf-8") as file:
        config = json.load(file)
    where = os.path.join(directory, CONFIG_FILE)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(
            f"PEFT adapter '{where}': peft_type={peft_type!r}; keras-lora "
            "loads LORA adapters only."
        )
    for option, unused in _UNSUPPORTED.items():
        if not unused(config.get(option)):
            raise ValueError(
                f"PEFT adapter '{where}': option {option}="
                f"{config[option]!r} is not supported by keras-lora (only "
                f"the LoRA factors of linear layers are). Nothing was changed."
            )
    return config


def read_peft_adapter(path):
    """Reads a PEFT LoRA adapter directory (config and tensors).

    Args:
        path: the adapter directory, or its `adapter_model.safetensors`.

    Returns:
        A `PeftAdapter`.

    Raises:
        FileNotFoundError: if `path` is no PEFT adapter or lacks its
            safetensors file.
        ValueError: for an unsupported config or an unexpected tensor key.

    Example:

    >>> adapter = read_peft_adapter("my-peft-adapter")  # doctest: +SKIP
    """
    directory = adapter_directory(path)
    if directory is None:
        raise FileNotFoundError(
            f"'{path}' is not a PEFT adapter directory (no {CONFIG_FILE})."
        )
    config = read_config(directory)
    weights = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        raise FileNotFoundError(
            f"PEFT adapter '{directory}' has no {WEIGHTS_FILE} (older "
            "adapter_model.bin files are not read: re-save with "
            "safe_serialization=True)."
        )
    from safetensors.numpy import load_file

    modules = {}
    for key, value in load_file(weights).items():
        module, kind = _split_key(key, directory)
        modules.setdefault(module, {})[kind] = value.astype("float32")
    for module, tensors in modules.items():
        if "lora_A" not in tensors or "lora_B" not in tensors:
            raise ValueError(
                f"PEFT adapter '{directory}': module '{module}' lacks "
                "lora_A or lora_B."
            )
    return PeftAdapter(directory, config, modules)


def _split_key(key, directory):
    for suffix, kind in _SUFFIXES.items():
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            if module.startswith(KEY_PREFIX):
                module = module[len(KEY_PREFIX):]
            return module, kind
    raise ValueError(
        f"PEFT adapter '{directory}': tensor '{key}' is not a LoRA factor of "
        "a linear layer (lora_A / lora_B / lora_magnitude_vector); "
        "embedding, convolution and other PEFT tensors are not supported."
    )


def summary(path):
    """`{"path", "format", "config", "tensors": {key: shape}}` of a PEFT
    adapter directory (for `keras-lora inspect --json`)."""
    directory = adapter_directory(path)
    with open(os.path.join(directory, CONFIG_FILE), encoding="utf-8") as file:
        config = json.load(file)
    tensors = {}
    weights = os.path.join(directory, WEIGHTS_FILE)
    if os.path.isfile(weights):
        from safetensors import safe_open

        with safe_open(weights, framework="np") as file:
            tensors = {
                key: list(file.get_slice(key).get_shape())
                for key in sorted(file.keys())
            }
    return {"path": directory, "format": "peft", "config": config,
            "tensors": tensors}


def describe(path):
    """A few lines describing a PEFT adapter directory (for `inspect`)."""
    info = summary(path)
    config = info["config"]
    lines = [
        f"PEFT adapter {info['path']}",
        f"  peft_type: {config.get('peft_type')}  base model: "
        f"{config.get('base_model_name_or_path')}",
        f"  r: {config.get('r')}  lora_alpha: {config.get('lora_alpha')}  "
        f"use_rslora: {bool(config.get('use_rslora'))}  "
        f"use_dora: {bool(config.get('use_dora'))}",
        f"  target_modules: {config.get('target_modules')}",
    ]
    for option in ("rank_pattern", "alpha_pattern"):
        if config.get(option):
            lines.append(f"  {option}: {config[option]}")
    if not info["tensors"]:
        lines.append(f"  ({WEIGHTS_FILE} missing or empty)")
    count = sum(_product(shape) for shape in info["tensors"].values())
    lines.append(f"  tensors: {len(info['tensors'])}  parameters: {count}")
    for key, shape in info["tensors"].items():
        lines.append(f"    {key} {shape}")
    return "\n".join(lines)


def _product(shape):
    result = 1
    for size in shape:
        result *= size
    return result
