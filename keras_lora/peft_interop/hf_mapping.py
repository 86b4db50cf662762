"""Which Hugging Face weight each keras-hub kernel is, read from keras-hub.

keras-hub's converters (`keras_hub/src/utils/transformers/convert_*.py`)
state, per architecture, which Hugging Face tensor fills which Keras
variable and how (`loader.port_weight(keras_variable=..., hf_weight_key=...,
hook_fn=...)`). This module runs a converter's `convert_weights` with a
loader that only records those declarations, then turns each kernel's
`hook_fn` into index maps by feeding it the indices of the Hugging Face
weight (float64 `arange`): the Keras kernel then holds, at every position,
the Hugging Face element it came from. A kernel maps to LoRA factors when
its contracted axes depend only on the Hugging Face input index and its
free axes only on the output index; a fused Hugging Face weight (GPT-2's
`c_attn`) appears as several kernels, each selecting some output rows.
"""

import ast
import dataclasses
import inspect
import textwrap

import keras
import numpy as np

from keras_lora import model_walk
from keras_lora.layers.einsum_dense import split_equation


@dataclasses.dataclass(frozen=True)
class KernelMap:
    """How one Keras kernel sits in one Hugging Face weight.

    Attributes:
        module: the Hugging Face module name as the converter states it
            (`"model.layers.0.self_attn.q_proj"`).
        layer: the Keras `Dense` / `EinsumDense` layer owning the kernel.
        in_features, out_features: the Hugging Face module's sizes.
        conv1d: whether the Hugging Face weight is stored `(in, out)`
            (GPT-2's `Conv1D`) rather than `(out, in)` (`nn.Linear`).
        in_index: integer array in the kernel's contracted-axes shape: the
            Hugging Face input feature at each contracted position.
        out_index: integer array in the kernel's free-axes shape: the
            Hugging Face output feature at each free position.
    """

    module: str
    layer: object
    in_features: int
    out_features: int
    conv1d: bool
    in_index: np.ndarray
    out_index: np.ndarray


class _RecordingLoader:
    """Stands in for keras-hub's `SafetensorLoader`: records, loads nothing."""

    def __init__(self):
        self.declarations = []

    def port_weight(self, keras_variable, hf_weight_key, hook_fn=None):
        self.declarations.append((keras_variable, hf_weight_key, hook_fn))

    def get_tensor(self, hf_weight_key):
        raise KeyError(hf_weight_key)


class _ProbeConfig(dict):
    """A Hugging Face config whose unknown keys read as distinct probes."""

    def __missing__(self, key):
        probe = _Probe(10_000_019 + 7 * len(self))
        probe.key = key
        self[key] = probe
        return probe


class _Probe(int):
    key = None


def converters_by_model_type():
    """`{model_type: converter module}` as keras-hub's loader dispatches.

    Read from `TransformersPresetLoader.__init__`'s `if model_type == ...:
    self.converter = convert_x` chain, so new architectures come along.
    """
    from keras_hub.src.utils.transformers import preset_loader

    source = textwrap.dedent(
        inspect.getsource(preset_loader.TransformersPresetLoader.__init__)
    )
    table = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
            continue
        assigned = [
            statement.value.id for statement in node.body
            if isinstance(statement, ast.Assign)
            and isinstance(statement.value, ast.Name)
        ]
        comparator = node.test.comparators[0]
        if isinstance(comparator, ast.Constant):
            types = [comparator.value]
        elif isinstance(comparator, (ast.Tuple, ast.List)):
            types = [c.value for c in comparator.elts if isinstance(c, ast.Constant)]
        else:
            continue
        if assigned and hasattr(preset_loader, assigned[0]):
            for model_type in types:
                table[model_type] = getattr(preset_loader, assigned[0])
    return table


def find_backbone(model):
    """The keras-hub `Backbone` of `model` (itself, `.backbone`, or the
    only one inside it)."""
    import keras_hub

    if isinstance(model, keras_hub.models.Backbone):
        return model
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, keras_hub.models.Backbone):
        return backbone
    found = [
        entry.layer for entry in model_walk.walk(model).values()
        if isinstance(entry.layer, keras_hub.models.Backbone)
    ]
    if len(found) != 1:
        raise ValueError(
            f"PEFT interop: model '{model.name}' is not a keras-hub model "
            f"converted from Hugging Face (it holds {len(found)} keras-hub "
            "backbones; exactly one is needed)."
        )
    return found[0]


def candidate_model_types(backbone):
    """The Hugging Face `model_type`s whose converter builds this backbone."""
    exact, related = [], []
    for model_type, converter in converters_by_model_type().items():
        cls = getattr(converter, "backbone_cls", None)
        if cls is type(backbone):
            exact.append(model_type)
        elif cls is not None and isinstance(backbone, cls):
            related.append(model_type)
    return exact or related


def hf_config_of(backbone, converter, model_type):
    """A Hugging Face config for `backbone`, recovered by running the
    converter's `convert_backbone_config` on probes and reading which
    backbone argument each probe became."""
    probes = _ProbeConfig(model_type=model_type)
    convert = converter.convert_backbone_config
    try:
        if len(inspect.signature(convert).parameters) != 1:
            keras_config = convert(probes, type(backbone))
        else:
            keras_config = convert(probes)
    except Exception:  # noqa: BLE001 - then only model_type is known
        return {"model_type": model_type}
    backbone_config = backbone.get_config()
    recovered = {"model_type": model_type}
    for name, value in keras_config.items():
        if isinstance(value, _Probe) and name in backbone_config:
            recovered[value.key] = backbone_config[name]
    return recovered


def record_declarations(backbone, hf_config=None):
    """Runs the backbone's converter with a recording loader.

    Args:
        backbone: a keras-hub backbone.
        hf_config: the checkpoint's `config.json` as a dict, or `None` to
            recover the fields from the backbone's config.

    Returns:
        `(model_type, [(keras_variable, hf_weight_key, hook_fn), ...])`.

    Raises:
        ValueError: if keras-hub has no converter for this backbone class,
            or the converter cannot run without the real checkpoint.
    """
    table = converters_by_model_type()
    types = candidate_model_types(backbone)
    if hf_config is not None and hf_config.get("model_type") in types:
        types = [hf_config["model_type"]]
    else:
        hf_config = None  # a checkpoint of another architecture
    if not types:
        raise ValueError(
            f"PEFT interop: keras-hub has no Hugging Face converter for "
            f"{type(backbone).__name__}, so its layers cannot be mapped to "
            "Hugging Face module names."
        )
    failures = []
    for model_type in types:
        converter = table[model_type]
        config = hf_config or hf_config_of(backbone, converter, model_type)
        loader = _RecordingLoader()
        try:
            converter.convert_weights(backbone, loader, config)
        except Exception as error:  # noqa: BLE001 - reported below
            failures.append(f"{model_type}: {type(error).__name__}: {error}")
            continue
        return model_type, loader.declarations
    raise ValueError(
        f"PEFT interop: keras-hub's converter for {type(backbone).__name__} "
        "could not be recorded (it reads checkpoint tensors or config "
        f"fields that cannot be recovered from the model): {failures}. "
        "Pass the Hugging Face checkpoint directory as base_model to give "
        "it the real config."
    )


def kernel_maps(model, hf_config=None):
    """Every Keras kernel of `model` that a Hugging Face weight fills.

    Args:
        model: a keras-hub backbone or task model (base or adapted).
        hf_config: the checkpoint's config dict, or `None`.

    Returns:
        `(model_type, maps, refused)`: `maps` is `{hf module: [KernelMap,
        ...]}` (several for a fused weight), `refused` is `{hf module:
        reason}` for weights whose hook is not a pure re-indexing.
    """
    backbone = find_backbone(model)
    model_type, declarations = record_declarations(backbone, hf_config)
    owners = _kernel_owners(model)
    grouped = {}
    for variable, key, hook in declarations:
        layer = owners.get(id(variable))
        if layer is not None and key.endswith(".weight"):
            grouped.setdefault(key[: -len(".weight")], []).append((layer, hook))
    maps, refused = {}, {}
    for module, parts in grouped.items():
        try:
            maps[module] = _index_maps(module, parts)
        except ValueError as error:
            refused[module] = str(error)
    return model_type, maps, refused


def _kernel_owners(model):
    """`{id(kernel variable): base Dense / EinsumDense}` over the model."""
    owners = {}
    for entry in model_walk.walk(model).values():
        layer = getattr(entry.layer, "base_layer", entry.layer)
        if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)):
            owners[id(layer.kernel)] = layer
    return owners


def kernel_axes(layer):
    """`(contracted axes, free axes)` of a Dense / EinsumDense kernel."""
    if isinstance(layer, keras.layers.EinsumDense):
        split = split_equation(layer.equation)
        return split.contracted_axes, split.free_axes
    return (0,), (1,)


def _index_maps(module, parts):
    """The `KernelMap`s of the kernels one Hugging Face weight fills."""
    sizes = [int(np.prod(layer.kernel.shape)) for layer, _ in parts]
    contracted = {
        int(np.prod([layer.kernel.shape[a] for a in kernel_axes(layer)[0]]))
        for layer, _ in parts
    }
    if len(contracted) != 1:
        raise ValueError(
            f"'{module}' fills kernels with different input sizes {contracted}"
        )
    in_features = contracted.pop()
    out_features = sum(sizes) // in_features
    reasons = []
    for conv1d in (False, True):
        try:
            return _maps_for_layout(module, parts, in_features, out_features, conv1d)
        except ValueError as error:
            reasons.append(str(error))
    raise ValueError(
        f"'{module}': its keras-hub hook is not a pure re-indexing of the "
        f"weight with input and output features kept apart ({reasons[0]})"
    )


def _maps_for_layout(module, parts, in_features, out_features, conv1d):
    shape = (in_features, out_features) if conv1d else (out_features, in_features)
    indices = np.arange(in_features * out_features, dtype="float64").reshape(shape)
    maps, seen_out = [], []
    for layer, hook in parts:
        kernel_shape = tuple(layer.kernel.shape)
        if hook is None:
            placed = indices
        else:
            try:
                placed = np.asarray(hook(indices.copy(), list(kernel_shape)))
            except Exception as error:  # noqa: BLE001 - a layout that fails
                raise ValueError(f"hook fails: {error}") from None
        if placed.shape != kernel_shape or not np.array_equal(
            placed, np.round(placed)
        ):
            raise ValueError("hook changes values or shape")
        rows, cols = np.divmod(placed.astype("int64"), shape[1])
        hf_in, hf_out = (rows, cols) if conv1d else (cols, rows)
        contracted_axes, free_axes = kernel_axes(layer)
        order = contracted_axes + free_axes
        n_in = int(np.prod([kernel_shape[a] for a in contracted_axes]))
        hf_in = np.transpose(hf_in, order).reshape(n_in, -1)
        hf_out = np.transpose(hf_out, order).reshape(n_in, -1)
        if not (hf_in == hf_in[:, :1]).all() or not (hf_out == hf_out[:1]).all():
            raise ValueError("kernel axes mix input and output features")
        in_index, out_index = hf_in[:, 0], hf_out[0]
        if len(set(in_index.tolist())) != in_features:
            raise ValueError("not every input feature is used once")
        seen_out.extend(out_index.tolist())
        maps.append(KernelMap(
            module=module, layer=layer, in_features=in_features,
            out_features=out_features, conv1d=conv1d,
            in_index=in_index.reshape([kernel_shape[a] for a in contracted_axes]),
            out_index=out_index.reshape([kernel_shape[a] for a in free_axes]),
        ))
    if sorted(seen_out) != list(range(out_features)):
        raise ValueError("the kernels do not partition the output features")
    return maps
