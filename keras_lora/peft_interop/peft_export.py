"""Writes a keras-hub model's adapter as a Hugging Face PEFT LoRA adapter.

The inverse of `peft_import`: each adapted Keras kernel is found among the
weights keras-hub's converter declares (`hf_mapping`) and its factors are
re-indexed into `lora_A.weight` `(r, in)` and `lora_B.weight` `(out, r)`.
The Keras kernels of one fused Hugging Face weight (GPT-2's `c_attn`: q, k,
v) become one PEFT adapter of the summed rank, exactly: their `lora_a`
stacked as `lora_A`, their `lora_b` placed block-diagonally in `lora_B`
(each block on that kernel's output rows). PEFT scales a module by one
`alpha / r`; a module's alpha is chosen to give the first part's scaling,
and any other part's scaling ratio is folded into its block of `lora_B`.
"""

import collections
import json
import math
import os

import numpy as np
from keras import ops

from keras_lora import adapter_matching as matching
from keras_lora import multi
from keras_lora.atomic_files import write_atomically
from keras_lora.peft_interop import hf_mapping
from keras_lora.peft_interop.peft_config import CONFIG_FILE
from keras_lora.peft_interop.peft_config import KEY_PREFIX
from keras_lora.peft_interop.peft_config import WEIGHTS_FILE
from keras_lora.peft_interop.peft_import import checkpoint_config


def save_peft_adapter(model, path, adapter_name, base_model=None):
    """Writes `adapter_name` of `model` as a PEFT adapter directory.

    Args:
        model: an adapted keras-hub backbone or task model.
        path: the directory to write (created if missing).
        adapter_name: the adapter to write.
        base_model: the Hugging Face checkpoint directory the model was
            converted from, or a hub name: written as
            `base_model_name_or_path`; a local directory also gives the
            exact module names (e.g. GPT-2's `transformer.` prefix) and
            the config. Without it, names are those keras-hub's converter
            states (`model.layers.N...` for Llama-like causal LMs).

    Returns:
        The absolute path of the directory.

    Raises:
        ValueError: if a LoRA layer has no one-to-one Hugging Face weight,
            the adapter carries other trained weights, or it cannot be
            expressed as PEFT LoRA; nothing is written then.
    """
    where = "save_adapter(format='peft')"
    views = matching.views_of(multi._lora_layers(model, "save_adapter"), adapter_name)
    extras, trainable_layers = matching.trained_extras(model, views)
    if extras or trainable_layers:
        raise ValueError(
            f"{where}: the model trains weights besides the LoRA factors "
            f"({sorted(extras)[:3] or trainable_layers[:3]}); a PEFT LoRA "
            "adapter has no place for them. Save those separately (or pass "
            "the adapted backbone)."
        )
    _, maps, refused = hf_mapping.kernel_maps(model, checkpoint_config(base_model))
    place = {
        id(kernel_map.layer): kernel_map
        for kernel_maps in maps.values() for kernel_map in kernel_maps
    }
    by_module = collections.defaultdict(list)
    for layer_path, view in views.items():
        kernel_map = place.get(id(view.base_layer))
        if kernel_map is None:
            raise ValueError(
                f"{where}: LoRA layer '{layer_path}' ({type(view.base_layer).__name__})"
                " fills no Hugging Face linear weight in keras-hub's converter"
                f"{' (' + next(iter(refused.values())) + ')' if refused else ''}"
                "; PEFT cannot hold it. Nothing was written."
            )
        if view.adapter.initial_factors is not None:
            raise ValueError(
                f"{where}: layer '{layer_path}' was initialized with "
                f"init={view.adapter.init!r} (the base kernel changed); "
                "save it in keras-lora's format or merge it instead."
            )
        by_module[kernel_map.module].append((layer_path, view, kernel_map))
    names = _hf_names(by_module, base_model)
    tensors, modules = {}, {}
    for module, parts in by_module.items():
        if parts[0][1].use_dora and len(parts) != len(maps[module]):
            raise ValueError(
                f"{where}: DoRA on '{parts[0][0]}' adapts only part of the "
                f"fused Hugging Face weight '{module}'; PEFT's DoRA needs the "
                "whole weight adapted. Adapt all its parts."
            )
        factors, modules[names[module]] = _module_factors(parts, where)
        for kind, value in factors.items():
            tensors[f"{KEY_PREFIX}{names[module]}.{kind}"] = value
    config = _peft_config(modules, names, maps, base_model, views)
    os.makedirs(path, exist_ok=True)
    from safetensors.numpy import save

    write_atomically(
        save(tensors, metadata={"format": "pt"}),
        os.path.abspath(os.path.join(path, WEIGHTS_FILE)),
    )
    write_atomically(
        json.dumps(config, indent=2, sort_keys=True).encode("utf-8"),
        os.path.abspath(os.path.join(path, CONFIG_FILE)),
    )
    return os.path.abspath(path)


def _module_factors(parts, where):
    """`lora_A`, `lora_B` (and magnitude) of one Hugging Face module."""
    first = parts[0][2]
    use_rslora = parts[0][1].use_rslora
    scaling = parts[0][1].scaling
    blocks = []
    for layer_path, view, kernel_map in parts:
        a = _numpy(view.lora_a).reshape(view.rank, -1)
        b = _numpy(view.lora_b).reshape(view.rank, -1)
        for value, name in ((a, "lora_a"), (b, "lora_b")):
            if not np.all(np.isfinite(value)):
                raise ValueError(
                    f"{where}: layer '{layer_path}': {name} holds NaN or "
                    "infinite values; refusing to save it."
                )
        a_hf = np.zeros((view.rank, first.in_features), "float64")
        a_hf[:, kernel_map.in_index.ravel()] = a
        blocks.append((a_hf, b.T * (view.scaling / scaling), view, kernel_map))
    # Parts sharing one lora_A (an imported PEFT adapter) keep PEFT's rank;
    # otherwise the lora_As stack and lora_B is block-diagonal.
    shared = all(
        block[0].shape == blocks[0][0].shape
        and np.array_equal(block[0], blocks[0][0]) for block in blocks
    )
    rank = blocks[0][0].shape[0] if shared else sum(b[0].shape[0] for b in blocks)
    alpha = scaling * (math.sqrt(rank) if use_rslora else rank)
    lora_a = np.zeros((rank, first.in_features), "float64")
    lora_b = np.zeros((first.out_features, rank), "float64")
    magnitude = np.zeros((first.out_features,), "float64")
    column = 0
    for a_hf, b_hf, view, kernel_map in blocks:
        width = a_hf.shape[0]
        lora_a[column:column + width] = a_hf
        lora_b[kernel_map.out_index.ravel(), column:column + width] = b_hf
        if view.use_dora:
            magnitude[kernel_map.out_index.ravel()] = _numpy(
                view.lora_magnitude
            ).ravel()
        if not shared:
            column += width
    factors = {"lora_A.weight": lora_a, "lora_B.weight": lora_b}
    if parts[0][1].use_dora:
        factors["lora_magnitude_vector"] = magnitude
    factors = {k: np.ascontiguousarray(v, "float32") for k, v in factors.items()}
    return factors, {
        "rank": rank, "alpha": alpha, "use_rslora": use_rslora,
        "use_dora": parts[0][1].use_dora, "conv1d": first.conv1d,
        "dropout": parts[0][1].dropout,
    }


def _numpy(variable):
    return np.asarray(ops.convert_to_numpy(variable.value), "float64")


def _hf_names(by_module, base_model):
    """The module names of the checkpoint (its own prefix), else the
    converter's."""
    keys = _checkpoint_keys(base_model)
    names = {}
    for module in by_module:
        weight = module + ".weight"
        name = module
        if keys and weight not in keys:
            longer = [k for k in keys if k.endswith("." + weight)]
            shorter = [k for k in keys if weight.endswith("." + k)]
            if longer or shorter:
                name = (longer or shorter)[0][: -len(".weight")]
        names[module] = name
    return names


def _checkpoint_keys(base_model):
    if not base_model or not os.path.isdir(base_model):
        return set()
    index = os.path.join(base_model, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as file:
            return set(json.load(file)["weight_map"])
    single = os.path.join(base_model, "model.safetensors")
    if not os.path.isfile(single):
        return set()
    from safetensors import safe_open

    with safe_open(single, framework="np") as file:
        return set(file.keys())


def _peft_config(modules, names, maps, base_model, views):
    """`adapter_config.json`: the common r / alpha, patterns for the rest."""
    ranks = collections.Counter(m["rank"] for m in modules.values())
    alphas = collections.Counter(m["alpha"] for m in modules.values())
    rank, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    rslora = {m["use_rslora"] for m in modules.values()}
    dora = {m["use_dora"] for m in modules.values()}
    if len(dora) > 1:
        raise ValueError(
            "save_adapter(format='peft'): DoRA is on for some layers and off "
            "for others; a PEFT adapter has one use_dora."
        )
    use_rslora = rslora.pop() if len(rslora) == 1 else False
    rank_pattern, alpha_pattern = {}, {}
    for name, module in modules.items():
        if module["rank"] != rank:
            rank_pattern[name] = module["rank"]
        module_alpha = module["alpha"]
        if module["use_rslora"] != use_rslora:
            # Keep this module's scaling under the file's rsLoRA setting.
            scaling = module_alpha / (
                math.sqrt(module["rank"]) if module["use_rslora"] else module["rank"]
            )
            module_alpha = scaling * (
                math.sqrt(module["rank"]) if use_rslora else module["rank"]
            )
        if module_alpha != alpha:
            alpha_pattern[name] = module_alpha
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": int(rank),
        "lora_alpha": float(alpha),
        "use_rslora": bool(use_rslora),
        "use_dora": dora.pop(),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": _target_modules(set(modules), names, maps),
        "lora_dropout": float(next(iter(modules.values()))["dropout"]),
        "fan_in_fan_out": all(m["conv1d"] for m in modules.values()),
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _target_modules(adapted, names, maps):
    """Short names (`"q_proj"`) when each selects exactly the adapted
    modules, else the full module names."""
    every = {names.get(module, module) for module in maps}
    short = {name.rsplit(".", 1)[-1] for name in adapted}
    selected = {name for name in every if name.rsplit(".", 1)[-1] in short}
    if selected == adapted:
        return sorted(short)
    return sorted(adapted)
