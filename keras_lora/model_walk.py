"""Walks a Keras model's layer tree: stable paths and who holds each layer.

Works the same on every backend: sub-layers are read from the layer tracker
that Keras itself uses for `weights` (on torch a layer is also a
`torch.nn.Module` whose sub-layers live in `_modules`, not in `__dict__`, so
attribute scans would find nothing there).
"""

import collections

import keras

LayerEntry = collections.namedtuple("LayerEntry", ["path", "layer", "parents"])


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

    Args:
        model: a Keras model or layer.
        descend_into: optional `layer -> bool`; layers for which it returns
            `False` are listed but their sub-layers are not.

    Returns:
        An ordered dict `{id(layer): LayerEntry(path, layer, parents)}`.
    """
    entries = collections.OrderedDict()

    def visit(layer, path):
        if descend_into is not None and not descend_into(layer):
            return
        taken = collections.Counter()
        for child in sublayers(layer):
            if id(child) in entries:
                entries[id(child)].parents.append(layer)
                continue
            taken[child.name] += 1
            segment = child.name
            if taken[child.name] > 1:
                segment = f"{child.name}__{taken[child.name]}"
            child_path = f"{path}/{segment}" if path else segment
            entries[id(child)] = LayerEntry(child_path, child, [layer])
            visit(child, child_path)

    visit(model, "")
    return entries


def own_variables(layer):
    """Variables created by `layer` itself, not by its sub-layers."""
    inner = {id(v) for child in sublayers(layer) for v in child.weights}
    return [v for v in layer.weights if id(v) not in inner]
