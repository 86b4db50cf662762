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
{"format": "keras_lora.adapter", "format_version": 4,
 "keras_lora_version": "0.1.0", "keras_version": "3.15.1", "backend": "jax",
 "layers": {"block/up": {"class": "LoRADense", "base_class": "Dense",
   "rank": 8, "alpha": 16.0, "scaling": 2.0, "use_rslora": false,
   "dropout": 0.0, "train_bias": false, "lora_a_shape": [8, 64],
   "lora_b_shape": [8, 128], "base_kernel_shape": [64, 128]}},
 "trainable_layers": ["head"],
 "extra_tensors": {"head/kernel": [128, 3], "head/bias": [3]},
 "digests": {"block/up/lora_a": "1c291ca3", ...},
 "layer_keys": {"block/up": "...", "head": "..."}}
```

`digests` holds the CRC-32 (zlib's, 8 lowercase hex digits) of every
tensor's bytes as stored (little-endian float32); `read_adapter` verifies
each one. `layer_keys` maps every layer path the file names (adapted,
fully trainable, owners of extra tensors) to a structural key that does not
depend on auto-generated layer names. The header follows a strict schema
(`keras_lora.adapter_schema`): required keys, exact types, no unknown or
repeated keys, `scaling == alpha / rank` (`alpha / sqrt(rank)` with rsLoRA).

`lora_a` is stored rank-first, `(rank,) + contracted axes`, as in memory
(and as PEFT stores `lora_A.weight`). Older files still read: version 3
(no digests, no layer keys; `AdapterFile.verified` is `False`), version 2
and 1 (`lora_a` rank-last; `read_adapter` moves the rank axis to the
front), version 1 (no `trainable_layers` / `extra_tensors`).

So any safetensors reader sees a clean file, and `load_adapter` can
re-create the adaptation on a base model. Files are backend-neutral.

The header costs about 0.3-0.5 KiB per adapted layer (each path appears in
the metadata, in `digests`, `layer_keys` and in two tensor names), so it
stays well under 64 KiB up to roughly 100 layers with keras-hub-length
paths.
"""

import dataclasses
import json
import math
import os
import zlib

import numpy as np
import safetensors
import safetensors.numpy

from keras_lora import adapter_schema as schema
from keras_lora import atomic_files
from keras_lora.adapter_schema import FORMAT_NAME  # noqa: F401
from keras_lora.adapter_schema import FORMAT_VERSION  # noqa: F401

# Since this version the header carries a digest of itself too.
HEADER_DIGEST_SINCE = 4
from keras_lora.adapter_schema import LORA_CLASS_NAMES  # noqa: F401
from keras_lora.adapter_schema import RANK_FIRST_SINCE

METADATA_KEY = "keras_lora"


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
    # DoRA: the file also holds "<path>/lora_magnitude", free-axes shaped.
    use_dora: bool = False
    # {name: shape} of the adapter's further pairs, held as "<path>/<name>"
    # (an untied ReversibleEmbedding's reverse_lora_a / reverse_lora_b).
    extra_factor_shapes: dict = dataclasses.field(default_factory=dict)

    @property
    def magnitude_shape(self):
        return tuple(self.lora_b_shape[1:]) if self.use_dora else None

    @property
    def parameter_count(self):
        count = math.prod(self.lora_a_shape) + math.prod(self.lora_b_shape)
        count += sum(math.prod(s) for s in self.extra_factor_shapes.values())
        return count + (math.prod(self.magnitude_shape) if self.use_dora else 0)


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
    # {layer path: structural key} for every path the file names; `{}` for
    # files written before format 4.
    layer_keys: dict = dataclasses.field(default_factory=dict)
    # Whether every tensor's digest was checked (format 4 and later).
    verified: bool = False

    @property
    def parameter_count(self):
        return sum(r.parameter_count for r in self.layers.values())


def write_adapter_file(path, tensors, records, who="save_adapter",
                       extras=None, trainable_layers=(), layer_keys=None):
    """Writes tensors and layer records as an adapter file, atomically.

    The header is checked against the same schema `read_adapter` applies
    before anything is written, so a file that would not read is never
    written (and an existing file at `path` is left as it was).

    Args:
        path: the file to write; its parent directory must exist.
        tensors: `{"<layer path>/lora_a": float32 array, ...}`.
        records: `{layer path: dict}`, the per-layer metadata.
        who: the caller's name, for error messages.
        extras: optional `{"<layer path>/<variable name>": float32 array}`,
            the other trained weights.
        trainable_layers: paths of the fully trainable layers.
        layer_keys: optional `{layer path: structural key}`; it must cover
            every adapted layer, every fully trainable layer and every owner
            of an extra tensor (other entries are left out). `None` records
            each path as its own key.

    Returns:
        The absolute path written.

    Example:

    >>> a, b = np.zeros((2, 4), "float32"), np.zeros((2, 3), "float32")
    >>> record = {"class": "LoRADense", "base_class": "Dense", "rank": 2,
    ...           "alpha": 2.0, "scaling": 1.0, "use_rslora": False,
    ...           "dropout": 0.0, "train_bias": False,
    ...           "lora_a_shape": [2, 4], "lora_b_shape": [2, 3],
    ...           "base_kernel_shape": [4, 3]}
    >>> write_adapter_file("/tmp/a.safetensors",
    ...                    {"d/lora_a": a, "d/lora_b": b}, {"d": record})
    ... # doctest: +SKIP
    """
    target = _check_parent(path, who)
    extras = dict(extras or {})
    clash = sorted(set(extras) & set(tensors))
    if clash:
        raise ValueError(
            f"{who}: trained weight '{clash[0]}' has the name of an adapter "
            "tensor; rename the variable."
        )
    arrays = {
        key: np.ascontiguousarray(value, dtype="<f4")
        for key, value in {**tensors, **extras}.items()
    }
    trainable_layers = list(trainable_layers)
    named = _named_paths(records, trainable_layers, extras)
    document = _document(
        records, arrays, extras, trainable_layers,
        _chosen_layer_keys(layer_keys, named, who),
    )
    try:
        text = json.dumps(document, separators=(",", ":"), allow_nan=False)
    except ValueError:
        raise ValueError(
            f"{who}: a layer record holds NaN or an infinite number "
            f"({_non_finite_fields(records)}). Nothing was written."
        ) from None
    try:
        _validate_document(text, list(arrays), f"{who}: the header to write")
    except ValueError as error:
        raise ValueError(f"{error} Nothing was written.") from None
    payload = safetensors.numpy.save(arrays, metadata={METADATA_KEY: text})
    atomic_files.write_atomically(payload, target)
    return target


def read_adapter(path):
    """Reads and validates an adapter file without touching any model.

    The header must follow the strict schema, every tensor must match the
    header's shape and dtype, hold only finite values, and (format 4) match
    its recorded digest.

    Args:
        path: an adapter file written by `save_adapter`.

    Returns:
        An `AdapterFile` with `metadata` (the parsed JSON document),
        `layers` (`{path: LayerRecord}`), `tensors` (numpy arrays),
        `layer_keys` and `verified` (whether digests were checked).

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: if the file is not a valid keras-lora adapter, naming
            the file and the offending key or tensor.

    Example:

    >>> adapter = read_adapter("task.safetensors")  # doctest: +SKIP
    >>> adapter.verified, sorted(adapter.layers)  # doctest: +SKIP
    (True, ['dense'])
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
                raise ValueError(
                    f"{where} is a safetensors file but not a keras-lora "
                    f"adapter: its metadata has no '{METADATA_KEY}' entry "
                    f"(tensors: {_sample(list(handle.keys()))})."
                )
            names = list(handle.keys())
            parsed = _validate_document(header[METADATA_KEY], names, where)
            _check_tensor_index(handle, parsed, where)
            tensors = {key: handle.get_tensor(key) for key in names}
    except safetensors.SafetensorError as error:
        raise ValueError(
            f"{where} is not a readable safetensors file (truncated, "
            f"corrupted or another format): {error}"
        ) from None
    document, records, trainable_layers, extra_tensors, layer_keys, digests = parsed
    for key, value in tensors.items():
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{where}: tensor '{key}' holds NaN or infinite values.")
    for key, recorded in digests.items():
        found = _digest(tensors[key])
        if found != recorded:
            raise ValueError(
                f"{where}: tensor '{key}' is corrupted: its CRC-32 is {found} "
                f"but the header records {recorded}. Save or download the "
                "file again."
            )
    if document["format_version"] < RANK_FIRST_SINCE:
        records, tensors = _rank_first(records, tensors)
    return AdapterFile(
        path, document, records, tensors, trainable_layers, extra_tensors,
        layer_keys, verified=bool(digests),
    )


# Writing ------------------------------------------------------------------


def _document(records, arrays, extras, trainable_layers, layer_keys):
    import keras

    import keras_lora

    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "keras_lora_version": keras_lora.__version__,
        "keras_version": keras.__version__,
        "backend": keras.backend.backend(),
        "layers": records,
        "trainable_layers": trainable_layers,
        "extra_tensors": {
            key: list(np.shape(value)) for key, value in extras.items()
        },
        "digests": {key: _digest(value) for key, value in arrays.items()},
        "layer_keys": layer_keys,
    }
    return sealed(document)


def sealed(document):
    """`document` with its `header_digest`: the CRC-32 of the rest of the
    header in a canonical JSON form (sorted keys, compact), so a changed
    byte anywhere in the header (a layer key, a rank, an alpha) is found,
    not only in the tensors.

    Args:
        document: a format 4 header as a dict.

    Returns:
        A new dict with `"header_digest"` set.
    """
    body = {key: value for key, value in document.items() if key != "header_digest"}
    return {**body, "header_digest": header_digest(body)}


def header_digest(document):
    """The CRC-32 (8 hex digits) of `document` without its digest."""
    body = {key: value for key, value in document.items() if key != "header_digest"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return f"{zlib.crc32(text.encode('utf-8')):08x}"


def _non_finite_fields(records):
    return ", ".join(
        f"layer '{path}': {field}={value!r}"
        for path, record in records.items()
        for field, value in dict(record).items()
        if isinstance(value, float) and not math.isfinite(value)
    ) or "unknown field"


def _digest(array):
    data = np.ascontiguousarray(array, dtype="<f4").reshape(-1).view(np.uint8)
    return format(zlib.crc32(data), "08x")


def _named_paths(records, trainable_layers, extras):
    """Every layer path a file names, in file order, once each."""
    owners = [key.rsplit("/", 1)[0] for key in extras]
    return list(dict.fromkeys([*records, *trainable_layers, *owners]))


def _chosen_layer_keys(layer_keys, named, who):
    if layer_keys is None:
        return {path: path for path in named}
    if not hasattr(layer_keys, "keys"):
        raise TypeError(
            f"{who}: `layer_keys` must be a mapping from layer paths to "
            f"structural keys. Received: layer_keys={layer_keys!r}"
        )
    missing = [path for path in named if path not in layer_keys]
    if missing:
        raise ValueError(
            f"{who}: `layer_keys` has no key for layer '{missing[0]}'."
        )
    return {path: layer_keys[path] for path in named}


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


# Reading ------------------------------------------------------------------


def _validate_document(text, tensor_names, where):
    """The schema's checks of a header and its agreement with the tensor
    names; returns `(document, records, trainable_layers, extra_tensors,
    layer_keys, digests)`."""
    document = schema.parse_document(text, where)
    version = document["format_version"]
    records = {
        path: LayerRecord(**schema.parse_record(path, entry, version, where))
        for path, entry in document["layers"].items()
    }
    trainable_layers, extra_tensors = schema.parse_extras(
        document, records, where
    )
    layer_keys = schema.parse_layer_keys(
        document, _named_paths(records, trainable_layers, extra_tensors), where
    )
    expected = _expected_tensors(records, extra_tensors)
    _check_names(tensor_names, expected, where)
    digests = schema.parse_digests(document, list(expected), where)
    if version >= HEADER_DIGEST_SINCE:
        # Last: a header that breaks the schema is reported as such first.
        recorded = document["header_digest"]
        if not isinstance(recorded, str) or recorded != header_digest(document):
            raise ValueError(
                f"{where}: its header does not match its `header_digest` "
                f"({recorded!r}): the header was changed after it was written "
                "(corrupted or edited by hand)."
            )
    return document, records, trainable_layers, extra_tensors, layer_keys, digests


def _expected_tensors(records, extra_tensors):
    expected = {}
    for record in records.values():
        expected[f"{record.path}/lora_a"] = record.lora_a_shape
        expected[f"{record.path}/lora_b"] = record.lora_b_shape
        if record.use_dora:
            expected[f"{record.path}/lora_magnitude"] = record.magnitude_shape
        for name, shape in record.extra_factor_shapes.items():
            expected[f"{record.path}/{name}"] = shape
    expected.update(extra_tensors)
    return expected


def _check_names(names, expected, where):
    missing = [key for key in expected if key not in names]
    if missing:
        raise ValueError(f"{where}: tensor '{missing[0]}' is missing.")
    extra = sorted(set(names) - set(expected))
    if extra:
        raise ValueError(
            f"{where}: tensor '{extra[0]}' belongs to no recorded layer."
        )


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


def _check_tensor_index(handle, parsed, where):
    """Each tensor the header names is float32 of its recorded shape."""
    _, records, _, extra_tensors, _, _ = parsed
    for key, shape in _expected_tensors(records, extra_tensors).items():
        tensor = handle.get_slice(key)
        if tensor.get_dtype() != "F32":
            raise ValueError(
                f"{where}: tensor '{key}' has dtype {tensor.get_dtype()}, "
                "expected F32 (float32)."
            )
        found = tuple(tensor.get_shape())
        if found != shape:
            raise ValueError(
                f"{where}: tensor '{key}' has shape {found} but the metadata "
                f"records {shape}."
            )


def _sample(items, limit=8):
    shown = ", ".join(repr(item) for item in items[:limit])
    more = f", ... ({len(items)} in all)" if len(items) > limit else ""
    return f"[{shown}{more}]"
