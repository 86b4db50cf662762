"""Replaces one layer by another inside the layers that hold it, in place.

A layer can be held three ways, and all are rewritten:

1. as an attribute or list/dict element of its parent (`self.up = Dense()`),
   plus the parent's layer tracker (which feeds `weights`);
2. as an operation of a functional graph (nodes of a `Functional` model,
   including keras-hub's functional subclasses, and the graph a
   `Sequential` model builds);
3. as an element of `Sequential`'s layer list.

Keras has no public API for this. Built layers lock their tracker, so the
tracker is told about the swap through `replace_tracked_value` (the hook
Keras offers for exactly this) before the attribute is set; functional
graph nodes are re-pointed at the new layer, keeping their node indices, so
`get_config`, saving and `summary` see the new layer where the old one was.
"""

import keras
from keras.src.ops.function import make_node_key

# Attributes that hold Keras bookkeeping, never a user-visible layer slot.
_SKIPPED_ATTRIBUTES = frozenset(
    {"_tracker", "_inbound_nodes", "_outbound_nodes"}
)


def replace_layer(parent, old, new):
    """Makes `parent` use `new` wherever it used `old`.

    Args:
        parent: a layer or model that holds `old`.
        old: the layer to replace.
        new: the layer to put in its place.

    Returns:
        The number of references rewritten (0 if `parent` did not hold
        `old`).
    """
    count = _replace_in_tracker(parent, old, new)
    count += _replace_in_attributes(parent, old, new)
    if isinstance(parent, keras.Model):
        count += _replace_in_graph(parent, old, new)
        functional = getattr(parent, "_functional", None)  # Sequential
        if functional is not None and functional is not old:
            _replace_in_tracker(functional, old, new)
            _replace_in_attributes(functional, old, new)
            count += _replace_in_graph(functional, old, new)
    _refresh_torch_parameters(parent)
    return count


def _replace_in_tracker(parent, old, new):
    tracker = getattr(parent, "_tracker", None)
    if tracker is None or not tracker.is_in_store("layers", old):
        return 0
    if tracker.is_in_store("layers", new):
        tracker.untrack(old)
    else:
        tracker.replace_tracked_value("layers", old, new)
    return 1


def _attribute_items(parent):
    items = list(vars(parent).items())
    # On torch, sub-layers set as attributes live in nn.Module._modules.
    items += list(vars(parent).get("_modules", {}).items())
    return [(k, v) for k, v in items if k not in _SKIPPED_ATTRIBUTES]


def _replace_in_attributes(parent, old, new):
    count = 0
    for name, value in _attribute_items(parent):
        if value is old:
            setattr(parent, name, new)
            count += 1
        elif isinstance(value, list):
            count += _replace_in_list(value, old, new)
        elif isinstance(value, tuple) and any(v is old for v in value):
            replaced = [new if v is old else v for v in value]
            object.__setattr__(parent, name, type(value)(replaced))
            count += 1
        elif isinstance(value, dict):
            for key, item in list(value.items()):
                if item is old:
                    value[key] = new
                    count += 1
                elif isinstance(item, list):
                    count += _replace_in_list(item, old, new)
    return count


def _replace_in_list(values, old, new):
    count = 0
    for index, item in enumerate(values):
        if item is old:
            # The tracker already knows `new`, so a tracked list's
            # __setitem__ adds nothing (and TF's ListWrapper needs it).
            values[index] = new
            count += 1
    return count


def _replace_in_graph(model, old, new):
    nodes_by_depth = getattr(model, "_nodes_by_depth", None)
    if not nodes_by_depth:
        return 0
    count = 0
    for nodes in nodes_by_depth.values():
        for node in nodes:
            if node.operation is not old:
                continue
            node.operation = new
            for tensor in node.outputs:
                history = getattr(tensor, "_keras_history", None)
                if history is not None and history.operation is old:
                    tensor._keras_history = history._replace(operation=new)
            count += 1
    if count:
        # Node indices index into the operation's inbound nodes: share them,
        # and re-key the graph's node set, which is keyed by operation id.
        new._inbound_nodes = old._inbound_nodes
        new._outbound_nodes = old._outbound_nodes
        node_keys = getattr(model, "_nodes", None)
        if node_keys is not None:
            for index in range(len(old._inbound_nodes)):
                old_key = make_node_key(old, index)
                if old_key in node_keys:
                    node_keys.discard(old_key)
                    node_keys.add(make_node_key(new, index))
    return count


def _refresh_torch_parameters(layer):
    # On torch, a built layer caches its variables in a ParameterDict.
    if keras.backend.backend() == "torch" and hasattr(layer, "_torch_params"):
        layer._track_variables()
