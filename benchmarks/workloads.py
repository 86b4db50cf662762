"""The models the benchmarks train: an MLP and a keras-hub BERT stack.

Every builder seeds Keras first, so two calls with the same sizes give
models with the same weights; each variant is built from its own copy.
"""

import numpy as np

import keras

from benchmarks.names import ALL_LINEAR  # noqa: F401
from benchmarks.names import ATTENTION
from benchmarks.names import FEED_FORWARD
from benchmarks.names import MLP
from benchmarks.names import QUERY_VALUE
from benchmarks.names import TRANSFORMER  # noqa: F401

# Attention projections keras-hub's `backbone.enable_lora` adapts.

_QUERY_VALUE_NAMES = ("query", "value")


def build_mlp(sizes, seed=0):
    """A Sequential stack of `mlp_depth` Dense layers (ReLU between)."""
    keras.utils.set_random_seed(seed)
    layers = [
        keras.layers.Dense(
            sizes.mlp_width,
            activation="relu" if i < sizes.mlp_depth - 1 else None,
            name=f"dense_{i}",
        )
        for i in range(sizes.mlp_depth)
    ]
    return keras.Sequential(
        [keras.Input((sizes.mlp_width,)), *layers], name="mlp"
    )


def mlp_batch(sizes):
    """`(x, y)` numpy arrays for one MLP step."""
    rng = np.random.default_rng(0)
    shape = (sizes.mlp_batch, sizes.mlp_width)
    return (
        rng.standard_normal(shape, dtype="float32"),
        rng.standard_normal(shape, dtype="float32"),
    )


def build_backbone(sizes, num_layers=None, seed=0):
    """A randomly initialised keras-hub `BertBackbone` of the given sizes."""
    import keras_hub

    keras.utils.set_random_seed(seed)
    return keras_hub.models.BertBackbone(
        vocabulary_size=sizes.vocab,
        num_layers=num_layers or sizes.num_layers,
        num_heads=sizes.num_heads,
        hidden_dim=sizes.hidden_dim,
        intermediate_dim=sizes.intermediate_dim,
        max_sequence_length=sizes.seq_len,
    )


def build_transformer(sizes, seed=0):
    """A model from token inputs to BERT's sequence output.

    The pooler is left out, so every Dense/EinsumDense of the model sits in
    a transformer layer and lies on the loss's gradient path.

    Returns:
        `(model, backbone)`; the model shares the backbone's layers.
    """
    backbone = build_backbone(sizes, seed=seed)
    model = keras.Model(
        backbone.input, backbone.output["sequence_output"], name="bert_seq"
    )
    return model, backbone


def transformer_batch(sizes):
    """`(x, y)` for one transformer step: token inputs and a random target."""
    rng = np.random.default_rng(0)
    shape = (sizes.seq_batch, sizes.seq_len)
    x = {
        "token_ids": rng.integers(0, sizes.vocab, shape).astype("int32"),
        "segment_ids": np.zeros(shape, "int32"),
        "padding_mask": np.ones(shape, "int32"),
    }
    y = rng.standard_normal(shape + (sizes.hidden_dim,), dtype="float32")
    return x, y


def linear_layer_types():
    return (keras.layers.Dense, keras.layers.EinsumDense)


def is_target(layer, targets):
    """Whether `layer` is adapted under the target set `targets`."""
    if not isinstance(layer, linear_layer_types()):
        return False
    if targets == QUERY_VALUE:
        return layer.name in _QUERY_VALUE_NAMES
    if targets == FEED_FORWARD:
        return type(layer) is keras.layers.Dense
    if targets == ATTENTION:
        return isinstance(layer, keras.layers.EinsumDense)
    return True


def all_layers(model):
    """Every layer inside `model` (depth first), the model excluded."""
    return list(model._flatten_layers(include_self=False))


def target_layers(model, targets):
    """The layers of `model` adapted under `targets`, in model order."""
    return [layer for layer in all_layers(model) if is_target(layer, targets)]
