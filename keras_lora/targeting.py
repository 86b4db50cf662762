"""Which layers to adapt: a small pattern language over `(path, layer)`.

A *pattern* is one of:

- a preset name (`"all-linear"`: every Dense and EinsumDense; `"all"`:
  every layer keras-lora supports; `"attention"`, `"query_value"`),
- a string: an exact layer name, an exact path, a path suffix at a `/`
  boundary (`"block/up"`), or a glob on the path (`"*attention*"`),
- a compiled regular expression, searched in the path,
- a layer class (`keras.layers.Dense`),
- a callable `(path, layer) -> bool`.

`targets`, `exclude` and `trainable` take a pattern or a list of them;
`rank_pattern` and `alpha_pattern` map patterns to values (first match in
the dict's order wins).
"""

import fnmatch
import re

import keras

# Layer names used by Keras's MultiHeadAttention and keras-hub's attention
# layers (keras-hub's `Backbone.default_lora_layer_names()` is the
# query/value subset).
_QUERY_VALUE = ("query", "value", "query_dense", "value_dense")
_ATTENTION = _QUERY_VALUE + ("key", "key_dense", "attention_output")

PRESETS = {
    # Every Dense / EinsumDense (PEFT's "all-linear"); "all" adds every other
    # type keras-lora supports (embeddings, convolutions, ...).
    "all-linear": lambda path, layer: isinstance(
        layer, (keras.layers.Dense, keras.layers.EinsumDense)
    ),
    "all": lambda path, layer: True,
    "attention": lambda path, layer: layer.name in _ATTENTION,
    "query_value": lambda path, layer: layer.name in _QUERY_VALUE,
}

_GLOB_CHARS = set("*?[")


def as_pattern_list(patterns):
    """Normalizes `None`, one pattern, or a list/tuple/set to a list."""
    if patterns is None:
        return []
    if isinstance(patterns, (list, tuple, set, frozenset)):
        return list(patterns)
    return [patterns]


def is_exact(pattern):
    """Whether `pattern` names layers exactly (a name, path or suffix)."""
    return (
        isinstance(pattern, str)
        and pattern not in PRESETS
        and not _GLOB_CHARS & set(pattern)
    )


def matches(pattern, path, layer):
    """Whether `pattern` selects the layer at `path`.

    Args:
        pattern: a pattern (see the module docstring).
        path: the layer's `/`-joined path in the model.
        layer: the layer.

    Returns:
        A bool.

    Example:

    >>> layer = keras.layers.Dense(2, name="up")
    >>> matches("block/up", "model/block/up", layer)
    True
    >>> matches("*attention*", "model/block/up", layer)
    False
    """
    if isinstance(pattern, str):
        if pattern in PRESETS:
            return PRESETS[pattern](path, layer)
        if _GLOB_CHARS & set(pattern):
            return fnmatch.fnmatchcase(path, pattern)
        return (
            layer.name == pattern
            or path == pattern
            or path.endswith("/" + pattern)
        )
    if isinstance(pattern, re.Pattern):
        return pattern.search(path) is not None
    if isinstance(pattern, type):
        return isinstance(layer, pattern)
    if callable(pattern):
        return bool(pattern(path, layer))
    raise TypeError(
        "A target pattern must be a string, a compiled regular expression, "
        f"a layer class or a callable (path, layer) -> bool. "
        f"Received: {pattern!r} of type {type(pattern).__name__}"
    )


def matches_any(patterns, path, layer):
    return any(matches(p, path, layer) for p in patterns)


def value_for(pattern_map, path, layer, default):
    """The value of the first pattern in `pattern_map` matching the layer."""
    for pattern, value in (pattern_map or {}).items():
        if matches(pattern, path, layer):
            return value
    return default


def describe(pattern):
    """A short readable form of a pattern, for error messages."""
    if isinstance(pattern, re.Pattern):
        return f"re.compile({pattern.pattern!r})"
    if isinstance(pattern, type):
        return pattern.__name__
    if isinstance(pattern, str):
        return repr(pattern)
    return getattr(pattern, "__name__", repr(pattern))
