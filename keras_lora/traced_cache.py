"""Traced `predict` / `generate` functions kept per adapter state.

Switching adapters (`set_adapter`), disabling or merging them changes what
the LoRA layers compute without changing a variable: a function traced
before (JAX, TensorFlow) has the old computation baked in, so it must not
run afterwards. Tracing again costs a second or more on a large model, each
time one switches. This module keeps, per model, the traced functions that
depend only on what the model computes (`predict_function` and keras-hub's
`generate_function`), keyed by the model's *computation state*, and puts
them back when the model returns to a state it has been traced in:

- for every LoRA layer: its identity, active adapters (and their scalings),
  whether its adapters are enabled and whether they are merged;
- the model's variables (their identities) and which are trainable, in
  order: JAX's traced `predict` takes the trainable and the non-trainable
  values as separate arguments, so the split must be the one it was traced
  with;
- `jit_compile`, `run_eagerly`, `steps_per_execution`, keras-hub's
  `sampler` and the `keras.distribution` in use.

`train_function` and `test_function` are never kept: they hold the
optimizer and the compiled metrics, which `compile` replaces.

The cache is bounded (`MAX_STATES` per model, least recently used first
out). Entries hold their LoRA layers weakly and are dropped once one of
them is gone, or once the model's variables are others (`add_adapter`,
`delete_adapter`, `merge_lora(in_place=True)` rebuild or remove LoRA
layers; a TensorFlow trace would keep the old variables alive). The cache
lives in the model's `__dict__` (set with `object.__setattr__`, outside
Keras's attribute tracking, never saved): in a module-level weak
dictionary, the cached functions, which refer to their model, would keep
every model alive.

Which state a live function was traced in: the state recorded by the
last reset (`follow`). Before a change, `checkpoint(model)` (called by
`set_adapter` and `disable_adapters` / `enable_adapters` /
`unmerge_adapters`) checks that the model is still in it; a reset from
elsewhere (a layer's `set_active_adapters` / `disable_adapter`, after its
change) files the live functions under it only if the model was not
compiled by hand since (a user may have changed `trainable` flags, then
compiled). Where in doubt, nothing is kept. An explicit
`keras_lora.hub.reset_compiled_functions(model)` in an unchanged state
drops the model's cache: something outside the state above changed, and
every trace must be made again.
"""

import collections
import contextlib
import weakref

import keras

# At most this many computation states are kept per model.
MAX_STATES = 8

# Traced functions that depend only on what the model computes.
REUSABLE = ("predict_function", "generate_function")
# Traced functions holding the optimizer / compiled metrics.
NOT_REUSABLE = ("train_function", "test_function")

_ATTRIBUTE = "_keras_lora_traced_functions"


class _Entry:
    """The functions traced in one state, and the objects that state names."""

    __slots__ = ("referents", "functions")

    def __init__(self, referents, functions):
        self.referents = referents
        self.functions = functions

    def alive(self):
        return all(ref() is not None for ref in self.referents)


class _ModelCache:
    """One model's traced functions by state, and the state it is in."""

    __slots__ = (
        "entries", "key", "referents", "compile_token", "deferred",
        "weights_fingerprint", "lora_layers",
    )

    def __init__(self):
        self.entries = collections.OrderedDict()
        self.key = None  # the state the live functions are traced in
        self.referents = ()
        self.compile_token = None
        self.deferred = 0
        self.weights_fingerprint = None
        self.lora_layers = ()  # weak references, for `weights_fingerprint`


def follow(model, explicit=False):
    """Clears the model's traced functions, then restores those traced in
    its current state, if any are kept.

    The live `predict_function` / `generate_function` are first filed under
    the state they were traced in. `train_function` / `test_function` are
    always cleared.

    Args:
        model: a Keras model (for any other object, its traced-function
            attributes are cleared).
        explicit: `True` for a user's reset: in an unchanged state it drops
            the model's whole cache (something the state does not cover
            changed).

    Returns:
        `model`.
    """
    if not isinstance(model, keras.Model):
        _clear(model)
        return model
    cache = _cache_of(model)
    _stash(model, cache)
    _clear(model)
    if cache.deferred:
        # Mid-change: the state is known again when the change is done.
        cache.key, cache.referents = None, ()
        return model
    key, referents = _state(model, cache)
    if explicit and key == cache.key:
        cache.entries.clear()
    else:
        _restore(model, cache, key)
    cache.key, cache.referents = key, referents
    cache.compile_token = _compile_token(model)
    _prune(cache, fingerprint=key[0])
    return model


def checkpoint(model):
    """Files the model's live traced functions under its current state.

    Called before a change. The state is computed now; if it is not the
    one recorded by the last `follow` (something changed without a reset,
    such as `layer.merge()` by hand), the live functions may be stale and
    are not kept.

    Args:
        model: a Keras model.
    """
    if not isinstance(model, keras.Model):
        return
    cache = _cache_of(model)
    if cache.deferred:
        return
    key, referents = _state(model, cache)
    if key != cache.key:
        cache.key, cache.referents = None, ()
        return
    # Same state (compile settings and trainable flags included): a
    # compile by hand since then does not matter.
    cache.referents = referents
    cache.compile_token = _compile_token(model)
    _stash(model, cache)


@contextlib.contextmanager
def deferred(model):
    """Around a change of several layers: files the traced functions under
    the state before it, holds off `follow` inside, and follows once after.

    Inside the block, resets only clear the live functions (each LoRA layer
    resets its models when it switches; computing the state once per layer
    would cost a model walk per layer). The new state is computed once,
    when the block ends (also on an error).

    Args:
        model: a Keras model.
    """
    if not isinstance(model, keras.Model):
        yield
        return
    checkpoint(model)
    cache = _cache_of(model)
    cache.deferred += 1
    try:
        yield
    finally:
        cache.deferred -= 1
        if not cache.deferred:
            follow(model)


@contextlib.contextmanager
def kept_through_compile(model):
    """Follows the model's state, and restores its traced functions after
    the block (a `compile`, which clears them).

    Args:
        model: a Keras model.
    """
    follow(model)
    try:
        yield
    finally:
        follow(model)


def cached_states(model):
    """How many computation states of `model` have traced functions kept.

    Args:
        model: a Keras model.

    Returns:
        An int (0 for a model never switched).
    """
    cache = model.__dict__.get(_ATTRIBUTE) if hasattr(model, "__dict__") else None
    if cache is None:
        return 0
    _prune(cache)
    return len(cache.entries)


# Steps --------------------------------------------------------------------


def _cache_of(model):
    cache = model.__dict__.get(_ATTRIBUTE)
    if cache is None:
        cache = _ModelCache()
        object.__setattr__(model, _ATTRIBUTE, cache)
    return cache


def _clear(model):
    for name in REUSABLE + NOT_REUSABLE:
        if hasattr(model, name):
            setattr(model, name, None)


def _stash(model, cache):
    """Files the live reusable functions under the state they were traced in."""
    if cache.key is None or not _same_compile(model, cache):
        return
    functions = {
        name: getattr(model, name)
        for name in REUSABLE
        if getattr(model, name, None) is not None
    }
    if not functions:
        return
    entry = cache.entries.pop(cache.key, None)
    if entry is None or not entry.alive():
        entry = _Entry(cache.referents, {})
    entry.functions.update(functions)
    cache.entries[cache.key] = entry
    while len(cache.entries) > MAX_STATES:
        cache.entries.popitem(last=False)


def _restore(model, cache, key):
    entry = cache.entries.get(key)
    if entry is None:
        return
    if not entry.alive():
        del cache.entries[key]
        return
    cache.entries.move_to_end(key)
    for name, function in entry.functions.items():
        setattr(model, name, function)


def _prune(cache, fingerprint=None):
    """Drops entries whose LoRA layers are gone and, given the model's
    current variables (`fingerprint`), those traced over other variables
    (layers rebuilt by `add_adapter`, `delete_adapter`, `merge_lora`: their
    traces would hold the old variables alive)."""
    stale = [
        key for key, entry in cache.entries.items()
        if not entry.alive() or (fingerprint is not None and key[0] != fingerprint)
    ]
    for key in stale:
        del cache.entries[key]


def _compile_token(model):
    """What `compile` replaces (weakly held): a `compile` by hand since the
    last `follow` means the state of the live functions is not known."""
    config = getattr(model, "_compile_config", None)
    return None if config is None else _weak_or_strong(config)


def _same_compile(model, cache):
    config = getattr(model, "_compile_config", None)
    token = cache.compile_token
    return (token() if token is not None else None) is config


def _state(model, cache):
    """`(key, weak references to the objects the key names by id)`."""
    weights = model.weights
    fingerprint = tuple(id(v) for v in weights)
    layers = [ref() for ref in cache.lora_layers]
    if fingerprint != cache.weights_fingerprint or any(
        layer is None for layer in layers
    ):
        from keras_lora.surgery import lora_layers

        layers = list(lora_layers(model).values())
        cache.weights_fingerprint = fingerprint
        cache.lora_layers = tuple(weakref.ref(layer) for layer in layers)
    per_layer = []
    for layer in layers:
        adapters = layer.adapters
        active = tuple(layer.active_adapters)
        per_layer.append((
            id(layer), active,
            tuple(adapters[n].scaling for n in active if n in adapters),
            bool(layer.adapter_enabled), bool(layer.merged),
        ))
    sampler = getattr(model, "sampler", None)
    distribution = keras.distribution.distribution()
    key = (
        fingerprint,
        # `trainable_variables`, without a second walk: Keras sets a
        # layer's `trainable` on its variables.
        bool(model.trainable), tuple(bool(v.trainable) for v in weights),
        tuple(per_layer),
        getattr(model, "jit_compile", None),
        getattr(model, "run_eagerly", None),
        getattr(model, "steps_per_execution", None),
        id(sampler),
        id(distribution),
    )
    referents = [weakref.ref(layer) for layer in layers]
    for thing in (sampler, distribution):
        if thing is not None:
            referents.append(_weak_or_strong(thing))
    return key, tuple(referents)


def _weak_or_strong(thing):
    try:
        return weakref.ref(thing)
    except TypeError:
        return lambda: thing
