"""Walks a Keras model's layer tree: stable paths and who holds each layer.

Works the same on every backend: sub-layers are read from the layer tracker
that Keras itself uses for `weights` (on torch a layer is also a
`torch.nn.Module` whose sub-layers live in `_modules`, not in `__dict__`, so
attribute scans would find nothing there).
"""

import collections
import re

import keras

LayerEntry = collections.namedtuple(
    "LayerEntry", ["path", "layer", "parents", "key"]
)


def sublayers(layer):
    """The direct sub-layers of `layer`, in tracking order, without inputs."""
    children = []
    seen = set()
    for child in getattr(layer, "_layers", []):
        if isinstance(child, keras.layers.InputLayer) or id(child) in seen:
            continue
        seen.add(id(child))
        children.append(child)
    return children


def walk(model, descend_into=None):
    """Lists every layer below `model` once, with its path and its parents.

    A layer's path is its ancestors' names and its own joined by `/`, from
    the model down (the model's own name is left out), e.g.
    `"transformer_layer_0/self_attention/query"`. A layer reachable by
    several routes keeps the first path (depth first, in tracking order)
    and lists every layer that holds it as a parent.

    Each entry also has a structural `key` that does not depend on
    auto-generated names: each segment is the snake-cased class name with a
    counter among its siblings of that class (`"dense"`, `"dense_1"`, ...),
    as Keras's own `.weights.h5` files key a container's children, so a
    model built twice in one process (`dense_2`, `gemma_backbone_1`, ...)
    has the same keys. A LoRA layer is keyed by its base layer's class, so
    a base model and its adapted form agree.

    Args:
        model: a Keras model or layer.
        descend_into: optional `layer -> bool`; layers for which it returns
            `False` are listed but their sub-layers are not.

    Returns:
        An ordered dict `{id(layer): LayerEntry(path, layer, parents)}`.
    """
    entries = collections.OrderedDict()

    def visit(layer, path, key):
        if descend_into is not None and not descend_into(layer):
            return
        taken = collections.Counter()
        classes = collections.Counter()
        for child in sublayers(layer):
            if id(child) in entries:
                entries[id(child)].parents.append(layer)
                continue
            taken[child.name] += 1
            segment = child.name
            if taken[child.name] > 1:
                segment = f"{child.name}__{taken[child.name]}"
            child_path = f"{path}/{segment}" if path else segment
            kind = class_key(child)
            key_segment = f"{kind}_{classes[kind]}" if classes[kind] else kind
            classes[kind] += 1
            child_key = f"{key}/{key_segment}" if key else key_segment
            entries[id(child)] = LayerEntry(child_path, child, [layer], child_key)
            visit(child, child_path, child_key)

    visit(model, "", "")
    return entries


def class_key(layer):
    """The snake-cased class name keying `layer` among its siblings.

    A LoRA layer (anything with a `base_layer_class` and a `base_layer`)
    answers for its base layer's class.
    """
    base = getattr(layer, "base_layer", None)
    cls = type(base) if (
        base is not None and hasattr(type(layer), "base_layer_class")
    ) else type(layer)
    name = re.sub(r"\W+", "", cls.__name__)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def own_variables(layer):
    """Variables created by `layer` itself, not by its sub-layers."""
    inner = {id(v) for child in sublayers(layer) for v in child.weights}
    return [v for v in layer.weights if id(v) not in inner]
