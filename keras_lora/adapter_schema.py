"""The strict schema of an adapter file's JSON header (see `adapter_file`).

Every key is required (per format version), every value has exactly its
type (a bool is never a number, a number never a string), nothing unknown
is accepted, no key appears twice, and the values agree with each other
(`scaling` with `alpha` / `rank` / `use_rslora`, `rank` with the shapes,
`layer_keys` and `digests` with the layers and tensors). A byte flipped in
a header therefore gives a `ValueError` naming the file, the field and the
value received, instead of a file that loads with another meaning.
"""

import json
import math
import re

from keras_lora import config as lora_config

FORMAT_NAME = "keras_lora.adapter"
FORMAT_VERSION = 4
# Before version 3, `lora_a` was stored rank-last, `contracted + (rank,)`.
RANK_FIRST_SINCE = 3
# Version 2 added `trainable_layers` / `extra_tensors`; 4 `digests` /
# `layer_keys`.
EXTRAS_SINCE = 2
DIGESTS_SINCE = 4

# The LoRA classes a file may name (checked against `type(layer).__name__`).
LORA_CLASS_NAMES = (
    "LoRADense", "LoRAEinsumDense", "LoRAEmbedding", "LoRAReversibleEmbedding",
    "LoRAConv1D", "LoRAConv2D", "LoRAConv3D",
)
# `scaling` must equal `alpha / rank` (or `/ sqrt(rank)`) this closely.
SCALING_RTOL = 1e-6

_TOP_LEVEL = {
    1: ("format", "format_version", "keras_lora_version", "keras_version",
        "backend", "layers"),
}
_TOP_LEVEL[2] = _TOP_LEVEL[3] = _TOP_LEVEL[1] + ("trainable_layers", "extra_tensors")
_TOP_LEVEL[4] = _TOP_LEVEL[3] + ("digests", "layer_keys", "header_digest")
# Record keys a file may leave out (their default: false).
OPTIONAL_RECORD_FIELDS = ("use_dora",)
# Written only for layers whose adapters hold further pairs: {name: shape}.
EXTRA_FACTORS_FIELD = "extra_factors"
_EXTRA_FACTOR_NAME = re.compile(r"[a-z][a-z0-9_]*_lora_[ab]\Z")
RECORD_FIELDS = (
    "class", "base_class", "rank", "alpha", "scaling", "use_rslora",
    "dropout", "train_bias", "lora_a_shape", "lora_b_shape",
    "base_kernel_shape",
)
_DIGEST = re.compile(r"[0-9a-f]{8}\Z")


class SchemaError(ValueError):
    """A header that does not follow the schema (a `ValueError`)."""


def parse_document(text, where):
    """Parses the header JSON (no duplicate keys, no nesting deep enough to
    exhaust the stack; a `NaN` parses, to be refused by the field that
    holds it) and checks the top-level keys and types of its version."""
    try:
        document = json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise SchemaError(
            f"{where}: its header JSON is nested too deeply to be an adapter "
            "header."
        ) from None
    except SchemaError as error:
        raise SchemaError(f"{where}: its header JSON {error}.") from None
    except ValueError as error:
        raise SchemaError(
            f"{where}: its header is not valid JSON ({error})."
        ) from None
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise SchemaError(
            f"{where}: its header does not describe a keras-lora adapter "
            f"(expected format '{FORMAT_NAME}')."
        )
    version = document.get("format_version")
    if not _is_int(version) or version < 1:
        raise SchemaError(
            f"{where}: `format_version` must be a positive integer. "
            f"Received: format_version={version!r}"
        )
    if version > FORMAT_VERSION:
        raise SchemaError(
            f"{where} uses adapter format version {version}, newer than this "
            f"keras-lora reads ({FORMAT_VERSION}); upgrade keras-lora "
            f"(the file was written by {document.get('keras_lora_version')!r})."
        )
    _exact_keys(document, _TOP_LEVEL[version], f"{where}: the header")
    for key in ("keras_lora_version", "keras_version", "backend"):
        _check(isinstance(document[key], str), where, key, document[key],
               "must be a string")
    layers = document["layers"]
    _check(isinstance(layers, dict) and layers, where, "layers", layers,
           "must map layer paths to records (at least one)")
    return document


def parse_record(path, entry, version, where):
    """Checks one layer record; returns its values as a dict of the
    `LayerRecord` fields (shapes as tuples)."""
    at = f"{where}, layer '{path}'"
    if not isinstance(entry, dict):
        raise SchemaError(
            f"{at}: the layer record must be a JSON object with the keys "
            f"{list(RECORD_FIELDS)}. Received: {_short(entry)}"
        )
    _exact_keys(entry, RECORD_FIELDS, f"{at}: the record",
                optional=OPTIONAL_RECORD_FIELDS + (EXTRA_FACTORS_FIELD,))
    lora_class = entry["class"]
    if not (isinstance(lora_class, str) and lora_class in LORA_CLASS_NAMES):
        raise SchemaError(
            f"{at}: unknown LoRA class {_short(lora_class)} (known: "
            f"{list(LORA_CLASS_NAMES)}). Received: class={_short(lora_class)}"
        )
    _check(isinstance(entry["base_class"], str) and entry["base_class"], at,
           "base_class", entry["base_class"], "must be a class name")
    for field in ("use_rslora", "train_bias") + tuple(
        f for f in OPTIONAL_RECORD_FIELDS if f in entry
    ):
        _check(isinstance(entry[field], bool), at, field, entry[field],
               "must be true or false")
    rank = entry["rank"]
    _check(_is_int(rank) and rank >= 1, at, "rank", rank,
           "must be a positive integer")
    alpha = entry["alpha"]
    _check(_is_number(alpha) and math.isfinite(alpha) and alpha > 0, at,
           "alpha", alpha, "must be a positive finite number")
    dropout = entry["dropout"]
    _check(_is_number(dropout) and 0 <= dropout < 1, at, "dropout", dropout,
           "must be a number in [0, 1)")
    shapes = {
        field: _shape(entry[field], at, field, minimum=1)
        for field in ("lora_a_shape", "lora_b_shape", "base_kernel_shape")
    }
    rank_axis = 0 if version >= RANK_FIRST_SINCE else -1
    if shapes["lora_a_shape"][rank_axis] != rank or shapes["lora_b_shape"][0] != rank:
        raise SchemaError(
            f"{at}: rank {rank} disagrees with lora_a_shape "
            f"{shapes['lora_a_shape']} / lora_b_shape {shapes['lora_b_shape']}."
        )
    scaling = entry["scaling"]
    expected = lora_config.scaling_for(rank, alpha, entry["use_rslora"])
    _check(
        _is_number(scaling) and math.isfinite(scaling)
        and math.isclose(scaling, expected, rel_tol=SCALING_RTOL),
        at, "scaling", scaling,
        f"must equal alpha / {'sqrt(rank)' if entry['use_rslora'] else 'rank'}"
        f" = {expected!r}",
    )
    return {
        "path": path,
        "lora_class": lora_class,
        "base_class": entry["base_class"],
        "rank": rank,
        "alpha": float(alpha),
        "scaling": float(scaling),
        "use_rslora": entry["use_rslora"],
        "dropout": float(dropout),
        "train_bias": entry["train_bias"],
        "use_dora": entry.get("use_dora", False),
        "extra_factor_shapes": _extra_factor_shapes(entry, rank, at),
        **shapes,
    }


def _extra_factor_shapes(entry, rank, at):
    """`{name: shape}` of a record's `extra_factors` (`{}` when absent):
    names like `reverse_lora_a`, rank-first shapes of that rank."""
    if EXTRA_FACTORS_FIELD not in entry:
        return {}
    factors = entry[EXTRA_FACTORS_FIELD]
    _check(isinstance(factors, dict) and factors, at, EXTRA_FACTORS_FIELD,
           factors, "must map factor names to shapes (at least one)")
    shapes = {}
    for name, shape in factors.items():
        _check(isinstance(name, str) and _EXTRA_FACTOR_NAME.match(name), at,
               EXTRA_FACTORS_FIELD, name,
               "must name factors '<prefix>_lora_a' / '<prefix>_lora_b'")
        shapes[name] = _shape(shape, at, f"{EXTRA_FACTORS_FIELD}.{name}", minimum=1)
        if shapes[name][0] != rank:
            raise SchemaError(
                f"{at}: rank {rank} disagrees with {EXTRA_FACTORS_FIELD}."
                f"{name} shape {shapes[name]}."
            )
    return shapes


def parse_extras(document, lora_paths, where):
    """`(trainable_layers, {extra tensor name: shape})`, consistent with the
    adapted layers: every extra belongs to a fully trainable layer or is an
    adapted layer's bias, and every fully trainable layer has one."""
    if document["format_version"] < EXTRAS_SINCE:
        return (), {}
    trainable = document["trainable_layers"]
    _check(
        isinstance(trainable, list)
        and all(isinstance(p, str) and p for p in trainable)
        and len(set(trainable)) == len(trainable),
        where, "trainable_layers", trainable,
        "must be a list of distinct layer paths",
    )
    extras = document["extra_tensors"]
    _check(isinstance(extras, dict), where, "extra_tensors", extras,
           "must map tensor names to shapes")
    shapes, owners = {}, set()
    for key, shape in extras.items():
        owner, _, variable = key.rpartition("/")
        field = f"extra_tensors['{key}']"
        shapes[key] = _shape(shape, where, field, minimum=0)
        if owner in lora_paths:
            _check(variable == "bias", where, field, key,
                   f"names a weight of the adapted layer '{owner}' other "
                   "than its bias; only `train_bias` biases are stored")
        else:
            _check(owner in trainable, where, field, key,
                   "belongs neither to an adapted layer nor to one of "
                   "`trainable_layers`")
        owners.add(owner)
    for path in trainable:
        _check(path not in lora_paths, where, "trainable_layers", path,
               "names an adapted layer; a layer is adapted or fully "
               "trainable, not both")
        _check(path in owners, where, "trainable_layers", path,
               "names a layer with no tensor in `extra_tensors`")
    return tuple(trainable), shapes


def parse_layer_keys(document, paths, where):
    """`{human path: structural key}`, covering exactly `paths`."""
    if document["format_version"] < DIGESTS_SINCE:
        return {}
    keys = document["layer_keys"]
    _check(
        isinstance(keys, dict)
        and all(isinstance(v, str) and v for v in keys.values()),
        where, "layer_keys", _short(keys),
        "must map layer paths to non-empty strings",
    )
    _same_names(keys, paths, where, "layer_keys", "layer path")
    seen = {}
    for path, key in keys.items():
        _check(key not in seen, where, f"layer_keys['{path}']", key,
               f"is also the key of layer '{seen.get(key)}'")
        seen[key] = path
    return dict(keys)


def parse_digests(document, tensor_names, where):
    """`{tensor name: CRC-32 as 8 lowercase hex digits}` for exactly the
    file's tensors; `{}` for files written before digests existed."""
    if document["format_version"] < DIGESTS_SINCE:
        return {}
    digests = document["digests"]
    _check(isinstance(digests, dict), where, "digests", _short(digests),
           "must map tensor names to digests")
    for name, value in digests.items():
        _check(isinstance(value, str) and _DIGEST.match(value), where,
               f"digests['{name}']", value,
               "must be a CRC-32 as 8 lowercase hex digits")
    _same_names(digests, tensor_names, where, "digests", "tensor")
    return dict(digests)


def _same_names(mapping, names, where, field, what):
    missing = [n for n in names if n not in mapping]
    if missing:
        raise SchemaError(
            f"{where}: `{field}` has no entry for {what} '{missing[0]}'."
        )
    unknown = [n for n in mapping if n not in names]
    if unknown:
        raise SchemaError(
            f"{where}: `{field}` names {what} '{unknown[0]}', which the file "
            "does not hold."
        )


# Small checks -------------------------------------------------------------


def _unique_keys(pairs):
    document = {}
    for key, value in pairs:
        if key in document:
            raise SchemaError(f"repeats the key {key!r}")
        document[key] = value
    return document


def _exact_keys(mapping, required, what, optional=()):
    missing = [k for k in required if k not in mapping]
    if missing:
        raise SchemaError(f"{what} lacks the key '{missing[0]}'.")
    unknown = [k for k in mapping if k not in required and k not in optional]
    if unknown:
        raise SchemaError(
            f"{what} has an unknown key {_short(unknown[0])} (known keys: "
            f"{list(required)})."
        )


def _check(condition, where, field, value, requirement):
    if not condition:
        raise SchemaError(
            f"{where}: `{field}` {requirement}. Received: "
            f"{field}={_short(value)}"
        )


def _shape(value, where, field, minimum):
    _check(
        isinstance(value, list) and (minimum == 0 or value)
        and all(_is_int(d) and d >= minimum for d in value),
        where, field, value,
        f"must be a {'non-empty ' if minimum else ''}list of integers "
        f">= {minimum}",
    )
    return tuple(value)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _short(value, limit=80):
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
