"""The adapter file format: safetensors tensors plus one JSON header entry.

A file holds exactly two float32 tensors per adapted layer,
`"<layer path>/lora_a"` and `"<layer path>/lora_b"`, where the path is the
layer's key in `lora_layers(model)` (e.g. `"block/up"`), plus one float32
tensor per other trained weight, `"<layer path>/<variable name>"`: the
weights of layers kept fully trainable (`apply_lora(trainable=...)`, e.g.
`"head/kernel"`) and the biases of `train_bias=True` layers
(`"block/up/bias"`). Everything else is one JSON document in the
safetensors header metadata under the key `"keras_lora"`:

```
{"format": "keras_lora.adapter", "format_version": 3,
 "keras_lora_version": "0.1.0", "keras_version": "3.15.1", "backend": "jax",
 "layers": {"block/up": {"class": "LoRADense", "base_class": "Dense",
   "rank": 8, "alpha": 16.0, "scaling": 2.0, "use_rslora": false,
   "dropout": 0.0, "train_bias": false, "lora_a_shape": [8, 64],
   "lora_b_shape": [8, 128], "base_kernel_shape": [64, 128]}},
 "trainable_layers": ["head"],
 "extra_tensors": {"head/kernel": [128, 3], "head/bias": [3]}}
```

`lora_a` is stored rank-first, `(rank,) + contracted axes`, as in memory
(and as PEFT stores `lora_A.weight`). Version 1 and 2 files stored it
rank-last; they still read, `read_adapter` moving the rank axis to the
front. Version 1 files (no `trainable_layers` / `extra_tensors`) still read.

so any safetensors reader sees a clean file, and `load_adapter` can
re-create the adaptation on a base model. Files are backend-neutral.

The header costs about 0.3-0.5 KiB per adapted layer (each path appears in
the metadata and in two tensor names), so it stays under 64 KiB up to
roughly 120 layers with keras-hub-length paths (a 12-block transformer with
every linear layer adapted needs about 40 KiB).
"""

import dataclasses
import json
import math
import os
import tempfile

import numpy as np
import safetensors
import safetensors.numpy

from keras_lora import config as lora_config

FORMAT_NAME = "keras_lora.adapter"
FORMAT_VERSION = 3
# Before version 3, `lora_a` was stored rank-last, `contracted + (rank,)`.
RANK_FIRST_SINCE = 3
METADATA_KEY = "keras_lora"

# The LoRA classes a file may name (checked against `type(layer).__name__`).
LORA_CLASS_NAMES = ("LoRADense", "LoRAEinsumDense")


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
    tensors: dict  # {"<path>/lora_a": np.ndarray, ...}, extras included
    # Paths of the layers that were fully trainable (`apply_lora(trainable=)`).
    trainable_layers: tuple = ()
    # {"<owner layer path>/<variable name>": shape} of the other trained
    # weights (fully trainable layers, `train_bias` biases).
    extra_tensors: dict = dataclasses.field(default_factory=dict)

    @property
    def parameter_count(self):
        return sum(r.parameter_count for r in self.layers.values())


def write_adapter_file(path, tensors, records, who="save_adapter",
                       extras=None, trainable_layers=()):
    """Writes tensors and layer records as an adapter file, atomically.

    Args:
        path: the file to write; its parent directory must exist.
        tensors: `{"<layer path>/lora_a": float32 array, ...}`.
        records: `{layer path: dict}`, the per-layer metadata.
        who: the caller's name, for error messages.
        extras: optional `{"<layer path>/<variable name>": float32 array}`,
            the other trained weights.
        trainable_layers: paths of the fully trainable layers.

    Returns:
        The absolute path written.
    """
    target = _check_parent(path, who)
    extras = dict(extras or {})
    clash = sorted(set(extras) & set(tensors))
    if clash:
        raise ValueError(
            f"{who}: trained weight '{clash[0]}' has the name of an adapter "
            "tensor; rename the variable."
        )
    document = _metadata_json(records, extras, trainable_layers)
    payload = safetensors.numpy.save(
        {**tensors, **extras}, metadata={METADATA_KEY: document}
    )
    _write_atomically(payload, target)
    return target


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
            trainable_layers, extra_tensors = _parse_extras(metadata, where)
            _check_tensor_index(handle, records, extra_tensors, where)
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        if metadata["format_version"] < RANK_FIRST_SINCE:
            records, tensors = _rank_first(records, tensors)
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
    return AdapterFile(
        path, metadata, records, tensors, trainable_layers, extra_tensors
    )


# Writing ------------------------------------------------------------------


def _metadata_json(records, extras, trainable_layers):
    import keras

    import keras_lora

    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "keras_lora_version": keras_lora.__version__,
        "keras_version": keras.__version__,
        "backend": keras.backend.backend(),
        "layers": records,
        "trainable_layers": list(trainable_layers),
        "extra_tensors": {
            key: list(value.shape) for key, value in extras.items()
        },
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
            if lora_class not in LORA_CLASS_NAMES:
                raise ValueError(
                    f"unknown LoRA class {lora_class!r} (known: "
                    f"{list(LORA_CLASS_NAMES)})"
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
        rank_axis = 0 if metadata["format_version"] >= RANK_FIRST_SINCE else -1
        if record.lora_a_shape[rank_axis] != rank or record.lora_b_shape[0] != rank:
            raise _NotAnAdapter(
                f"{at}rank {rank} disagrees with lora_a_shape "
                f"{record.lora_a_shape} / lora_b_shape {record.lora_b_shape}."
            )
        records[path] = record
    return records


def _rank_first(records, tensors):
    """Converts a version 1-2 file's rank-last `lora_a` to rank-first."""
    tensors = dict(tensors)
    converted = {}
    for path, record in records.items():
        key = f"{path}/lora_a"
        tensors[key] = np.ascontiguousarray(np.moveaxis(tensors[key], -1, 0))
        converted[path] = dataclasses.replace(
            record, lora_a_shape=tuple(tensors[key].shape)
        )
    return converted, tensors


def _parse_extras(metadata, where):
    """`trainable_layers` and `extra_tensors` (absent in version 1 files)."""
    layers = metadata.get("trainable_layers", [])
    if not isinstance(layers, list) or not all(
        isinstance(p, str) and p for p in layers
    ):
        raise _NotAnAdapter(
            f"{where}: `trainable_layers` must be a list of layer paths, "
            f"got {layers!r}."
        )
    extras = metadata.get("extra_tensors", {})
    if not isinstance(extras, dict):
        raise _NotAnAdapter(
            f"{where}: `extra_tensors` must map names to shapes, got {extras!r}."
        )
    shapes = {}
    for key, shape in extras.items():
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0
            for d in shape
        ):
            raise _NotAnAdapter(
                f"{where}: extra tensor '{key}' has a bad shape {shape!r}."
            )
        shapes[key] = tuple(shape)
    return tuple(layers), shapes


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


def _check_tensor_index(handle, records, extra_tensors, where):
    """Each recorded layer has exactly its two float32 tensors, as recorded,
    and each recorded extra tensor is there, float32, of its shape."""
    keys = set(handle.keys())
    expected = dict(extra_tensors)
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


def _sample(items, limit=8):
    shown = ", ".join(repr(item) for item in items[:limit])
    more = f", ... ({len(items)} in all)" if len(items) > limit else ""
    return f"[{shown}{more}]"
