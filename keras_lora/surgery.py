"""`apply_lora`: turn a model's Dense/EinsumDense layers into LoRA layers."""

import collections
import dataclasses
import inspect
import math

import keras

from keras_lora import config as lora_config
from keras_lora import hub
from keras_lora import layer_swap
from keras_lora import model_walk
from keras_lora import targeting
from keras_lora.layers import LoRALayer
from keras_lora.layers import lora_class_for
from keras_lora.layers import supported_types


@dataclasses.dataclass
class _Plan:
    path: str
    layer: keras.layers.Layer
    parents: list
    lora_class: type
    rank: int
    alpha: float


def apply_lora(
    model,
    rank=8,
    alpha=None,
    targets=None,
    exclude=None,
    dropout=0.0,
    use_rslora=False,
    rank_pattern=None,
    alpha_pattern=None,
    train_bias=False,
    trainable=None,
    lora_a_initializer="he_uniform",
    lora_b_initializer="zeros",
):
    """Adapts a built model with LoRA, in place, and returns it.

    Every target layer (by default every `Dense` and `EinsumDense`, at any
    depth: in functional graphs, `Sequential` models, nested models, custom
    layers and subclassed models) is replaced by a LoRA layer that shares
    its variables; every other variable is frozen. Outputs are unchanged at
    the moment of application (`lora_b` starts at zero).

    The model object itself is modified and returned: it keeps its class and
    methods (a keras-hub `GPT2CausalLM` still generates), and no weight is
    copied, so a large base does not double in memory. As with PEFT, keep
    no separate "base" handle expecting it to stay untouched: its layers are
    the adapted model's layers. If the model was compiled, it is compiled
    again with the same settings (a fresh optimizer for the new trainable
    variables).

    Args:
        model: a built Keras model (or layer).
        rank: positive int, the default adapter rank.
        alpha: positive float, the default LoRA alpha (defaults to `rank`).
        targets: which layers to adapt (see `keras_lora.targeting`): names,
            paths, path suffixes, globs, compiled regexes, layer classes,
            callables `(path, layer) -> bool`, or a preset (`"all-linear"`,
            `"attention"`, `"query_value"`). `None` means every supported
            layer. An exact name that selects a container layer (an
            attention block) targets the supported layers inside it.
        exclude: patterns of layers never to adapt.
        dropout: float in [0, 1), dropout on the LoRA path's input.
        use_rslora: scale by `alpha / sqrt(rank)` (rank-stabilized LoRA).
        rank_pattern: `{pattern: rank}` overriding `rank` per layer.
        alpha_pattern: `{pattern: alpha}` overriding `alpha` per layer.
        train_bias: keep the biases of adapted layers trainable.
        trainable: patterns of layers whose weights all stay trainable (for
            example a new classification head); they are not adapted.
        lora_a_initializer: initializer of every `lora_a`.
        lora_b_initializer: initializer of every `lora_b` (zeros).

    Returns:
        `model`, adapted.

    Raises:
        ValueError: for an unbuilt model, a model that already has LoRA
            layers, targets that match nothing, bad rank/alpha/dropout.
        TypeError: for a target that names a layer keras-lora cannot adapt.
        In every case the model is left untouched.

    Example:

    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model = apply_lora(model, rank=2)
    >>> [v.path for v in model.trainable_variables]
    ['sequential/dense/lora_a', 'sequential/dense/lora_b']
    """
    plans, trainable_layers = _plan(
        model, rank, alpha, targets, exclude, dropout,
        rank_pattern, alpha_pattern, trainable,
    )
    # Everything is validated; from here on the model changes.
    adapted = []
    for plan in plans:
        lora_layer = plan.lora_class(
            base_layer=plan.layer,
            rank=plan.rank,
            alpha=plan.alpha,
            dropout=dropout,
            use_rslora=use_rslora,
            lora_a_initializer=lora_a_initializer,
            lora_b_initializer=lora_b_initializer,
            train_bias=train_bias,
        )
        for parent in plan.parents:
            layer_swap.replace_layer(parent, plan.layer, lora_layer)
        adapted.append(lora_layer)
    _freeze(model, adapted, trainable_layers)
    _recompile(model)
    return model


def _plan(model, rank, alpha, targets, exclude, dropout, rank_pattern,
          alpha_pattern, trainable):
    """Validates the request and lists what to adapt, changing nothing."""
    lora_config.validate_rank(rank)
    lora_config.validate_alpha(alpha, rank)
    lora_config.validate_dropout(dropout)
    for pattern, value in (rank_pattern or {}).items():
        lora_config.validate_rank(value, f"rank_pattern[{pattern!r}]: ")
    for pattern, value in (alpha_pattern or {}).items():
        lora_config.validate_alpha(value, rank, f"alpha_pattern[{pattern!r}]: ")
    if not getattr(model, "built", False):
        raise ValueError(
            f"apply_lora needs a built model, but '{model.name}' is not "
            "built. Call it on data or call `model.build(input_shape)` first."
        )
    entries = model_walk.walk(model)
    existing = [e.path for e in entries.values() if isinstance(e.layer, LoRALayer)]
    if existing:
        raise ValueError(
            f"Model '{model.name}' already has LoRA layers "
            f"({_sample(existing)}). Load or merge its adapter instead of "
            "applying LoRA twice."
        )
    trainable_patterns = targeting.as_pattern_list(trainable)
    trainable_layers = _select(entries, trainable_patterns, "trainable")
    target_patterns = targeting.as_pattern_list(targets)
    exclude_patterns = targeting.as_pattern_list(exclude)
    if target_patterns:
        chosen = _select(entries, target_patterns, "targets", expand=True)
    else:
        chosen = [e for e in entries.values() if lora_class_for(e.layer)]
    inside_trainable = _descendant_ids(entries, trainable_layers)
    plans = []
    for entry in chosen:
        if (
            targeting.matches_any(exclude_patterns, entry.path, entry.layer)
            or id(entry.layer) in inside_trainable
        ):
            continue
        lora_class = lora_class_for(entry.layer)
        if not entry.layer.built:
            raise ValueError(
                f"apply_lora: layer '{entry.path}' is not built; build the "
                "model on data first."
            )
        layer_rank = targeting.value_for(rank_pattern, entry.path, entry.layer, rank)
        layer_alpha = lora_config.validate_alpha(
            targeting.value_for(alpha_pattern, entry.path, entry.layer, alpha),
            layer_rank,
        )
        lora_class._check_base_layer(entry.layer)
        try:
            lora_class._check_rank_fits(entry.layer, layer_rank)
        except ValueError as error:
            raise ValueError(
                f"{error} Lower its rank with rank_pattern={{{entry.path!r}: "
                f"...}}, or leave it out with exclude=[{entry.path!r}]."
            ) from None
        plans.append(
            _Plan(entry.path, entry.layer, entry.parents, lora_class,
                  layer_rank, layer_alpha)
        )
    if not plans:
        raise ValueError(
            f"apply_lora: no layer of model '{model.name}' is left to adapt "
            f"(targets={_describe(target_patterns)}, "
            f"exclude={_describe(exclude_patterns)}). Supported layers in "
            f"the model: {_sample(_supported_paths(entries))}"
        )
    return plans, [e.layer for e in trainable_layers]


def _select(entries, patterns, argument, expand=False):
    """The entries matched by `patterns`; each pattern must match one."""
    chosen = collections.OrderedDict()
    for pattern in patterns:
        candidates = entries.values()
        if expand and not targeting.is_exact(pattern):
            # Globs, regexes, classes and callables pick adaptable layers
            # only (a callable never sees a layer it could not target).
            candidates = [e for e in candidates if lora_class_for(e.layer)]
        found = [
            e for e in candidates
            if targeting.matches(pattern, e.path, e.layer)
        ]
        if expand:
            found = _expand_targets(entries, pattern, found)
        if not found:
            raise ValueError(
                f"apply_lora: {argument} pattern {targeting.describe(pattern)} "
                f"matches no layer. Some layers in the model: "
                f"{_sample(_supported_paths(entries) or [e.path for e in entries.values()])}"
            )
        for entry in found:
            chosen[id(entry.layer)] = entry
    return list(chosen.values())


def _expand_targets(entries, pattern, found):
    """Keeps adaptable layers; an exact name of a container means its insides."""
    result = []
    for entry in found:
        if lora_class_for(entry.layer):
            result.append(entry)
            continue
        inner = [
            e for e in entries.values()
            if e.path.startswith(entry.path + "/") and lora_class_for(e.layer)
        ]
        if not inner:
            raise TypeError(
                f"apply_lora: target {targeting.describe(pattern)} selects "
                f"layer '{entry.path}' of type {type(entry.layer).__name__}, "
                f"which keras-lora cannot adapt. Supported types: "
                f"{', '.join(supported_types())}."
            )
        result.extend(inner)
    return result


def _descendant_ids(entries, chosen):
    ids = set()
    for entry in chosen:
        ids.add(id(entry.layer))
        ids.update(
            id(e.layer) for e in entries.values()
            if e.path.startswith(entry.path + "/")
        )
    return ids


def _freeze(model, adapted, trainable_layers):
    """Only adapters (and biases / layers asked for) stay trainable."""
    adapted_ids = {id(layer) for layer in adapted}
    for entry in model_walk.walk(
        model, descend_into=lambda layer: id(layer) not in adapted_ids
    ).values():
        layer = entry.layer
        if id(layer) in adapted_ids:
            continue
        if not model_walk.sublayers(layer):
            # Leaf layers: a frozen BatchNormalization must also stop
            # updating its moving statistics, which `trainable` controls.
            layer.trainable = False
        else:
            for variable in model_walk.own_variables(layer):
                variable.trainable = False
    for variable in model_walk.own_variables(model):
        variable.trainable = False
    for layer in adapted:
        layer.trainable = True
        layer._freeze_base()
    for layer in trainable_layers:
        layer.trainable = True


def _recompile(model):
    if not isinstance(model, keras.Model):
        return
    hub.reset_compiled_functions(model)
    if getattr(model, "compiled", False):
        compile_config = model.get_compile_config()
        if compile_config:
            arguments = keras.saving.deserialize_keras_object(compile_config)
            # keras-hub's CausalLM takes its `sampler` in `compile` but
            # leaves it out of the compile config; keep the user's choice.
            if getattr(model, "sampler", None) is not None and (
                "sampler" in inspect.signature(model.compile).parameters
            ):
                arguments["sampler"] = model.sampler
            model.compile(**arguments)


def lora_layers(model):
    """Every LoRA layer in `model`, nested ones included, by path.

    Args:
        model: a Keras model or layer.

    Returns:
        An ordered dict `{path: LoRALayer}` in a stable (tracking) order.

    Example:

    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> list(lora_layers(apply_lora(model, rank=2)))
    ['dense']
    """
    return collections.OrderedDict(
        (entry.path, entry.layer) for entry in lora_entries(model)
    )


def lora_entries(model):
    """Every LoRA layer with its path and the layers holding it.

    Args:
        model: a Keras model or layer.

    Returns:
        A list of `model_walk.LayerEntry(path, layer, parents)`.
    """
    entries = model_walk.walk(
        model, descend_into=lambda layer: not isinstance(layer, LoRALayer)
    )
    return [e for e in entries.values() if isinstance(e.layer, LoRALayer)]


def trainable_parameter_report(model):
    """PEFT-style summary: trainable, total and trainable share of params.

    Args:
        model: a Keras model.

    Returns:
        A string like
        `"trainable params: 1,168 || all params: 11,168 || trainable%: 10.4585"`.
    """
    trainable = _count(model.trainable_weights)
    total = _count(model.weights)
    share = 100.0 * trainable / total if total else 0.0
    return (
        f"trainable params: {trainable:,} || all params: {total:,} || "
        f"trainable%: {share:.4f}"
    )


def print_trainable_parameters(model):
    """Prints `trainable_parameter_report(model)`."""
    print(trainable_parameter_report(model))


def _count(variables):
    seen, total = set(), 0
    for variable in variables:
        if id(variable) not in seen:
            seen.add(id(variable))
            total += math.prod(int(d) for d in variable.shape)
    return total


def _supported_paths(entries):
    return [e.path for e in entries.values() if lora_class_for(e.layer)]


def _sample(paths, limit=8):
    shown = ", ".join(repr(p) for p in paths[:limit])
    more = f", ... ({len(paths)} in all)" if len(paths) > limit else ""
    return f"[{shown}{more}]"


def _describe(patterns):
    return "[" + ", ".join(targeting.describe(p) for p in patterns) + "]" if patterns else "None"
