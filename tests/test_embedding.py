"""LoRAEmbedding and LoRAReversibleEmbedding: lookups, tied logits, PEFT."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_lora
from keras_lora.layers import LoRAEmbedding
from keras_lora.layers import LoRAReversibleEmbedding
from keras_lora.layers import lora_class_for

VOCAB, DIM, RANK = 11, 6, 3
IDS = np.array([[1, 2, 3, 0], [10, 4, 4, 7]])


def to_np(x):
    return ops.convert_to_numpy(x)


def table(cls=keras.layers.Embedding, **kwargs):
    layer = cls(VOCAB, DIM, name="table", **kwargs)
    layer.build((None,))
    return layer


def adapted(base, **kwargs):
    kwargs.setdefault("lora_b_initializer", keras.initializers.RandomNormal(seed=2))
    cls = lora_class_for(base)
    return cls.from_layer(base, rank=RANK, alpha=6.0, **kwargs)


def updated_table(layer):
    """W + s·AᵀB, by hand."""
    a, b = to_np(layer.lora_a), to_np(layer.lora_b)
    return to_np(layer.kernel) + layer.scaling * a.T @ b


def hidden():
    return np.random.default_rng(0).normal(size=(2, 4, DIM)).astype("float32")


# Geometry and the lookup ---------------------------------------------------

def test_adapters_follow_the_layout_convention():
    layer = adapted(table())
    assert tuple(layer.lora_a.shape) == (RANK, VOCAB)
    assert tuple(layer.lora_b.shape) == (RANK, DIM)
    assert layer.kernel is layer.base_layer.embeddings
    assert layer.bias is None


def test_lookup_equals_rows_of_the_updated_table():
    layer = adapted(table())
    np.testing.assert_allclose(
        to_np(layer(IDS)), updated_table(layer)[IDS], rtol=1e-5, atol=1e-6
    )


def test_float_token_ids_are_looked_up_as_integers():
    layer = adapted(table())
    np.testing.assert_allclose(
        to_np(layer(IDS.astype("float32"))), to_np(layer(IDS)), atol=1e-7
    )


def test_fresh_adapter_leaves_the_lookup_unchanged():
    base = table()
    expected = to_np(base(IDS))
    layer = LoRAEmbedding.from_layer(base, rank=RANK)
    np.testing.assert_allclose(to_np(layer(IDS)), expected)


def test_dropout_is_not_applied_to_token_ids_as_in_peft():
    layer = adapted(table(), dropout=0.5)
    np.testing.assert_allclose(
        to_np(layer(IDS, training=True)), to_np(layer(IDS, training=False)),
        atol=1e-7,
    )


def test_mask_zero_passes_the_base_mask_through():
    layer = adapted(table(mask_zero=True))
    np.testing.assert_array_equal(to_np(layer.compute_mask(IDS)), IDS != 0)


def test_call_never_forms_the_table_shaped_delta(monkeypatch):
    layer = adapted(table(keras.layers.ReversibleEmbedding))
    expected = updated_table(layer)

    def forbidden(*args):
        raise AssertionError("call() built Aᵀ·B")

    monkeypatch.setattr(layer, "_delta_kernel", forbidden)
    np.testing.assert_allclose(to_np(layer(IDS, training=True)), expected[IDS],
                               rtol=1e-5, atol=1e-6)
    x = hidden()
    np.testing.assert_allclose(to_np(layer(x, reverse=True, training=True)),
                               x @ expected.T, rtol=1e-5, atol=1e-5)


def test_plain_embedding_class_refuses_a_reversible_embedding():
    with pytest.raises(TypeError, match="LoRAReversibleEmbedding"):
        LoRAEmbedding.from_layer(table(keras.layers.ReversibleEmbedding))


def test_dispatch_picks_the_reversible_class_first():
    assert lora_class_for(table(keras.layers.ReversibleEmbedding)) is (
        LoRAReversibleEmbedding
    )
    assert lora_class_for(table()) is LoRAEmbedding


# ReversibleEmbedding -------------------------------------------------------

def test_tied_logits_use_the_updated_table():
    layer = adapted(table(keras.layers.ReversibleEmbedding))
    x = hidden()
    np.testing.assert_allclose(
        to_np(layer(x, reverse=True)), x @ updated_table(layer).T,
        rtol=1e-5, atol=1e-5,
    )
    np.testing.assert_allclose(to_np(layer(IDS)), updated_table(layer)[IDS],
                               rtol=1e-5, atol=1e-6)


def test_tied_logit_soft_cap_applies_after_the_update():
    layer = adapted(table(keras.layers.ReversibleEmbedding, logit_soft_cap=2.0))
    x = hidden()
    expected = np.tanh(x @ updated_table(layer).T / 2.0) * 2.0
    np.testing.assert_allclose(to_np(layer(x, reverse=True)), expected,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tie_weights", [True, False])
def test_merge_and_unmerge_keep_both_directions(tie_weights):
    base = table(keras.layers.ReversibleEmbedding, tie_weights=tie_weights)
    layer = adapted(base)
    x = hidden()
    before = to_np(layer.kernel).copy()
    lookup, logits = to_np(layer(IDS)), to_np(layer(x, reverse=True))
    layer.merge()
    np.testing.assert_allclose(to_np(layer(IDS)), lookup, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_np(layer(x, reverse=True)), logits,
                               rtol=1e-5, atol=1e-5)
    layer.unmerge()
    np.testing.assert_allclose(to_np(layer.kernel), before, atol=1e-6)
    np.testing.assert_allclose(to_np(layer(x, reverse=True)), logits,
                               rtol=1e-5, atol=1e-5)


# Models --------------------------------------------------------------------

def classifier():
    ids = keras.Input((4,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, DIM, name="token_embedding")(ids)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(ids, keras.layers.Dense(3, name="head")(x))


def test_default_targets_leave_embeddings_alone():
    model = keras_lora.apply_lora(classifier(), rank=2)
    assert sorted(keras_lora.lora_layers(model)) == ["head"]


@pytest.mark.parametrize(
    "targets", ["token_embedding", keras.layers.Embedding, "all"]
)
def test_embeddings_adapted_by_name_type_or_the_all_preset(targets):
    model = keras_lora.apply_lora(classifier(), rank=2, targets=targets)
    layers = keras_lora.lora_layers(model)
    assert isinstance(layers["token_embedding"], LoRAEmbedding)
    assert ("head" in layers) == (targets == "all")


def randomize(model, seed=3):
    """Non-zero B factors (an untied reverse pair's too) of every adapter."""
    rng = np.random.default_rng(seed)
    for layer in keras_lora.lora_layers(model).values():
        for adapter in layer.adapters.values():
            for variable in [adapter.lora_b] + [
                v for name, v in adapter.extra_factors.items()
                if name.endswith("lora_b")
            ]:
                variable.assign(rng.normal(size=variable.shape).astype("float32"))


def test_merge_lora_of_a_functional_model_keeps_outputs():
    model = keras_lora.apply_lora(classifier(), rank=2, targets="all")
    randomize(model)
    expected = to_np(model(IDS))
    merged = keras_lora.merge_lora(model)
    assert type(merged.get_layer("token_embedding")) is keras.layers.Embedding
    np.testing.assert_allclose(to_np(merged(IDS)), expected, rtol=1e-5, atol=1e-5)


def test_merge_and_unmerge_adapters_keep_outputs():
    model = keras_lora.apply_lora(classifier(), rank=2, targets="all")
    randomize(model)
    expected = to_np(model(IDS))
    keras_lora.merge_adapters(model)
    np.testing.assert_allclose(to_np(model(IDS)), expected, rtol=1e-5, atol=1e-5)
    keras_lora.unmerge_adapters(model)
    np.testing.assert_allclose(to_np(model(IDS)), expected, rtol=1e-5, atol=1e-5)


def test_adapter_file_round_trip(tmp_path):
    keras.utils.set_random_seed(5)
    model = keras_lora.apply_lora(classifier(), rank=2, targets="token_embedding")
    randomize(model)
    expected = to_np(model(IDS))
    path = str(tmp_path / "adapter.safetensors")
    keras_lora.save_adapter(model, path)
    keras.utils.set_random_seed(5)
    fresh = classifier()
    keras_lora.load_adapter(fresh, path)
    assert isinstance(keras_lora.lora_layers(fresh)["token_embedding"], LoRAEmbedding)
    np.testing.assert_allclose(to_np(fresh(IDS)), expected, rtol=1e-5, atol=1e-5)


def test_one_training_step_changes_only_the_adapters():
    model = keras_lora.apply_lora(classifier(), rank=2, targets="token_embedding")
    layer = keras_lora.lora_layers(model)["token_embedding"]
    table_before = to_np(layer.kernel).copy()
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    model.fit(IDS, np.ones((2, 3), "float32"), epochs=1, verbose=0)
    np.testing.assert_array_equal(to_np(layer.kernel), table_before)
    assert not np.allclose(to_np(layer.lora_b), 0.0)


def test_config_round_trip_keeps_the_class_and_tie():
    layer = adapted(table(keras.layers.ReversibleEmbedding, tie_weights=False))
    clone = LoRAReversibleEmbedding.from_config(layer.get_config())
    assert type(clone.base_layer) is keras.layers.ReversibleEmbedding
    assert clone.base_layer.tie_weights is False
    assert clone.rank == RANK


def test_mixed_precision_keeps_float32_adapters():
    keras.config.set_dtype_policy("mixed_bfloat16")
    layer = adapted(table(keras.layers.ReversibleEmbedding))
    assert layer.lora_a.dtype == "float32" and layer.lora_b.dtype == "float32"
    assert keras.backend.standardize_dtype(layer(IDS).dtype) == "bfloat16"
    x = ops.cast(hidden(), "bfloat16")
    assert keras.backend.standardize_dtype(
        layer(x, reverse=True).dtype) == "bfloat16"


# PEFT ----------------------------------------------------------------------

def test_outputs_equal_peft_on_the_same_weights():
    import peft
    import torch

    layer = adapted(table())
    table_np = to_np(layer.kernel)

    class Tokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(VOCAB, DIM)

        def forward(self, ids):
            return self.emb(ids)

    module = Tokens()
    module.emb.weight.data = torch.tensor(table_np)
    theirs = peft.get_peft_model(module, peft.LoraConfig(
        r=RANK, lora_alpha=6.0, target_modules=["emb"], lora_dropout=0.0))
    emb = theirs.base_model.model.emb
    # PEFT's lora_embedding_A is our lora_a; lora_embedding_B our lora_b ᵀ.
    emb.lora_embedding_A["default"].data = torch.tensor(to_np(layer.lora_a))
    emb.lora_embedding_B["default"].data = torch.tensor(to_np(layer.lora_b).T.copy())
    with torch.no_grad():
        expected = theirs(torch.tensor(IDS)).numpy()
    np.testing.assert_allclose(to_np(layer(IDS)), expected, rtol=1e-5, atol=1e-6)


# keras-hub GPT-2 (tied token embedding) -----------------------------------

def test_gpt2_tied_token_embedding_merged_logits_equal_unmerged():
    import keras_hub

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB, num_layers=1, num_heads=2, hidden_dim=8,
        intermediate_dim=16, max_sequence_length=8,
    )
    lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    inputs = {"token_ids": IDS, "padding_mask": np.ones_like(IDS, dtype=bool)}
    keras_lora.apply_lora(lm, rank=2, targets="token_embedding")
    layer = keras_lora.lora_layers(lm)
    (path, lora), = layer.items()
    assert isinstance(lora, LoRAReversibleEmbedding) and lora.base_layer.tie_weights
    randomize(lm)
    unmerged = to_np(lm(inputs))
    keras_lora.disable_adapters(lm)
    base_logits = to_np(lm(inputs))
    keras_lora.enable_adapters(lm)
    assert not np.allclose(unmerged, base_logits, atol=1e-4)
    merged = keras_lora.merge_lora(lm)
    np.testing.assert_allclose(to_np(merged(inputs)), unmerged, rtol=1e-4, atol=1e-4)
    keras_lora.merge_adapters(lm)
    np.testing.assert_allclose(to_np(lm(inputs)), unmerged, rtol=1e-4, atol=1e-4)


@pytest.mark.backend("jax")  # keras.distribution is JAX-only in Keras 3
def test_adapters_created_under_model_parallel_follow_the_table_layout():
    mesh = keras.distribution.DeviceMesh(
        (1, 1), ("batch", "model"), keras.distribution.list_devices()[:1]
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*embeddings"] = ("model", "batch")
    layout_map[".*lora.*"] = ("batch", "model")  # must not reach adapters
    distribution = keras.distribution.ModelParallel(layout_map=layout_map)
    with distribution.scope():
        model = keras_lora.apply_lora(classifier(), rank=2, targets="token_embedding")
    lora = keras_lora.lora_layers(model)["token_embedding"]
    assert distribution.get_variable_layout(lora.lora_a).axes == (None, "model")
    assert distribution.get_variable_layout(lora.lora_b).axes == (None, "batch")


def test_two_named_adapters_add_up_in_both_tied_directions():
    model = keras.Sequential([keras.Input((4,), dtype="int32"),
                              keras.layers.ReversibleEmbedding(VOCAB, DIM, name="table")])
    keras_lora.apply_lora(model, rank=2, targets="table")
    keras_lora.add_adapter(model, "second", rank=3, targets="table")
    keras_lora.set_adapter(model, ["default", "second"])
    layer = keras_lora.lora_layers(model)["table"]
    rng = np.random.default_rng(4)
    expected = to_np(layer.kernel).copy()
    for adapter in layer.adapters.values():
        adapter.lora_b.assign(rng.normal(size=adapter.lora_b.shape).astype("float32"))
        expected += adapter.scaling * to_np(adapter.lora_a).T @ to_np(adapter.lora_b)
    np.testing.assert_allclose(to_np(layer(IDS)), expected[IDS], rtol=1e-5, atol=1e-5)
    x = hidden()
    np.testing.assert_allclose(to_np(layer(x, reverse=True)), x @ expected.T,
                               rtol=1e-5, atol=1e-5)


# Untied ReversibleEmbedding: a second pair for the reverse table -----------

def untied(**kwargs):
    return table(keras.layers.ReversibleEmbedding, tie_weights=False, **kwargs)


def reverse_pair(layer, name="default"):
    factors = layer.adapters[name].extra_factors
    return to_np(factors["reverse_lora_a"]), to_np(factors["reverse_lora_b"])


def updated_reverse(layer):
    """W_rev + s·A_revᵀB_rev, by hand."""
    a, b = reverse_pair(layer)
    return to_np(layer.base_layer.reverse_embeddings) + layer.scaling * a.T @ b


def test_untied_adapter_gets_a_reverse_pair_with_readable_paths():
    layer = adapted(untied())
    factors = layer.adapters["default"].extra_factors
    assert {n: tuple(v.shape) for n, v in factors.items()} == {
        "reverse_lora_a": (RANK, DIM), "reverse_lora_b": (RANK, VOCAB)}
    assert [v.path for v in layer.trainable_weights] == [
        "table/lora_a", "table/lora_b",
        "table/reverse_lora_a", "table/reverse_lora_b"]
    assert not layer.base_layer.reverse_embeddings.trainable
    assert adapted(table(keras.layers.ReversibleEmbedding)).adapters[
        "default"].extra_factors == {}


def test_fresh_untied_adapter_leaves_both_directions_unchanged():
    base = untied()
    x = hidden()
    lookup, logits = to_np(base(IDS)), to_np(base(x, reverse=True))
    layer = LoRAReversibleEmbedding.from_layer(base, rank=RANK)
    np.testing.assert_allclose(to_np(layer(IDS)), lookup)
    np.testing.assert_allclose(to_np(layer(x, reverse=True)), logits, atol=1e-7)


def test_untied_factored_update_equals_the_materialized_update_both_ways():
    layer = adapted(untied())
    x = hidden()
    np.testing.assert_allclose(to_np(layer(IDS)), updated_table(layer)[IDS],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_np(layer(x, reverse=True)),
                               x @ updated_reverse(layer), rtol=1e-5, atol=1e-5)


def test_untied_logit_soft_cap_applies_after_the_reverse_update():
    layer = adapted(untied(logit_soft_cap=2.0))
    x = hidden()
    expected = np.tanh(x @ updated_reverse(layer) / 2.0) * 2.0
    np.testing.assert_allclose(to_np(layer(x, reverse=True)), expected,
                               rtol=1e-5, atol=1e-5)


def test_untied_merge_folds_each_pair_into_its_own_table():
    layer = adapted(untied())
    expected_table, expected_reverse = updated_table(layer), updated_reverse(layer)
    layer.merge()
    np.testing.assert_allclose(to_np(layer.kernel), expected_table, atol=1e-6)
    np.testing.assert_allclose(to_np(layer.base_layer.reverse_embeddings),
                               expected_reverse, atol=1e-6)


def test_untied_merge_refuses_a_non_finite_reverse_pair_changing_nothing():
    layer = adapted(untied())
    table_before = to_np(layer.kernel).copy()
    layer.adapters["default"].extra_factors["reverse_lora_b"].assign(
        np.full((RANK, VOCAB), np.inf, "float32"))
    with pytest.raises(ValueError, match="reverse table"):
        layer.merge()
    assert not layer.merged
    np.testing.assert_array_equal(to_np(layer.kernel), table_before)


def test_two_named_adapters_add_up_in_both_untied_directions():
    model = keras.Sequential([keras.Input((4,), dtype="int32"), untied()])
    keras_lora.apply_lora(model, rank=2, targets="table")
    keras_lora.add_adapter(model, "second", rank=3, targets="table")
    keras_lora.set_adapter(model, ["default", "second"])
    layer = keras_lora.lora_layers(model)["table"]
    second = layer.adapters["second"]
    # Beside the adapter's own lora_a, whatever its scope.
    assert second.extra_factors["reverse_lora_a"].path == (
        second.lora_a.path.replace("/lora_a", "/reverse_lora_a"))
    randomize(model, seed=4)
    expected = to_np(layer.base_layer.reverse_embeddings).copy()
    for name, adapter in layer.adapters.items():
        a, b = reverse_pair(layer, name)
        expected += adapter.scaling * a.T @ b
    x = hidden()
    np.testing.assert_allclose(to_np(layer(x, reverse=True)), x @ expected,
                               rtol=1e-5, atol=1e-5)
    keras_lora.set_adapter(model, "second")
    assert {id(v) for v in layer.trainable_weights} == {
        id(v) for v in second.variables}
    assert len(second.variables) == 4


def test_untied_mixed_precision_keeps_float32_reverse_pair():
    keras.config.set_dtype_policy("mixed_bfloat16")
    layer = adapted(untied())
    assert {v.dtype for v in layer.adapters["default"].extra_factors.values()} == {
        "float32"}
    x = ops.cast(hidden(), "bfloat16")
    assert keras.backend.standardize_dtype(
        layer(x, reverse=True).dtype) == "bfloat16"


def test_untied_pair_refuses_a_weighted_combination():
    model = keras.Sequential([keras.Input((4,), dtype="int32"), untied()])
    keras_lora.apply_lora(model, rank=2, targets="table")
    with pytest.raises(ValueError, match="layer 'table'.*weighted"):
        keras_lora.add_weighted_adapter(model, ["default"], [1.0], "mix")


def test_loraplus_treats_the_reverse_b_as_a_b_matrix():
    from keras_lora.loraplus import is_lora_b

    layer = adapted(untied())
    factors = layer.adapters["default"].extra_factors
    assert is_lora_b(factors["reverse_lora_b"])
    assert not is_lora_b(factors["reverse_lora_a"])


@pytest.fixture(scope="module")
def tiny_llama():
    """A keras-hub Llama causal LM (untied token embedding), adapted on its
    token embedding with random B factors, and its logits."""
    import keras_hub

    keras.utils.set_random_seed(7)
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=VOCAB, num_layers=1, num_query_heads=2,
        num_key_value_heads=1, hidden_dim=8, intermediate_dim=16,
    )
    lm = keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)
    base_logits = to_np(lm(LLAMA_INPUTS))
    base_weights = lm.get_weights()
    keras_lora.apply_lora(lm, rank=2, targets="token_embedding")
    randomize(lm)
    return lm, base_logits, to_np(lm(LLAMA_INPUTS)), base_weights


LLAMA_INPUTS = {"token_ids": IDS, "padding_mask": np.ones_like(IDS, dtype=bool)}


def test_llama_untied_token_embedding_adapts_both_directions(tiny_llama):
    lm, base_logits, logits, _ = tiny_llama
    (path, lora), = keras_lora.lora_layers(lm).items()
    assert isinstance(lora, LoRAReversibleEmbedding)
    assert not lora.base_layer.tie_weights
    assert lora.adapters["default"].extra_factors["reverse_lora_a"].path.endswith(
        "token_embedding/reverse_lora_a")
    assert not np.allclose(logits, base_logits, atol=1e-4)
    # Disabling the lookup's pair alone still leaves the reverse update.
    b = to_np(lora.lora_b).copy()
    lora.lora_b.assign(np.zeros(lora.lora_b.shape, "float32"))
    assert not np.allclose(to_np(lm(LLAMA_INPUTS)), base_logits, atol=1e-5)
    lora.lora_b.assign(b)


def test_llama_untied_merged_logits_equal_unmerged(tiny_llama):
    lm, _, logits, _ = tiny_llama
    merged = keras_lora.merge_lora(lm)
    (lora,) = keras_lora.lora_layers(lm).values()
    assert type(merged.backbone.token_embedding) is type(lora.base_layer)
    np.testing.assert_allclose(to_np(merged(LLAMA_INPUTS)), logits,
                               rtol=1e-4, atol=1e-4)
    keras_lora.merge_adapters(lm)
    try:
        np.testing.assert_allclose(to_np(lm(LLAMA_INPUTS)), logits,
                                   rtol=1e-4, atol=1e-4)
    finally:
        keras_lora.unmerge_adapters(lm)
    np.testing.assert_allclose(to_np(lm(LLAMA_INPUTS)), logits,
                               rtol=1e-4, atol=1e-4)


def test_llama_untied_adapter_file_round_trip(tiny_llama, tmp_path):
    import keras_hub

    lm, _, logits, base_weights = tiny_llama
    path = str(tmp_path / "untied.safetensors")
    keras_lora.save_adapter(lm, path)
    stored = keras_lora.read_adapter(path)
    (record,) = stored.layers.values()
    assert record.extra_factor_shapes == {
        "reverse_lora_a": (2, 8), "reverse_lora_b": (2, VOCAB)}
    fresh = keras_hub.models.LlamaCausalLM(
        backbone=keras_hub.models.LlamaBackbone.from_config(
            lm.backbone.get_config()),
        preprocessor=None,
    )
    fresh.set_weights(base_weights)
    keras_lora.load_adapter(fresh, path)
    np.testing.assert_allclose(to_np(fresh(LLAMA_INPUTS)), logits,
                               rtol=1e-5, atol=1e-5)
    # In place into the same adapted model: the values are assigned.
    keras_lora.load_adapter(fresh, path)
    np.testing.assert_allclose(to_np(fresh(LLAMA_INPUTS)), logits,
                               rtol=1e-5, atol=1e-5)


def test_untied_file_does_not_load_into_a_tied_layer(tmp_path):
    def sequential(tie):
        return keras.Sequential([
            keras.Input((4,), dtype="int32"),
            table(keras.layers.ReversibleEmbedding, tie_weights=tie)])

    model = sequential(False)
    keras_lora.apply_lora(model, rank=2, targets="table")
    path = str(tmp_path / "untied.safetensors")
    keras_lora.save_adapter(model, path)
    tied = sequential(True)
    keras_lora.apply_lora(tied, rank=2, targets="table")
    with pytest.raises(ValueError, match="reverse_lora_a.*Nothing was changed"):
        keras_lora.load_adapter(tied, path)
    with pytest.raises(ValueError, match="reverse_lora_a.*Nothing was changed"):
        keras_lora.load_adapter(sequential(True), path)


def test_clone_with_lora_adapts_an_untied_copy():
    model = keras.Sequential([keras.Input((4,), dtype="int32"), untied()])
    clone = keras_lora.clone_with_lora(model, rank=2, targets="table")
    layer = keras_lora.lora_layers(clone)["table"]
    assert sorted(layer.adapters["default"].extra_factors) == [
        "reverse_lora_a", "reverse_lora_b"]
    assert type(model.layers[0]) is keras.layers.ReversibleEmbedding


@pytest.mark.backend("jax")  # keras.distribution is JAX-only in Keras 3
def test_untied_reverse_pair_follows_the_reverse_table_layout():
    mesh = keras.distribution.DeviceMesh(
        (1, 1), ("batch", "model"), keras.distribution.list_devices()[:1]
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*/embeddings"] = ("model", "batch")
    layout_map[".*reverse_embeddings"] = ("batch", "model")
    distribution = keras.distribution.ModelParallel(layout_map=layout_map)
    with distribution.scope():
        model = keras.Sequential([keras.Input((4,), dtype="int32"), untied()])
        keras_lora.apply_lora(model, rank=2, targets="table")
    factors = keras_lora.lora_layers(model)["table"].adapters["default"].extra_factors
    layout = distribution.get_variable_layout
    assert layout(factors["reverse_lora_a"]).axes == (None, "batch")
    assert layout(factors["reverse_lora_b"]).axes == (None, "model")
    extended = keras_lora.extend_layout_map(
        keras.distribution.LayoutMap(mesh), model)
    assert extended["table/reverse_lora_b"].axes == (None, None)
    layout_map_2 = keras.distribution.LayoutMap(mesh)
    layout_map_2["table/reverse_embeddings"] = ("batch", "model")
    keras_lora.extend_layout_map(layout_map_2, model)
    assert layout_map_2["table/reverse_lora_a"].axes == (None, "batch")


def test_untied_keras_file_and_delete_adapter_keep_the_reverse_pairs(tmp_path):
    model = keras.Sequential([keras.Input((4,), dtype="int32"), untied()])
    keras_lora.apply_lora(model, rank=2, targets="table")
    keras_lora.add_adapter(model, "second", rank=3, targets="table")
    keras_lora.set_adapter(model, ["default", "second"])
    randomize(model, seed=6)
    layer = keras_lora.lora_layers(model)["table"]
    x = hidden()
    logits = to_np(layer(x, reverse=True))
    path = str(tmp_path / "untied.keras")
    model.save(path)
    loaded = keras.saving.load_model(path).layers[0]
    np.testing.assert_allclose(to_np(loaded(x, reverse=True)), logits,
                               rtol=1e-6, atol=1e-6)
    keras_lora.delete_adapter(model, "second")
    layer = keras_lora.lora_layers(model)["table"]
    np.testing.assert_allclose(to_np(layer(x, reverse=True)),
                               x @ updated_reverse(layer), rtol=1e-5, atol=1e-5)


def test_mixed_batches_refuse_an_untied_embedding_by_name():
    model = keras.Sequential([keras.Input((4,), dtype="int32"), untied()])
    keras_lora.apply_lora(model, rank=2, targets="table")
    with pytest.raises(ValueError, match="layer 'table' is a LoRAReversibleEmbedding"):
        keras_lora.mixed_batch_model(model, ["default"])
