"""Adapter files: only the LoRA weights, as safetensors, keyed by layer path.

A file holds exactly two float32 tensors per adapted layer,
`"<layer path>/lora_a"` and `"<layer path>/lora_b"`, where the path is the
layer's key in `lora_layers(model)` (e.g. `"block/up"`). Everything else is
one JSON document in the safetensors header metadata under the key
`"keras_lora"`:

```
{"format": "keras_lora.adapter", "format_version": 1,
 "keras_lora_version": "0.1.0", "keras_version": "3.15.1", "backend": "jax",
 "layers": {"block/up": {"class": "LoRADense", "base_class": "Dense",
   "rank": 8, "alpha": 16.0, "scaling": 2.0, "use_rslora": false,
   "dropout": 0.0, "train_bias": false, "lora_a_shape": [64, 8],
   "lora_b_shape": [8, 128], "base_kernel_shape": [64, 128]}}}
```

so any safetensors reader sees a clean file, and `load_adapter` can
re-create the adaptation on a base model. Files are backend-neutral.
"""

import dataclasses
import json
import math
import os
import tempfile

import numpy as np
import safetensors
import safetensors.numpy
from keras import ops

from keras_lora import config as lora_config
from keras_lora import model_walk
from keras_lora.layers import LoRADense
from keras_lora.layers import LoRAEinsumDense
from keras_lora.layers import lora_class_for

FORMAT_NAME = "keras_lora.adapter"
FORMAT_VERSION = 1
METADATA_KEY = "keras_lora"

_LORA_CLASSES = {cls.__name__: cls for cls in (LoRADense, LoRAEinsumDense)}


@dataclasses.dataclass(frozen=True)
class LayerRecord:
    """What an adapter file records about one adapted layer."""

    path: str
    lora_class: str
    base_class: str
    rank: int
    alpha: float
    scaling: float
    use_rslora: bool
    dropout: float
    train_bias: bool
    lora_a_shape: tuple
    lora_b_shape: tuple
    base_kernel_shape: tuple

    @property
    def parameter_count(self):
        return math.prod(self.lora_a_shape) + math.prod(self.lora_b_shape)


@dataclasses.dataclass(frozen=True)
class AdapterFile:
    """A validated adapter file: its metadata, layer records and tensors."""

    path: str
    metadata: dict
    layers: dict  # {layer path: LayerRecord}, in file order
    tensors: dict  # {"<path>/lora_a": np.ndarray, ...}

    @property
    def parameter_count(self):
        return sum(r.parameter_count for r in self.layers.values())


def save_adapter(model, path):
    """Writes the model's LoRA adapters (only them) to a safetensors file.

    The write is atomic: the file is written under a temporary name in the
    same directory and renamed over `path`, so an interrupted save leaves
    the previous file (or none), never a partial one. The file holds
    `lora_a` / `lora_b` of every LoRA layer (float32) plus a small JSON
    header (see the module docstring); its size is the adapter bytes plus a
    header of a few hundred bytes per layer.

    Args:
        model: a Keras model with LoRA layers.
        path: the file to write (conventionally `*.safetensors`). Its parent
            directory must exist.

    Returns:
        The absolute path written.

    Raises:
        ValueError: if the model has no LoRA layers or an adapter holds NaN
            or infinite values.
        FileNotFoundError: if the parent directory does not exist.

    Example:

    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model = apply_lora(model, rank=2)
    >>> save_adapter(model, "/tmp/task.safetensors")  # doctest: +SKIP
    """
    from keras_lora.surgery import lora_layers

    layers = lora_layers(model)
    if not layers:
        raise ValueError(
            f"save_adapter: model '{model.name}' has no LoRA layers. Use "
            "`apply_lora` first."
        )
    target = _check_parent(path, "save_adapter")
    tensors, records = {}, {}
    for layer_path, layer in layers.items():
        for name in ("lora_a", "lora_b"):
            value = np.ascontiguousarray(
                ops.convert_to_numpy(getattr(layer, name).value), "float32"
            )
            if not np.all(np.isfinite(value)):
                raise ValueError(
                    f"save_adapter: layer '{layer_path}': {name} holds NaN "
                    "or infinite values; refusing to save it."
                )
            tensors[f"{layer_path}/{name}"] = value
        records[layer_path] = _record_of(layer)
    payload = safetensors.numpy.save(
        tensors, metadata={METADATA_KEY: _metadata_json(records)}
    )
    _write_atomically(payload, target)
    return target


def load_adapter(model, path):
    """Loads an adapter file into a model; applies LoRA first if needed.

    Given a base model (no LoRA layers), LoRA is applied exactly as the file
    records it (same layers by path, ranks, alphas, rsLoRA, dropout) and the
    weights are loaded. Given an adapted model, its LoRA layers must match
    the file's one for one, and the weights are loaded in place.

    Everything is checked before anything is changed: the file (truncated,
    foreign or non-safetensors files are rejected), every layer path, the
    LoRA class, rank, alpha, every tensor's shape and dtype, and the base
    kernel shapes. On any mismatch the error names the first offending
    layer or key (and both shapes), and the model is exactly as before.
    Files load on every backend, whichever backend saved them.

    Args:
        model: a built Keras model, base or adapted.
        path: an adapter file written by `save_adapter`.

    Returns:
        `model`, with the adapter loaded.

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: if the file or the model does not match.

    Example:

    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model = load_adapter(model, "/tmp/task.safetensors")  # doctest: +SKIP
    """
    from keras_lora.surgery import lora_layers

    adapter = read_adapter(path)
    adapted = lora_layers(model)
    if not adapted:
        _check_base_model(model, adapter)
        _apply_recorded(model, adapter)
        adapted = lora_layers(model)
    _check_adapted_model(adapted, adapter)
    # Everything matches: only now assign.
    for layer_path, layer in adapted.items():
        layer.lora_a.assign(adapter.tensors[f"{layer_path}/lora_a"])
        layer.lora_b.assign(adapter.tensors[f"{layer_path}/lora_b"])
    return model


def read_adapter(path):
    """Reads and validates an adapter file without touching any model.

    Args:
        path: an adapter file written by `save_adapter`.

    Returns:
        An `AdapterFile` with `metadata` (the parsed JSON document),
        `layers` (`{path: LayerRecord}`) and `tensors` (numpy arrays).

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: if the file is not a valid keras-lora adapter.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Adapter file not found: '{path}'")
    if not os.path.isfile(path):
        raise ValueError(f"Adapter path '{path}' is not a file.")
    where = f"Adapter file '{path}'"
    try:
        with safetensors.safe_open(path, framework="numpy") as handle:
            header = handle.metadata() or {}
            if METADATA_KEY not in header:
                raise _NotAnAdapter(
                    f"{where} is a safetensors file but not a keras-lora "
                    f"adapter: its metadata has no '{METADATA_KEY}' entry "
                    f"(tensors: {_sample(list(handle.keys()))})."
                )
            metadata = _parse_metadata(header[METADATA_KEY], where)
            records = _parse_records(metadata, where)
            _check_tensor_index(handle, records, where)
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except _NotAnAdapter as error:
        raise ValueError(str(error)) from None
    except safetensors.SafetensorError as error:
        raise ValueError(
            f"{where} is not a readable safetensors file (truncated, "
            f"corrupted or another format): {error}"
        ) from None
    for key, value in tensors.items():
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{where}: tensor '{key}' holds NaN or infinite values.")
    return AdapterFile(path, metadata, records, tensors)


# Writing ------------------------------------------------------------------


def _record_of(layer):
    return {
        "class": type(layer).__name__,
        "base_class": type(layer.base_layer).__name__,
        "rank": layer.rank,
        "alpha": layer.alpha,
        "scaling": layer.scaling,
        "use_rslora": layer.use_rslora,
        "dropout": layer.dropout,
        "train_bias": layer.train_bias,
        "lora_a_shape": list(layer.lora_a.shape),
        "lora_b_shape": list(layer.lora_b.shape),
        "base_kernel_shape": list(layer.base_layer.kernel.shape),
    }


def _metadata_json(records):
    import keras

    import keras_lora

    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "keras_lora_version": keras_lora.__version__,
        "keras_version": keras.__version__,
        "backend": keras.backend.backend(),
        "layers": records,
    }
    return json.dumps(document, separators=(",", ":"))


def _check_parent(path, who):
    target = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise FileNotFoundError(
            f"{who}: the directory of '{path}' does not exist: '{parent}'. "
            "Create it first."
        )
    if os.path.isdir(target):
        raise ValueError(f"{who}: '{path}' is a directory; give a file path.")
    return target


def _write_atomically(payload, target):
    parent, name = os.path.split(target)
    descriptor, temporary = tempfile.mkstemp(
        prefix=f".{name}.", suffix=".tmp", dir=parent
    )
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


# Reading ------------------------------------------------------------------


class _NotAnAdapter(Exception):
    pass


def _parse_metadata(text, where):
    try:
        metadata = json.loads(text)
    except ValueError as error:
        raise _NotAnAdapter(
            f"{where}: its '{METADATA_KEY}' metadata is not valid JSON ({error})."
        ) from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise _NotAnAdapter(
            f"{where}: its '{METADATA_KEY}' metadata does not describe a "
            f"keras-lora adapter (expected format '{FORMAT_NAME}')."
        )
    version = metadata.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _NotAnAdapter(f"{where}: bad format_version {version!r}.")
    if version > FORMAT_VERSION:
        raise _NotAnAdapter(
            f"{where} uses adapter format version {version}, newer than this "
            f"keras-lora reads ({FORMAT_VERSION}); upgrade keras-lora "
            f"(the file was written by {metadata.get('keras_lora_version')})."
        )
    layers = metadata.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise _NotAnAdapter(f"{where}: its metadata lists no layers.")
    return metadata


def _parse_records(metadata, where):
    records = {}
    for path, entry in metadata["layers"].items():
        at = f"{where}, layer '{path}': "
        try:
            lora_class = entry["class"]
            if lora_class not in _LORA_CLASSES:
                raise ValueError(
                    f"unknown LoRA class {lora_class!r} (known: "
                    f"{sorted(_LORA_CLASSES)})"
                )
            rank = lora_config.validate_rank(entry["rank"])
            record = LayerRecord(
                path=path,
                lora_class=lora_class,
                base_class=str(entry["base_class"]),
                rank=rank,
                alpha=lora_config.validate_alpha(entry["alpha"], rank),
                scaling=float(entry["scaling"]),
                use_rslora=_as_bool(entry["use_rslora"], "use_rslora"),
                dropout=lora_config.validate_dropout(entry["dropout"]),
                train_bias=_as_bool(entry["train_bias"], "train_bias"),
                lora_a_shape=_as_shape(entry["lora_a_shape"], "lora_a_shape"),
                lora_b_shape=_as_shape(entry["lora_b_shape"], "lora_b_shape"),
                base_kernel_shape=_as_shape(
                    entry["base_kernel_shape"], "base_kernel_shape"
                ),
            )
        except KeyError as error:
            raise _NotAnAdapter(f"{at}the record lacks {error}.") from None
        except (TypeError, ValueError) as error:
            raise _NotAnAdapter(f"{at}{error}") from None
        if record.lora_a_shape[-1] != rank or record.lora_b_shape[0] != rank:
            raise _NotAnAdapter(
                f"{at}rank {rank} disagrees with lora_a_shape "
                f"{record.lora_a_shape} / lora_b_shape {record.lora_b_shape}."
            )
        records[path] = record
    return records


def _as_bool(value, name):
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be true or false, got {value!r}")
    return value


def _as_shape(value, name):
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value
    ):
        raise ValueError(f"`{name}` must be a list of positive ints, got {value!r}")
    return tuple(value)


def _check_tensor_index(handle, records, where):
    """Each recorded layer has exactly its two float32 tensors, as recorded."""
    keys = set(handle.keys())
    expected = {}
    for record in records.values():
        expected[f"{record.path}/lora_a"] = record.lora_a_shape
        expected[f"{record.path}/lora_b"] = record.lora_b_shape
    for key, shape in expected.items():
        if key not in keys:
            raise _NotAnAdapter(f"{where}: tensor '{key}' is missing.")
        tensor = handle.get_slice(key)
        if tensor.get_dtype() != "F32":
            raise _NotAnAdapter(
                f"{where}: tensor '{key}' has dtype {tensor.get_dtype()}, "
                "expected F32 (float32)."
            )
        found = tuple(tensor.get_shape())
        if found != shape:
            raise _NotAnAdapter(
                f"{where}: tensor '{key}' has shape {found} but the metadata "
                f"records {shape}."
            )
    extra = sorted(keys - set(expected))
    if extra:
        raise _NotAnAdapter(
            f"{where}: tensor '{extra[0]}' belongs to no recorded layer."
        )


# Matching a model ---------------------------------------------------------


def _check_base_model(model, adapter):
    """The base model holds every recorded layer, of the recorded shapes."""
    where = f"load_adapter('{adapter.path}')"
    entries = {entry.path: entry.layer for entry in model_walk.walk(model).values()}
    for record in adapter.layers.values():
        layer = entries.get(record.path)
        if layer is None:
            raise ValueError(
                f"{where}: layer '{record.path}' is not in model "
                f"'{model.name}'. Layers there: {_sample(list(entries))}. "
                "Nothing was changed."
            )
        lora_class = lora_class_for(layer)
        if lora_class is None or lora_class.__name__ != record.lora_class:
            raise ValueError(
                f"{where}: layer '{record.path}' is a {type(layer).__name__}, "
                f"but the adapter was trained on a {record.base_class} "
                f"({record.lora_class}). Nothing was changed."
            )
        if not layer.built:
            raise ValueError(
                f"{where}: layer '{record.path}' is not built; build the "
                "model first. Nothing was changed."
            )
        kernel_shape = tuple(layer.kernel.shape)
        if kernel_shape != record.base_kernel_shape:
            raise ValueError(
                f"{where}: layer '{record.path}': the base kernel has shape "
                f"{kernel_shape} in the model but {record.base_kernel_shape} "
                "in the file. Nothing was changed."
            )
        contracted, free = lora_class._kernel_split(layer)
        _check_shape(where, record.path, "lora_a",
                     tuple(contracted) + (record.rank,), record.lora_a_shape)
        _check_shape(where, record.path, "lora_b",
                     (record.rank,) + tuple(free), record.lora_b_shape)
    for name in ("dropout", "use_rslora", "train_bias"):
        values = {getattr(r, name) for r in adapter.layers.values()}
        if len(values) > 1:
            raise ValueError(
                f"{where}: the file records several values of `{name}` "
                f"({sorted(values)}), which one `apply_lora` call cannot "
                "re-create. Apply LoRA to the model yourself, then load. "
                "Nothing was changed."
            )


def _apply_recorded(model, adapter):
    from keras_lora.surgery import apply_lora

    first = next(iter(adapter.layers.values()))
    apply_lora(
        model,
        rank=first.rank,
        alpha=first.alpha,
        targets=[_ExactPath(path) for path in adapter.layers],
        rank_pattern={_ExactPath(r.path): r.rank for r in adapter.layers.values()},
        alpha_pattern={_ExactPath(r.path): r.alpha for r in adapter.layers.values()},
        dropout=first.dropout,
        use_rslora=first.use_rslora,
        train_bias=first.train_bias,
    )


def _check_adapted_model(adapted, adapter):
    where = f"load_adapter('{adapter.path}')"
    for record in adapter.layers.values():
        layer = adapted.get(record.path)
        if layer is None:
            raise ValueError(
                f"{where}: the file adapts layer '{record.path}', which is "
                f"not a LoRA layer of the model (its LoRA layers: "
                f"{_sample(list(adapted))}). Nothing was changed."
            )
        at = f"{where}: layer '{record.path}'"
        if type(layer).__name__ != record.lora_class:
            raise ValueError(
                f"{at} is a {type(layer).__name__} in the model but a "
                f"{record.lora_class} in the file. Nothing was changed."
            )
        if layer.rank != record.rank:
            raise ValueError(
                f"{at} has rank {layer.rank} in the model but {record.rank} "
                "in the file. Nothing was changed."
            )
        kernel_shape = tuple(layer.base_layer.kernel.shape)
        if kernel_shape != record.base_kernel_shape:
            raise ValueError(
                f"{at}: the base kernel has shape {kernel_shape} in the model "
                f"but {record.base_kernel_shape} in the file. Nothing was "
                "changed."
            )
        for name in ("lora_a", "lora_b"):
            variable = getattr(layer, name)
            _check_shape(where, record.path, name, tuple(variable.shape),
                         getattr(record, f"{name}_shape"))
            if variable.dtype != "float32":
                raise ValueError(
                    f"{at}: {name} is {variable.dtype} in the model, float32 "
                    "in the file. Nothing was changed."
                )
        if layer.alpha != record.alpha or layer.use_rslora != record.use_rslora:
            raise ValueError(
                f"{at} has alpha={layer.alpha}, use_rslora={layer.use_rslora} "
                f"in the model but alpha={record.alpha}, "
                f"use_rslora={record.use_rslora} in the file, which would "
                "scale the update differently. Nothing was changed."
            )
        if layer.merged:
            raise ValueError(
                f"{at} is merged; call `unmerge_adapters(model)` before "
                "loading another adapter. Nothing was changed."
            )
    extra = [path for path in adapted if path not in adapter.layers]
    if extra:
        raise ValueError(
            f"{where}: the model has LoRA layers the file does not cover: "
            f"{_sample(extra)}. Nothing was changed."
        )


def _check_shape(where, path, name, in_model, in_file):
    if tuple(in_model) != tuple(in_file):
        raise ValueError(
            f"{where}: layer '{path}': {name} has shape {tuple(in_model)} in "
            f"the model but {tuple(in_file)} in the file. Nothing was changed."
        )


class _ExactPath:
    """A target pattern that selects one layer by its exact path."""

    def __init__(self, path):
        self.path = path
        self.__name__ = repr(path)

    def __call__(self, path, layer):
        return path == self.path

    def __eq__(self, other):
        return isinstance(other, _ExactPath) and other.path == self.path

    def __hash__(self):
        return hash(("_ExactPath", self.path))


def _sample(items, limit=8):
    shown = ", ".join(repr(item) for item in items[:limit])
    more = f", ... ({len(items)} in all)" if len(items) > limit else ""
    return f"[{shown}{more}]"
