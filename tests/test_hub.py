"""apply_lora on keras-hub backbones and tasks, built from tiny configs.

One table of tiny models (BERT, GPT-2, Gemma, Llama 3: 2 layers, hidden
size 16) run through shared checks: the task keeps its class and its
`generate`, greedy generation with a non-zero adapter equals greedy
generation after merging it, the "query_value" preset picks exactly what
keras-hub's own `enable_lora` picks, and the trainable parameter counts
relate to `enable_lora`'s as the two factorizations say.
"""

import importlib.util
import os
import sys

import keras
import numpy as np
import pytest

import keras_lora
from keras_lora import hub
from keras_lora import model_walk

import keras_hub  # noqa: E402

RANK = 2
VOCABULARY = 64
EXAMPLES_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"
)


def load_example(name):
    """Imports `examples/<name>.py` (examples import `examples/_common.py`)."""
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(EXAMPLES_DIR, name + ".py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, EXAMPLES_DIR)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(EXAMPLES_DIR)
    return module


def bert_backbone():
    return keras_hub.models.BertBackbone(
        vocabulary_size=VOCABULARY, num_layers=2, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=16,
    )


def gpt2_backbone():
    return keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCABULARY, num_layers=2, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=16,
    )


def gemma_backbone():
    # Gemma's query kernel is (heads, hidden, head_dim): the contracted
    # axis sits in the middle.
    return keras_hub.models.GemmaBackbone(
        vocabulary_size=VOCABULARY, num_layers=2, num_query_heads=2,
        num_key_value_heads=1, hidden_dim=16, intermediate_dim=32, head_dim=8,
    )


def llama3_backbone():
    return keras_hub.models.Llama3Backbone(
        vocabulary_size=VOCABULARY, num_layers=2, num_query_heads=2,
        num_key_value_heads=1, hidden_dim=16, intermediate_dim=32,
    )


BACKBONES = [
    ("bert", bert_backbone),
    ("gpt2", gpt2_backbone),
    ("gemma", gemma_backbone),
    ("llama3", llama3_backbone),
]

# Path of the attention block inside transformer layer `i`.
ATTENTION_PATHS = {
    "bert": "transformer_layer_{i}/self_attention_layer",
    "gpt2": "transformer_layer_{i}/self_attention",
    "gemma": "decoder_block_{i}/attention",
    "llama3": "transformer_layer_{i}/self_attention",
}


def gpt2_causal_lm():
    return keras_hub.models.GPT2CausalLM(gpt2_backbone(), preprocessor=None)


def gemma_causal_lm():
    return keras_hub.models.GemmaCausalLM(gemma_backbone(), preprocessor=None)


CAUSAL_LMS = [("gpt2", gpt2_causal_lm), ("gemma", gemma_causal_lm)]


def prompt():
    """Two left-aligned prompts of 3 and 2 tokens, room for 5 more."""
    token_ids = np.zeros((2, 8), "int32")
    token_ids[0, :3] = [1, 2, 3]
    token_ids[1, :2] = [4, 5]
    return {"token_ids": token_ids, "padding_mask": token_ids != 0}


def greedy_generate(lm):
    # Without a preprocessor there is no end token: generate to max length.
    return lm.generate(prompt(), stop_token_ids=None)["token_ids"]


def randomize_lora_b(model, scale=0.5, seed=0):
    rng = np.random.default_rng(seed)
    for layer in keras_lora.lora_layers(model).values():
        layer.lora_b.assign(
            (scale * rng.normal(size=layer.lora_b.shape)).astype("float32")
        )


def count(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


def linear_layer_count(model):
    return sum(
        isinstance(e.layer, (keras.layers.Dense, keras.layers.EinsumDense))
        for e in model_walk.walk(model).values()
    )


# Tasks keep their class and generate ------------------------------------


def adapt_and_generate(lm):
    """Adapts `lm` with a non-zero adapter; returns its greedy output."""
    keras_lora.apply_lora(lm, rank=RANK)
    randomize_lora_b(lm)
    hub.reset_compiled_functions(lm)
    return greedy_generate(lm)


@pytest.mark.parametrize("factory", [f for _, f in CAUSAL_LMS],
                         ids=[n for n, _ in CAUSAL_LMS])
def test_causal_lm_keeps_class_sampler_and_greedy_output(factory):
    lm = factory()
    lm.compile(sampler="greedy")
    before = greedy_generate(lm)
    cls = type(lm)
    assert keras_lora.apply_lora(lm, rank=RANK) is lm
    assert type(lm) is cls
    assert isinstance(lm.sampler, keras_hub.samplers.GreedySampler)
    # A fresh adapter (B = 0) changes nothing.
    np.testing.assert_array_equal(greedy_generate(lm), before)


@pytest.mark.parametrize("factory", [f for _, f in CAUSAL_LMS],
                         ids=[n for n, _ in CAUSAL_LMS])
def test_causal_lm_generates_the_same_after_merging_a_nonzero_adapter(factory):
    lm = factory()
    lm.compile(sampler="greedy")
    base = greedy_generate(lm)
    adapted = adapt_and_generate(lm)
    assert not np.array_equal(adapted, base)  # the adapter matters
    for layer in keras_lora.lora_layers(lm).values():
        layer.merge()
    # `merge()` flips a Python flag that a traced `generate` has baked in.
    hub.reset_compiled_functions(lm)
    np.testing.assert_array_equal(greedy_generate(lm), adapted)


def test_merge_lora_in_place_gives_the_plain_task_generating_the_same():
    lm = gpt2_causal_lm()
    lm.compile(sampler="greedy")
    adapted = adapt_and_generate(lm)
    cls = type(lm)
    # No manual reset: merging clears the traced `generate` itself.
    assert keras_lora.merge_lora(lm, in_place=True) is lm
    assert type(lm) is cls and not keras_lora.lora_layers(lm)
    np.testing.assert_array_equal(greedy_generate(lm), adapted)


def test_merge_adapters_clears_a_traced_generate():
    lm = gpt2_causal_lm()
    lm.compile(sampler="greedy")
    adapted = adapt_and_generate(lm)
    keras_lora.merge_adapters(lm)
    np.testing.assert_array_equal(greedy_generate(lm), adapted)
    keras_lora.unmerge_adapters(lm)
    np.testing.assert_array_equal(greedy_generate(lm), adapted)


def test_reset_compiled_functions_clears_a_traced_generate():
    lm = gpt2_causal_lm()
    lm.compile(sampler="greedy")
    lm.make_generate_function()  # what `generate` caches
    assert lm.generate_function is not None
    assert hub.reset_compiled_functions(lm) is lm
    assert lm.generate_function is None


def test_apply_lora_clears_a_generate_traced_before_it():
    lm = gpt2_causal_lm()
    lm.compile(sampler="greedy")
    lm.make_generate_function()
    keras_lora.apply_lora(lm, rank=RANK)
    assert lm.generate_function is None


def test_text_classifier_keeps_class_and_trains_only_adapters_and_head():
    classifier = keras_hub.models.BertTextClassifier(
        bert_backbone(), num_classes=2, preprocessor=None
    )
    token_ids = np.random.default_rng(0).integers(1, VOCABULARY, (2, 8))
    x = {
        "token_ids": token_ids.astype("int32"),
        "segment_ids": np.zeros((2, 8), "int32"),
        "padding_mask": np.ones((2, 8), "int32"),
    }
    y = np.array([0, 1])
    frozen = {v.path: keras.ops.convert_to_numpy(v).copy()
              for v in classifier.weights if "logits" not in v.path}
    keras_lora.apply_lora(
        classifier, rank=RANK, targets="query_value", trainable=["logits"]
    )
    assert type(classifier) is keras_hub.models.BertTextClassifier
    trained = list(classifier.trainable_weights)
    head = classifier.get_layer("logits")
    expected = [head.kernel, head.bias] + [
        variable
        for layer in keras_lora.lora_layers(classifier).values()
        for variable in (layer.lora_a, layer.lora_b)
    ]
    assert sorted(map(id, trained)) == sorted(map(id, expected))
    assert len(keras_lora.lora_layers(classifier)) == 4
    before = [keras.ops.convert_to_numpy(v).copy() for v in trained]
    classifier.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    classifier.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0)
    for variable, value in zip(trained, before):
        if not variable.path.endswith("lora_a"):  # dL/dA = 0 while B = 0
            assert not np.array_equal(keras.ops.convert_to_numpy(variable), value)
    for variable in classifier.weights:
        if variable.path in frozen:
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(variable), frozen[variable.path]
            )


# Targets ----------------------------------------------------------------


@pytest.mark.parametrize("name,factory", BACKBONES, ids=[n for n, _ in BACKBONES])
def test_query_value_preset_selects_query_and_value_of_every_layer(name, factory):
    backbone = keras_lora.apply_lora(factory(), rank=RANK, targets="query_value")
    expected = [
        ATTENTION_PATHS[name].format(i=i) + "/" + projection
        for i in range(2)
        for projection in ("query", "value")
    ]
    assert list(keras_lora.lora_layers(backbone)) == expected


@pytest.mark.parametrize("name,factory", BACKBONES, ids=[n for n, _ in BACKBONES])
def test_query_value_preset_matches_keras_hub_enable_lora_layers(name, factory):
    ours = keras_lora.apply_lora(factory(), rank=RANK, targets="query_value")
    theirs = factory()
    theirs.enable_lora(RANK)
    enabled = [
        e.path for e in model_walk.walk(theirs).values()
        if getattr(e.layer, "lora_enabled", False)
    ]
    assert list(keras_lora.lora_layers(ours)) == enabled


@pytest.mark.parametrize("name,factory", BACKBONES, ids=[n for n, _ in BACKBONES])
def test_default_targets_adapt_every_dense_and_einsum_dense(name, factory):
    backbone = factory()
    expected = linear_layer_count(backbone)
    keras_lora.apply_lora(backbone, rank=RANK)
    assert len(keras_lora.lora_layers(backbone)) == expected
    assert linear_layer_count(backbone) == expected  # the wrapped bases


# Side by side with keras-hub's enable_lora ------------------------------


def enable_lora_params(kernel_shape, rank):
    """Keras's EinsumDense.enable_lora: A = kernel[:-1] + (r,), B = (r, last)."""
    return int(np.prod(kernel_shape[:-1])) * rank + rank * kernel_shape[-1]


def keras_lora_params(layer, rank):
    """keras-lora: A = contracted axes + (r,), B = (r,) + free axes."""
    contracted, free = type(layer)._kernel_split(layer.base_layer)
    return rank * (int(np.prod(contracted)) + int(np.prod(free)))


@pytest.mark.parametrize("name,factory", BACKBONES, ids=[n for n, _ in BACKBONES])
def test_query_value_parameter_counts_vs_enable_lora_follow_the_split(name, factory):
    ours = keras_lora.apply_lora(
        factory(), rank=RANK, targets="query_value", train_bias=True
    )
    theirs = factory()
    theirs.enable_lora(RANK)
    layers = keras_lora.lora_layers(ours).values()
    biases = sum(count([l.bias]) for l in layers if l.bias is not None)
    assert count(ours.trainable_weights) == biases + sum(
        keras_lora_params(l, RANK) for l in layers
    )
    # keras-hub leaves the biases of the layers it adapts trainable.
    assert count(theirs.trainable_weights) == biases + sum(
        enable_lora_params(tuple(l.kernel.shape), RANK) for l in layers
    )


def test_bert_query_value_parameter_counts_vs_enable_lora_exact_numbers():
    # hidden 16, 2 heads of 8, rank 2, 2 layers x (query, value):
    # keras-lora  A (16, 2) + B (2, 2, 8) = 64 per layer, 256 in all;
    # enable_lora A (16, 2, 2) + B (2, 8) + bias (2, 8) = 96 per layer, 384.
    ours = keras_lora.apply_lora(bert_backbone(), rank=RANK, targets="query_value")
    theirs = bert_backbone()
    theirs.enable_lora(RANK)
    assert count(ours.trainable_weights) == 4 * (16 * 2 + 2 * 16)
    assert count(theirs.trainable_weights) == 4 * (16 * 2 * 2 + 2 * 8 + 16)


def test_dense_targets_give_the_same_count_as_enable_lora():
    # For a Dense kernel both libraries use A (d_in, r), B (r, d_out).
    names = ["feedforward_intermediate_dense", "feedforward_output_dense"]
    ours = keras_lora.apply_lora(
        bert_backbone(), rank=RANK, targets=names, train_bias=True
    )
    theirs = bert_backbone()
    theirs.enable_lora(RANK, target_layer_names=names)
    assert count(ours.trainable_weights) == count(theirs.trainable_weights)
    assert count(ours.trainable_weights) == 2 * (
        (16 * RANK + RANK * 32 + 32) + (32 * RANK + RANK * 16 + 16)
    )


# One backend per run (the backends take turns over the examples, see
# tests/test_examples.py); what the example shows is tested on all three.
@pytest.mark.backend("torch")
def test_causal_lm_example_quick_run_generates_the_same_after_merging():
    result = load_example("causal_lm_generate").main(quick=True)
    assert result["merged_generates_the_same"]
    assert 0.0 <= result["lora_counts_by_three"] <= 1.0


def test_causal_lm_built_twice_loads_the_adapter_of_the_first(tmp_path):
    # The second build's backbone is "gemma_backbone_1", its layers too get
    # new names: the adapter matches by structural key, not by name.
    first = gemma_causal_lm()
    base_values = [keras.ops.convert_to_numpy(v).copy() for v in first.weights]
    keras_lora.apply_lora(first, rank=2)
    randomize_lora_b(first)
    path = str(tmp_path / "a.safetensors")
    keras_lora.save_adapter(first, path)
    second = gemma_causal_lm()
    assert second.backbone.name != first.backbone.name
    second.set_weights(base_values)
    keras_lora.load_adapter(second, path)
    assert isinstance(second, keras_hub.models.GemmaCausalLM)
    np.testing.assert_array_equal(greedy_generate(second), greedy_generate(first))


def test_merge_lora_keeps_a_causal_lms_greedy_sampler():
    lm = gemma_causal_lm()
    lm.compile(sampler="greedy")
    keras_lora.apply_lora(lm, rank=2)
    randomize_lora_b(lm)
    expected = greedy_generate(lm)
    merged = keras_lora.merge_lora(lm)
    assert type(merged.sampler).__name__ == "GreedySampler"
    np.testing.assert_array_equal(greedy_generate(merged), expected)


@pytest.mark.parametrize("factory", [f for _, f in CAUSAL_LMS], ids=[n for n, _ in CAUSAL_LMS])
def test_clone_with_lora_keeps_the_task_class_and_the_original_generating(factory):
    original = factory()
    original.compile(sampler="greedy")
    expected = greedy_generate(original)
    weights = [keras.ops.convert_to_numpy(v).copy() for v in original.weights]
    clone = keras_lora.clone_with_lora(original, rank=2)
    assert type(clone) is type(original)
    assert isinstance(clone.sampler, keras_hub.samplers.GreedySampler)
    np.testing.assert_array_equal(greedy_generate(clone), expected)
    randomize_lora_b(clone)
    keras_lora.merge_lora(clone, in_place=True)
    assert not keras_lora.lora_layers(original)
    for variable, value in zip(original.weights, weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), value)
    np.testing.assert_array_equal(greedy_generate(original), expected)


def test_two_adapters_on_a_causal_lm_switch_what_generate_produces():
    lm = gemma_causal_lm()
    lm.compile(sampler="greedy")
    base_tokens = greedy_generate(lm)
    keras_lora.apply_lora(lm, rank=RANK, adapter_name="a")
    keras_lora.add_adapter(lm, "b", rank=RANK, targets="query_value")
    for name, seed in (("a", 1), ("b", 2)):
        rng = np.random.default_rng(seed)
        for layer in keras_lora.lora_layers(lm).values():
            if name in layer.adapters:
                adapter = layer.adapters[name]
                adapter.lora_b.assign(
                    (0.5 * rng.normal(size=adapter.lora_b.shape)).astype("float32"))
    outputs = {}
    for name in ("a", "b"):
        keras_lora.set_adapter(lm, name)
        outputs[name] = greedy_generate(lm)  # traced generate follows the switch
    np.testing.assert_array_equal(greedy_generate(keras_lora.merge_lora(lm)), outputs["b"])
    assert isinstance(lm.sampler, keras_hub.samplers.GreedySampler)
    assert not np.array_equal(outputs["a"], outputs["b"])
    with keras_lora.disable_adapters(lm):
        np.testing.assert_array_equal(greedy_generate(lm), base_tokens)


def test_dora_trains_a_keras_hub_backbone_and_merges_exactly():
    backbone = gemma_backbone()
    keras_lora.apply_lora(backbone, rank=RANK, use_dora=True)
    inputs = {"token_ids": np.array([[1, 2, 3, 4]] * 4, "int32"),
              "padding_mask": np.ones((4, 4), bool)}
    target = np.random.default_rng(0).normal(size=(4, 4, 16)).astype("float32")
    backbone.compile(keras.optimizers.Adam(1e-2), "mse")
    history = backbone.fit(inputs, target, epochs=2, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    trained = {v.name for v in backbone.trainable_weights}
    assert trained == {"lora_a", "lora_b", "lora_magnitude"}
    expected = keras.ops.convert_to_numpy(backbone(inputs))
    merged = keras_lora.merge_lora(backbone)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(merged(inputs)), expected,
                               rtol=1e-4, atol=1e-4)
