"""`apply_lora`: turn a model's Dense/EinsumDense layers into LoRA layers."""

import collections
import collections.abc
import dataclasses
import inspect
import math
import warnings

import keras

from keras_lora import config as lora_config
from keras_lora import hub
from keras_lora import init_methods
from keras_lora import model_walk
from keras_lora import targeting
from keras_lora import trained_weights
from keras_lora.layers import LORA_LAYER_FOR
from keras_lora.layers import LoRALayer
from keras_lora.layers import is_default_target
from keras_lora.layers import lora_class_for
from keras_lora.layers import supported_types
from keras_lora.layers.adapter import validate_adapter_name
from keras_lora.layers.owners import register_owner
from keras_lora.transaction import Transaction


@dataclasses.dataclass
class _Plan:
    path: str
    layer: keras.layers.Layer
    parents: list
    lora_class: type
    rank: int
    alpha: float


@dataclasses.dataclass
class LoraPlan:
    """What `apply_lora` will do, validated, before anything changed.

    Attributes:
        model: the model to adapt.
        layers: one `_Plan` per layer to adapt, in walk order.
        trainable_layers: the layers kept fully trainable.
        options: the LoRA arguments shared by every layer.
        narrow: `(path, d_in, d_out, rank)` of layers narrower than their
            rank (accepted; `apply_lora` warns once).
    """

    model: keras.layers.Layer
    layers: list
    trainable_layers: list
    options: dict
    narrow: list
    init: str = "default"

    @property
    def paths(self):
        return [plan.path for plan in self.layers]


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
    adapter_name="default",
    use_dora=False,
    init="default",
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
    the adapted model's layers (`clone_with_lora` returns an adapted copy
    instead). If the model was compiled, it is compiled again with the same
    settings (a fresh optimizer for the new trainable variables).

    A rank above a layer's width (a `Dense(1)` head, a 3-class output) is
    accepted, as by PEFT: the update is full-rank there. One `UserWarning`
    per call lists such layers and suggests `trainable=[...]` or
    `rank_pattern`.

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
        use_rslora: bool, scale by `alpha / sqrt(rank)` (rank-stabilized
            LoRA).
        rank_pattern: a mapping `{pattern: rank}` overriding `rank` per
            layer.
        alpha_pattern: a mapping `{pattern: alpha}` overriding `alpha` per
            layer.
        train_bias: bool, keep the biases of adapted layers trainable.
        trainable: patterns of layers whose weights all stay trainable (for
            example a new classification head); they are not adapted.
        lora_a_initializer: initializer of every `lora_a`.
        lora_b_initializer: initializer of every `lora_b` (zeros).
        adapter_name: the name of the adapter created (a Python
            identifier); add more with `keras_lora.add_adapter`.
        use_dora: bool, weight-decomposed LoRA (DoRA, see
            `keras_lora/layers/dora.py`) on Dense / EinsumDense layers: a
            trainable magnitude per output unit, the norm computed from
            small products, never from `W + s·A·B`.
        init: how the adapters start (PEFT's `init_lora_weights`, see
            `keras_lora.init_methods`): `"default"` (the initializers),
            `"gaussian"` (`A ~ N(0, 1/rank²)`, `B = 0`), `"pissa"` /
            `"pissa_niter_N"` (top singular triplets of each kernel, exact
            or randomized with `N` subspace iterations) or `"olora"` (QR).
            PiSSA and OLoRA (Dense / EinsumDense only) replace each base
            kernel by the residual `W − s·A·B`, so outputs are unchanged;
            `save_adapter` then writes an adapter for the original base.

    Returns:
        `model`, adapted.

    Raises:
        ValueError: for an unbuilt model, a model that already has LoRA
            layers, targets that match nothing, bad rank/alpha/dropout, a
            scaling or an initial adapter that is not finite.
        TypeError: for a model that is not a Keras layer, a non-bool flag,
            a pattern map that is not a mapping, or a target that names a
            layer (or layer class) keras-lora cannot adapt.
        In every case the model is left untouched: the request is validated
        first, and the changes run in a `Transaction` that undoes them if a
        later step (an initializer, say) fails.

    Example:

    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model = apply_lora(model, rank=2)
    >>> [v.path for v in model.trainable_variables]
    ['sequential/dense/lora_a', 'sequential/dense/lora_b']
    """
    plan = plan_lora(
        model, rank=rank, alpha=alpha, targets=targets, exclude=exclude,
        dropout=dropout, use_rslora=use_rslora, rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern, train_bias=train_bias,
        trainable=trainable, lora_a_initializer=lora_a_initializer,
        lora_b_initializer=lora_b_initializer, adapter_name=adapter_name,
        use_dora=use_dora, init=init,
    )
    with Transaction(model) as change:
        execute_plan(plan, change)
    warn_narrow_layers(plan)
    recompile(model)
    return model


def plan_lora(model, rank=8, alpha=None, targets=None, exclude=None,
              dropout=0.0, use_rslora=False, rank_pattern=None,
              alpha_pattern=None, train_bias=False, trainable=None,
              lora_a_initializer="he_uniform", lora_b_initializer="zeros",
              adapter_name="default", use_dora=False, init="default"):
    """Validates an `apply_lora` request and lists what it would adapt.

    Nothing is changed. Takes `apply_lora`'s arguments.

    Returns:
        A `LoraPlan`.
    """
    check_model(model)
    validate_adapter_name(adapter_name, "apply_lora: ")
    lora_config.validate_rank(rank)
    lora_config.validate_alpha(alpha, rank)
    lora_config.validate_dropout(dropout)
    lora_config.validate_bool(use_rslora, "use_rslora", "apply_lora: ")
    lora_config.validate_bool(train_bias, "train_bias", "apply_lora: ")
    lora_config.validate_bool(use_dora, "use_dora", "apply_lora: ")
    init_methods.validate_init(init, "apply_lora: ")
    init_methods.check_initializers(
        init, lora_a_initializer, lora_b_initializer, "apply_lora: "
    )
    for name, pattern_map in (("rank_pattern", rank_pattern),
                              ("alpha_pattern", alpha_pattern)):
        if pattern_map is not None and not isinstance(
            pattern_map, collections.abc.Mapping
        ):
            raise TypeError(
                f"apply_lora: `{name}` must be a mapping {{pattern: value}} "
                f"(first match wins). Received: {name}={pattern_map!r} of "
                f"type {type(pattern_map).__name__}"
            )
    for pattern, value in (rank_pattern or {}).items():
        lora_config.validate_rank(value, f"rank_pattern[{pattern!r}]: ")
    for pattern, value in (alpha_pattern or {}).items():
        lora_config.validate_alpha(value, rank, f"alpha_pattern[{pattern!r}]: ")
    initializers = {}
    for name, value in (("lora_a_initializer", lora_a_initializer),
                        ("lora_b_initializer", lora_b_initializer)):
        try:
            initializers[name] = keras.initializers.get(value)
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"apply_lora: `{name}` is not a Keras initializer. "
                f"Received: {name}={value!r} ({error})"
            ) from None
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
    for pattern in target_patterns:
        _check_target_class(pattern)
    exclude_patterns = targeting.as_pattern_list(exclude)
    if target_patterns:
        chosen = _select(entries, target_patterns, "targets", expand=True)
    else:
        chosen = [e for e in entries.values() if is_default_target(e.layer)]
    inside_trainable = _descendant_ids(entries, trainable_layers)
    plans, narrow = [], []
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
        lora_config.validate_scaling(
            layer_rank, layer_alpha, use_rslora,
            f"apply_lora: layer '{entry.path}': ",
        )
        lora_class._check_base_layer(entry.layer)
        if use_dora:
            lora_class._check_dora(entry.layer, f"apply_lora: layer '{entry.path}': ")
        init_methods.check_layer(
            lora_class, entry.layer, layer_rank, init, use_dora,
            f"apply_lora: layer '{entry.path}': ",
        )
        width = lora_class.width_below_rank(entry.layer, layer_rank)
        if width is not None:
            narrow.append((entry.path, *width, layer_rank))
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
    options = dict(
        dropout=dropout, use_rslora=bool(use_rslora),
        train_bias=bool(train_bias), adapter_name=adapter_name,
        use_dora=bool(use_dora), **initializers,
    )
    return LoraPlan(
        model, plans, [e.layer for e in trainable_layers], options, narrow,
        init,
    )


def execute_plan(plan, change):
    """Carries out a `LoraPlan` through a `Transaction`.

    Every LoRA layer is created (adapters initialized) before the first
    swap, so an initializer failing on a late layer changes nothing; the
    swaps and flags are recorded in `change`, which undoes them if a later
    step raises.

    Args:
        plan: a `LoraPlan` from `plan_lora`.
        change: the open `Transaction` on `plan.model`.

    Returns:
        The new LoRA layers, in plan order.
    """
    adapted = [
        item.lora_class(
            base_layer=item.layer, rank=item.rank, alpha=item.alpha,
            **layer_options(plan, item),
        )
        for item in plan.layers
    ]
    for lora_layer in adapted:
        init_methods.initialize(
            lora_layer, plan.options["adapter_name"], plan.init, change
        )
    for item, lora_layer in zip(plan.layers, adapted):
        for parent in item.parents:
            change.swap(parent, item.layer, lora_layer)
    freeze(plan.model, adapted, plan.trainable_layers)
    trained_weights.remember(plan.model, _trained_variables(
        adapted, plan.trainable_layers
    ))
    for lora_layer in adapted:
        register_owner(lora_layer, plan.model)
    return adapted


def layer_options(plan, item):
    """The LoRA layer arguments for one planned layer (`plan.options`, with
    the per-layer initializer `plan.init` may need)."""
    return init_methods.layer_options(
        plan.options, item.lora_class, item.rank, plan.init
    )


def warn_narrow_layers(plan):
    """One `UserWarning` listing the layers narrower than their rank."""
    if not plan.narrow:
        return
    shown = ", ".join(
        f"'{path}' (kernel {d_in}x{d_out}, rank {rank})"
        for path, d_in, d_out, rank in plan.narrow[:8]
    )
    more = f", ... ({len(plan.narrow)} in all)" if len(plan.narrow) > 8 else ""
    first = plan.narrow[0][0]
    warnings.warn(
        f"apply_lora: {len(plan.narrow)} layer(s) are narrower than their "
        f"rank, so their update is full-rank there: {shown}{more}. A narrow "
        f"head usually trains better fully: pass trainable=[{first!r}] (it "
        f"is then not adapted), or lower its rank with "
        f"rank_pattern={{{first!r}: 1}}.",
        UserWarning,
        stacklevel=3,
    )


def check_model(model):
    """Raises a `TypeError` unless `model` is a Keras layer or model."""
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            "keras-lora: `model` must be a built Keras model or layer. "
            f"Received: model={model!r} of type {type(model).__name__}"
        )


def _check_target_class(pattern):
    """A layer class as target must be one keras-lora can adapt (or a base)."""
    if not isinstance(pattern, type):
        return
    supported = [base for base, _ in LORA_LAYER_FOR]
    if any(issubclass(pattern, base) or issubclass(base, pattern)
           for base in supported):
        return
    raise TypeError(
        f"apply_lora: keras-lora cannot adapt {pattern.__name__} layers. "
        f"Received: targets={pattern.__name__}. Supported types: "
        f"{', '.join(supported_types())}."
    )


def _trained_variables(adapted, trainable_layers):
    """The non-adapter variables left trainable: remembered so that a later
    `load_adapter` of a file that does not carry them can restore them."""
    variables = [v for layer in trainable_layers for v in layer.weights]
    variables += [
        layer.base_layer.bias for layer in adapted
        if layer.train_bias and getattr(layer.base_layer, "bias", None) is not None
    ]
    return variables


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


def freeze(model, adapted, trainable_layers):
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
            # TensorFlow skips the variables when the flag was already
            # False (a layer a previous adapter trained fully).
            for variable in layer.weights:
                variable.trainable = False
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


def recompile(model):
    """Compiles `model` again with its own settings (keras-hub sampler kept)
    and resets its traced functions (those traced in the model's current
    state are kept, see `keras_lora/traced_cache.py`); the compile is a
    no-op for an uncompiled model."""
    from keras_lora import traced_cache

    if not isinstance(model, keras.Model):
        return
    with traced_cache.kept_through_compile(model):
        compile_like(model, model)


def compile_like(model, source):
    """Compiles `model` with `source`'s compile settings, if it has any.

    A fresh optimizer is made from the saved optimizer config. keras-hub's
    `CausalLM` takes its `sampler` in `compile` but leaves it out of the
    compile config, so `source.sampler` is passed along.

    Args:
        model: the Keras model to compile.
        source: the model whose settings to use (may be `model`).
    """
    if not isinstance(model, keras.Model) or not getattr(source, "compiled", False):
        return
    compile_config = source.get_compile_config()
    if not compile_config:
        return
    arguments = keras.saving.deserialize_keras_object(compile_config)
    if getattr(source, "sampler", None) is not None and (
        "sampler" in inspect.signature(model.compile).parameters
    ):
        arguments["sampler"] = source.sampler
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
