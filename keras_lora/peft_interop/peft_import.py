"""Loads a Hugging Face PEFT LoRA adapter into a keras-hub model.

Each PEFT module (`model.layers.0.self_attn.q_proj`) is found among the
weights keras-hub's converter declares for the model (`hf_mapping`), LoRA
is applied to the Keras layers those weights fill, with PEFT's rank, alpha,
rsLoRA and DoRA settings, and the factors are re-indexed: Keras `lora_a`
`(rank, contracted axes)` takes `lora_A.weight` `(r, in)`'s columns through
the kernel's input index map, `lora_b` `(rank, free axes)` takes
`lora_B.weight` `(out, r)`'s rows through its output index map. A fused
weight (GPT-2's `c_attn`) gives each of its Keras kernels the same `lora_A`
and that kernel's rows of `lora_B`, which is exact. Both sides then scale by
the same `alpha / r` (or `alpha / sqrt(r)`).
"""

import json
import os

import numpy as np

from keras_lora import multi
from keras_lora import surgery
from keras_lora.adapter_matching import views_of
from keras_lora.layers.adapter import DEFAULT_ADAPTER
from keras_lora.layers.adapter import validate_adapter_name
from keras_lora.peft_interop import hf_mapping
from keras_lora.peft_interop.peft_config import read_peft_adapter
from keras_lora.transaction import Transaction


def checkpoint_config(base_model):
    """The `config.json` of a local Hugging Face checkpoint, else `None`."""
    if base_model and os.path.isfile(os.path.join(base_model, "config.json")):
        with open(os.path.join(base_model, "config.json"), encoding="utf-8") as f:
            return json.load(f)
    return None


def resolve_modules(names, maps, refused, where):
    """`{given name: converter's module name}`, with one prefix rule.

    PEFT names are relative to the wrapped Hugging Face model (`XModel`,
    `XForCausalLM`, ...), so they may carry a prefix the converter's names
    lack (`transformer.`, `bert.`) or lack one they have (`model.`).
    """
    known = set(maps) | set(refused)
    resolved = {}
    for name in names:
        match = None
        if name in known:
            match = name
        else:
            for module in known:
                if name.endswith("." + module) or module.endswith("." + name):
                    match = module
                    break
        if match is None:
            raise ValueError(
                f"{where}: the adapter's module '{name}' is not a weight of "
                "this model (is the adapter for another architecture?). The "
                f"model's modules look like {sorted(known)[:3]}. Nothing was "
                "changed."
            )
        if match in refused:
            raise ValueError(
                f"{where}: module '{name}' cannot be mapped exactly: "
                f"{refused[match]}. Nothing was changed."
            )
        resolved[name] = match
    if len(set(resolved.values())) != len(resolved):
        raise ValueError(f"{where}: two adapter modules map to one weight.")
    return resolved


def load_peft_adapter(model, path, adapter_name=None):
    """Loads a PEFT LoRA adapter directory into a keras-hub model.

    Args:
        model: a keras-hub backbone or task model converted from the
            adapter's Hugging Face architecture; without LoRA layers, or
            adapted (then `adapter_name` must be a new name).
        path: the adapter directory or its `adapter_model.safetensors`.
        adapter_name: the name of the new adapter (`"default"` if `None`).

    Returns:
        `model`, adapted.

    Raises:
        FileNotFoundError: if `path` is not a PEFT adapter.
        ValueError: for another architecture, unknown modules, shape
            mismatches or unsupported PEFT options; the model is unchanged.

    Example:

    >>> load_peft_adapter(backbone, "my-peft-adapter")  # doctest: +SKIP
    """
    surgery.check_model(model)
    adapter = read_peft_adapter(path)
    where = f"load_adapter('{adapter.directory}')"
    names = multi.list_adapters(model)
    if names and (adapter_name is None or adapter_name in names):
        raise ValueError(
            f"{where}: model '{model.name}' already has adapters {names}; "
            "pass a new adapter_name= to add the PEFT adapter beside them "
            "(or load it into the base model). Nothing was changed."
        )
    adapter_name = adapter_name or DEFAULT_ADAPTER
    validate_adapter_name(adapter_name, "load_adapter: ")
    config = adapter.config
    _, maps, refused = hf_mapping.kernel_maps(
        model, checkpoint_config(config.get("base_model_name_or_path"))
    )
    resolved = resolve_modules(adapter.modules, maps, refused, where)
    use_dora = bool(config.get("use_dora"))
    factors = {}
    for name, module in resolved.items():
        tensors = adapter.modules[name]
        rank = _check_shapes(name, tensors, maps[module], use_dora, where)
        alpha = adapter.alpha_for(name)
        for kernel_map in maps[module]:
            factors[id(kernel_map.layer)] = (
                kernel_map.layer, rank, alpha,
                _keras_factors(tensors, kernel_map, use_dora),
            )
    targets = [lambda p, layer, ids=frozenset(factors): _base_id(layer) in ids]
    ranks = {_exactly(k): v[1] for k, v in factors.items()}
    alphas = {_exactly(k): v[2] for k, v in factors.items()}
    first = next(iter(factors.values()))
    arguments = dict(
        rank=first[1], alpha=first[2], targets=targets,
        rank_pattern=ranks, alpha_pattern=alphas,
        use_rslora=bool(config.get("use_rslora")), use_dora=use_dora,
        dropout=float(config.get("lora_dropout") or 0.0),
    )
    with Transaction(model) as change:
        if names:
            multi.add_adapter(model, adapter_name, **arguments)
        else:
            plan = surgery.plan_lora(model, adapter_name=adapter_name, **arguments)
            surgery.execute_plan(plan, change)
        views = views_of(surgery.lora_layers(model), adapter_name)
        for view in views.values():
            entry = factors.get(id(view.base_layer))
            if entry is None:
                raise ValueError(f"{where}: an unexpected layer was adapted.")
            values = entry[3]
            change.assign(view.lora_a, values["lora_a"])
            change.assign(view.lora_b, values["lora_b"])
            if use_dora:
                change.assign(view.lora_magnitude, values["magnitude"])
        if len(views) != len(factors):
            raise ValueError(f"{where}: not every mapped layer was adapted.")
    if not names:
        surgery.recompile(model)
    return model


def _base_id(layer):
    return id(getattr(layer, "base_layer", layer))


def _exactly(layer_id):
    return lambda path, layer: _base_id(layer) == layer_id


def _check_shapes(name, tensors, kernel_maps, use_dora, where):
    lora_a, lora_b = tensors["lora_A"], tensors["lora_B"]
    first = kernel_maps[0]
    rank = lora_a.shape[0]
    expected = {
        "lora_A.weight": (lora_a.shape, (rank, first.in_features)),
        "lora_B.weight": (lora_b.shape, (first.out_features, rank)),
    }
    if use_dora:
        magnitude = tensors.get("magnitude")
        if magnitude is None:
            raise ValueError(
                f"{where}: use_dora is set but '{name}' has no "
                "lora_magnitude_vector. Nothing was changed."
            )
        expected["lora_magnitude_vector"] = (
            magnitude.shape, (first.out_features,)
        )
    for key, (shape, wanted) in expected.items():
        if tuple(shape) != tuple(wanted):
            raise ValueError(
                f"{where}: '{name}.{key}' has shape {tuple(shape)}, but the "
                f"model's weight needs {tuple(wanted)}. Nothing was changed."
            )
    return rank


def _keras_factors(tensors, kernel_map, use_dora):
    """PEFT's tensors re-indexed into one Keras kernel's factor shapes."""
    values = {
        "lora_a": tensors["lora_A"][:, kernel_map.in_index],
        "lora_b": tensors["lora_B"].T[:, kernel_map.out_index],
    }
    if use_dora:
        values["magnitude"] = tensors["magnitude"][kernel_map.out_index]
    return {k: np.ascontiguousarray(v, "float32") for k, v in values.items()}

