"""apply_lora on every kind of Keras model: one table of cases, shared checks."""

import re

import keras
import numpy as np
import pytest
from keras import layers

import keras_lora
from keras_lora import LoRADense
from keras_lora import LoRAEinsumDense

RANK = 2


@keras.saving.register_keras_serializable(package="keras_lora_tests")
class Block(layers.Layer):
    """A custom layer holding Dense attributes, like a transformer block."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.up = layers.Dense(12, activation="relu", name="up")
        self.down = layers.Dense(6, name="down")
        self.norm = layers.LayerNormalization(name="norm")

    def call(self, x):
        return self.norm(x + self.down(self.up(x)))


@keras.saving.register_keras_serializable(package="keras_lora_tests")
class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.embed = layers.Dense(6, name="embed")
        self.block = Block(name="block")
        self.head = layers.Dense(3, name="head")

    def call(self, x):
        return self.head(self.block(self.embed(x)))

    def describe(self):
        return "still a Subclassed model"


def sequential():
    return keras.Sequential(
        [keras.Input((6,)), layers.Dense(8, activation="relu"), layers.Dense(3)]
    ), np.random.rand(16, 6)


def functional_shared():
    inputs = keras.Input((6,))
    shared = layers.Dense(6, activation="tanh", name="shared")
    x = shared(shared(inputs))
    return keras.Model(inputs, layers.Dense(3, name="out")(x)), np.random.rand(16, 6)


def nested_functional():
    inner_in = keras.Input((6,))
    inner = keras.Model(
        inner_in, layers.Dense(8, name="inner_dense")(inner_in), name="inner"
    )
    inputs = keras.Input((6,))
    outputs = layers.Dense(3, name="head")(inner(inputs))
    return keras.Model(inputs, outputs), np.random.rand(16, 6)


def multi_io():
    a, b = keras.Input((6,), name="a"), keras.Input((4,), name="b")
    x = layers.Concatenate()([layers.Dense(5, name="da")(a), b])
    out1 = layers.Dense(3, name="out1")(x)
    out2 = layers.Dense(2, name="out2")(x)
    model = keras.Model([a, b], [out1, out2])
    return model, [np.random.rand(16, 6), np.random.rand(16, 4)]


def custom_block():
    inputs = keras.Input((6,))
    return keras.Model(inputs, Block(name="block")(inputs)), np.random.rand(16, 6)


def subclassed():
    model = Subclassed(name="sub")
    x = np.random.rand(16, 6)
    model(x)
    return model, x


def attention():
    inputs = keras.Input((5, 6))
    x = layers.MultiHeadAttention(2, 4, name="mha")(inputs, inputs)
    outputs = layers.Dense(3, name="head")(layers.Flatten()(x))
    return keras.Model(inputs, outputs), np.random.rand(16, 5, 6)


TEST_CASES = [
    ("sequential", sequential),
    ("functional_shared", functional_shared),
    ("nested_functional", nested_functional),
    ("multi_io", multi_io),
    ("custom_block", custom_block),
    ("subclassed", subclassed),
    ("attention", attention),
]
CASE_IDS = [name for name, _ in TEST_CASES]
CASES = [factory for _, factory in TEST_CASES]


def to_numpy(outputs):
    return [keras.ops.convert_to_numpy(o) for o in keras.tree.flatten(outputs)]


def values(variables):
    return [keras.ops.convert_to_numpy(v).copy() for v in variables]


def expected_adapter_params(model_before_targets):
    total = 0
    for layer in model_before_targets:
        contracted, free = type_split(layer)
        total += RANK * (int(np.prod(contracted)) + int(np.prod(free)))
    return total


def type_split(layer):
    cls = LoRAEinsumDense if isinstance(layer, layers.EinsumDense) else LoRADense
    return cls._kernel_split(layer)


def supported_layers(model):
    from keras_lora import model_walk

    return [
        e.layer for e in model_walk.walk(model).values()
        if isinstance(e.layer, (layers.Dense, layers.EinsumDense))
    ]


@pytest.mark.parametrize("factory", CASES, ids=CASE_IDS)
def test_outputs_unchanged_at_application(factory):
    model, x = factory()
    before = to_numpy(model(x))
    keras_lora.apply_lora(model, rank=RANK)
    for a, b in zip(before, to_numpy(model(x))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("factory", CASES, ids=CASE_IDS)
def test_model_object_and_class_are_kept(factory):
    model, _ = factory()
    cls = type(model)
    assert keras_lora.apply_lora(model, rank=RANK) is model
    assert type(model) is cls


@pytest.mark.parametrize("factory", CASES, ids=CASE_IDS)
def test_trainable_params_are_exactly_the_adapters(factory):
    model, _ = factory()
    targets = supported_layers(model)
    expected = expected_adapter_params(targets)
    keras_lora.apply_lora(model, rank=RANK)
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    assert trainable == expected
    assert all(
        v.path.endswith(("lora_a", "lora_b")) for v in model.trainable_weights
    )
    assert len(keras_lora.lora_layers(model)) == len(targets)


@pytest.mark.parametrize("factory", CASES, ids=CASE_IDS)
def test_variables_are_shared_not_copied(factory):
    model, _ = factory()
    before = list(model.weights)
    keras_lora.apply_lora(model, rank=RANK)
    after_ids = {id(v) for v in model.weights}
    assert all(id(v) in after_ids for v in before)
    # Only the adapters are new.
    assert len(model.weights) == len(before) + 2 * len(
        keras_lora.lora_layers(model)
    )


@pytest.mark.parametrize("factory", CASES, ids=CASE_IDS)
def test_fit_trains_adapters_and_leaves_base_bit_identical(factory):
    model, x = factory()
    y = [np.random.rand(*o.shape) for o in to_numpy(model(x))]
    base = list(model.weights)
    base_values = values(base)
    keras_lora.apply_lora(model, rank=RANK)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    target = y if len(y) > 1 else y[0]
    first = model.evaluate(x, target, verbose=0)
    model.fit(x, target, epochs=5, batch_size=16, verbose=0)
    last = model.evaluate(x, target, verbose=0)
    first = first[0] if isinstance(first, list) else first
    last = last[0] if isinstance(last, list) else last
    assert last < first
    for variable, value in zip(base, base_values):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), value)
    assert any(
        np.any(keras.ops.convert_to_numpy(layer.lora_b) != 0)
        for layer in keras_lora.lora_layers(model).values()
    )


def test_shared_layer_becomes_one_shared_lora_layer():
    model, x = functional_shared()
    keras_lora.apply_lora(model, rank=RANK)
    assert list(keras_lora.lora_layers(model)) == ["shared", "out"]
    assert [type(layer).__name__ for layer in model.layers[1:]] == [
        "LoRADense", "LoRADense"
    ]


def test_custom_block_call_uses_lora_attribute():
    model, x = custom_block()
    keras_lora.apply_lora(model, rank=RANK)
    block = model.get_layer("block")
    assert isinstance(block.up, LoRADense) and isinstance(block.down, LoRADense)
    assert not isinstance(block.norm, LoRADense)
    # A non-zero B now changes what the block's own call computes.
    before = to_numpy(model(x))[0]
    block.up.lora_b.assign(np.ones(block.up.lora_b.shape))
    assert not np.allclose(before, to_numpy(model(x))[0])
    names = [v.path for v in model.weights]
    assert len(names) == len(set(id(v) for v in model.weights))


def test_subclassed_model_keeps_its_methods():
    model, x = subclassed()
    keras_lora.apply_lora(model, rank=RANK)
    assert model.describe() == "still a Subclassed model"
    assert list(keras_lora.lora_layers(model)) == [
        "embed", "block/up", "block/down", "head"
    ]


def test_lora_layers_paths_are_stable_and_nested():
    model, _ = nested_functional()
    keras_lora.apply_lora(model, rank=RANK)
    assert list(keras_lora.lora_layers(model)) == ["inner/inner_dense", "head"]


def test_attention_projections_use_lora_einsum_dense():
    model, _ = attention()
    keras_lora.apply_lora(model, rank=RANK, targets="attention")
    found = keras_lora.lora_layers(model)
    assert sorted(found) == sorted(
        f"mha/{name}" for name in ("query", "key", "value", "attention_output")
    )
    assert all(isinstance(layer, LoRAEinsumDense) for layer in found.values())


@pytest.mark.parametrize(
    "targets, expected",
    [
        ("up", ["block/up"]),
        ("block/down", ["block/down"]),
        ("*/u*", ["block/up"]),
        (re.compile(r"d(own|ense)$"), ["block/down"]),
        (lambda path, layer: layer.units == 12, ["block/up"]),
        (["up", "down"], ["block/up", "block/down"]),
        ("block", ["block/up", "block/down"]),
    ],
    ids=["name", "path_suffix", "glob", "regex", "callable", "list", "container"],
)
def test_targets_pattern_language(targets, expected):
    model, _ = custom_block()
    keras_lora.apply_lora(model, rank=RANK, targets=targets)
    assert list(keras_lora.lora_layers(model)) == expected


def test_targets_by_layer_class():
    model, _ = attention()
    keras_lora.apply_lora(model, rank=RANK, targets=layers.EinsumDense)
    assert "head" not in keras_lora.lora_layers(model)
    assert len(keras_lora.lora_layers(model)) == 4


def test_exclude_wins_over_targets():
    model, _ = subclassed()
    keras_lora.apply_lora(model, rank=RANK, exclude=["head", "*/down"])
    assert list(keras_lora.lora_layers(model)) == ["embed", "block/up"]


def test_rank_and_alpha_patterns_override_per_layer():
    model, _ = subclassed()
    keras_lora.apply_lora(
        model, rank=2, alpha=4, rank_pattern={"block/*": 3},
        alpha_pattern={"head": 1.0}, use_rslora=False,
    )
    found = keras_lora.lora_layers(model)
    assert [found[p].rank for p in found] == [2, 3, 3, 2]
    assert found["head"].alpha == 1.0 and found["head"].scaling == 0.5
    assert found["embed"].scaling == 2.0


def test_trainable_layers_stay_fully_trainable_and_are_not_adapted():
    model, _ = subclassed()
    keras_lora.apply_lora(model, rank=RANK, trainable=["head"])
    assert "head" not in keras_lora.lora_layers(model)
    paths = {v.path for v in model.trainable_weights}
    assert {"sub/head/kernel", "sub/head/bias"} <= paths or {
        "head/kernel", "head/bias"} <= paths


def test_train_bias_keeps_adapted_biases_trainable():
    model, _ = sequential()
    keras_lora.apply_lora(model, rank=RANK, train_bias=True)
    names = sorted(v.path.split("/")[-1] for v in model.trainable_weights)
    assert names == ["bias", "bias", "lora_a", "lora_a", "lora_b", "lora_b"]


def test_other_layers_are_frozen_including_batchnorm_statistics():
    inputs = keras.Input((6,))
    x = layers.BatchNormalization(name="bn")(layers.Dense(8, name="d")(inputs))
    model = keras.Model(inputs, layers.Dense(2, name="o")(x))
    keras_lora.apply_lora(model, rank=RANK)
    bn = model.get_layer("bn")
    before = values(bn.weights)
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.random.rand(8, 6), np.random.rand(8, 2), verbose=0)
    for value, variable in zip(before, bn.weights):
        np.testing.assert_array_equal(value, keras.ops.convert_to_numpy(variable))


def test_compiled_model_is_recompiled_for_the_new_variables():
    model, x = sequential()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    model.fit(x, np.zeros((16, 3)), verbose=0)
    keras_lora.apply_lora(model, rank=RANK)
    history = model.fit(x, np.zeros((16, 3)), epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2
    assert len(model.optimizer.variables) > 0


def test_trainable_parameter_report_reads_like_peft():
    model, _ = sequential()
    keras_lora.apply_lora(model, rank=RANK)
    total = 6 * 8 + 8 + 8 * 3 + 3 + RANK * (6 + 8) + RANK * (8 + 3)
    assert keras_lora.trainable_parameter_report(model) == (
        f"trainable params: 50 || all params: {total:,} || "
        f"trainable%: {100 * 50 / total:.4f}"
    )


def test_summary_shows_lora_layers(capsys):
    model, _ = sequential()
    keras_lora.apply_lora(model, rank=RANK)
    model.summary()
    assert "LoRADense" in capsys.readouterr().out


def test_sequential_with_lora_saves_and_loads_with_adapters(tmp_path):
    model, x = sequential()
    keras_lora.apply_lora(model, rank=RANK)
    for layer in keras_lora.lora_layers(model).values():
        layer.lora_b.assign(np.full(layer.lora_b.shape, 0.1))
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(
        to_numpy(loaded(x))[0], to_numpy(model(x))[0], atol=1e-6
    )
    assert list(keras_lora.lora_layers(loaded)) == ["dense", "dense_1"] or len(
        keras_lora.lora_layers(loaded)) == 2


# Errors: a clear message and an untouched model -------------------------


def snapshot(model):
    return (
        [type(layer).__name__ for layer in supported_layers(model)],
        [v.trainable for v in model.weights],
        [id(v) for v in model.weights],
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(targets="nothing_like_this"), r"matches no layer.*'block/up'"),
        (dict(targets="norm"), r"LayerNormalization.*Supported types"),
        (dict(rank=0), r"rank=0"),
        (dict(rank=2.5), r"rank=2.5"),
        (dict(alpha=-1), r"alpha=-1"),
        (dict(dropout=1.0), r"dropout=1.0"),
        (dict(rank_pattern={"up": 0}), r"rank_pattern\['up'\].*rank=0"),
        (dict(trainable=["missing"]), r"trainable pattern 'missing'"),
        (dict(targets=[3.5]), r"must be a string"),
    ],
    ids=["no_match", "unsupported", "rank0", "rank_float", "alpha", "dropout",
         "rank_pattern", "trainable_missing", "bad_pattern"],
)
def test_bad_requests_raise_and_leave_model_untouched(kwargs, message):
    model, x = custom_block()
    before_out = to_numpy(model(x))
    before = snapshot(model)
    with pytest.raises((ValueError, TypeError), match=message):
        keras_lora.apply_lora(model, **{"rank": RANK, **kwargs})
    assert snapshot(model) == before
    np.testing.assert_array_equal(to_numpy(model(x))[0], before_out[0])


def test_applying_twice_raises_and_leaves_model_untouched():
    model, _ = sequential()
    keras_lora.apply_lora(model, rank=RANK)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"already has LoRA layers \(\['dense"):
        keras_lora.apply_lora(model, rank=RANK)
    assert snapshot(model) == before


def test_unbuilt_model_raises():
    model = keras.Sequential([layers.Dense(3)])
    with pytest.raises(ValueError, match="needs a built model"):
        keras_lora.apply_lora(model, rank=RANK)
    assert isinstance(model.layers[0], layers.Dense)


def test_weights_checkpoint_round_trips_lora_inside_custom_layers(tmp_path):
    # `.weights.h5` files follow the live structure, so they also cover LoRA
    # layers swapped inside other layers (a full `.keras` file re-creates
    # those parents from their own code, without LoRA).
    model, x = subclassed()
    keras_lora.apply_lora(model, rank=RANK)
    for layer in keras_lora.lora_layers(model).values():
        layer.lora_b.assign(np.full(layer.lora_b.shape, 0.05))
    path = str(tmp_path / "ckpt.weights.h5")
    model.save_weights(path)
    other, _ = subclassed()
    keras_lora.apply_lora(other, rank=RANK)
    other.load_weights(path)
    np.testing.assert_allclose(
        to_numpy(other(x))[0], to_numpy(model(x))[0], atol=1e-6
    )


def narrow_heads():
    inputs = keras.Input((16,))
    x = layers.Dense(32, activation="relu", name="body")(inputs)
    outputs = [
        layers.Dense(1, activation="sigmoid", name="binary")(x),
        layers.Dense(3, name="three_class")(x),
    ]
    return keras.Model(inputs, outputs), np.random.rand(16, 16)


def test_rank_above_a_layers_width_is_accepted_with_one_warning():
    model, x = narrow_heads()
    before = to_numpy(model(x))
    with pytest.warns(UserWarning) as record:
        keras_lora.apply_lora(model, rank=8)
    messages = [str(w.message) for w in record if "narrower" in str(w.message)]
    assert len(messages) == 1
    assert "'binary' (kernel 32x1, rank 8)" in messages[0]
    assert "'three_class' (kernel 32x3, rank 8)" in messages[0]
    assert "trainable=['binary']" in messages[0] and "rank_pattern" in messages[0]
    # PEFT parity: the requested rank is kept, the update is full-rank there.
    head = keras_lora.lora_layers(model)["binary"]
    assert head.rank == 8 and tuple(head.lora_a.shape) == (8, 32)
    assert tuple(head.lora_b.shape) == (8, 1)
    for got, expected in zip(to_numpy(model(x)), before):
        np.testing.assert_array_equal(got, expected)


def test_wide_layers_do_not_warn():
    import warnings

    model, _ = sequential()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        keras_lora.apply_lora(model, rank=2)


def test_narrow_layer_trains_at_full_rank():
    model, x = narrow_heads()
    with pytest.warns(UserWarning):
        keras_lora.apply_lora(model, rank=8)
    model.compile("adam", ["binary_crossentropy", "mse"])
    y = [np.random.randint(0, 2, (16, 1)), np.random.rand(16, 3)]
    history = model.fit(x, y, epochs=3, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


# Strict arguments: TypeError / ValueError naming the argument, model untouched


class _ConstantNaN(keras.initializers.Initializer):
    def __call__(self, shape, dtype=None):
        return keras.ops.full(shape, float("nan"), dtype=dtype or "float32")


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(use_rslora="false"), TypeError, r"use_rslora.*Received: use_rslora='false'"),
        (dict(use_rslora=2), TypeError, r"use_rslora=2"),
        (dict(train_bias="no"), TypeError, r"train_bias='no'"),
        (dict(train_bias=[0]), TypeError, r"train_bias=\[0\]"),
        (dict(rank_pattern=["up", 1]), TypeError, r"rank_pattern.*mapping.*list"),
        (dict(alpha_pattern=[("up", 1)]), TypeError, r"alpha_pattern.*mapping"),
        (dict(targets=layers.LSTM), TypeError,
         r"cannot adapt LSTM.*Supported types: .*EinsumDense, Dense"),
        (dict(alpha=1e39), ValueError, r"scaling.*not a finite.*alpha=1e\+39"),
        (dict(rank_pattern={"up": 1}, alpha_pattern={"up": 1e39}), ValueError,
         r"'block/up'.*scaling"),
        (dict(lora_b_initializer=_ConstantNaN()), ValueError,
         r"initial lora_b of adapter 'default' holds NaN"),
        (dict(lora_a_initializer="no_such_initializer"), ValueError,
         r"lora_a_initializer.*no_such_initializer"),
    ],
    ids=["rslora_str", "rslora_int", "bias_str", "bias_list", "rank_pattern_list",
         "alpha_pattern_list", "unsupported_class", "alpha_overflow",
         "alpha_pattern_overflow", "nan_initializer", "unknown_initializer"],
)
def test_strict_arguments_raise_and_leave_model_untouched(kwargs, error, message):
    model, x = custom_block()
    before_out = to_numpy(model(x))
    before = snapshot(model)
    with pytest.raises(error, match=message):
        keras_lora.apply_lora(model, **{"rank": RANK, **kwargs})
    assert snapshot(model) == before
    np.testing.assert_array_equal(to_numpy(model(x))[0], before_out[0])


@pytest.mark.parametrize("model", [None, "model.keras", 3], ids=["none", "str", "int"])
def test_a_model_that_is_not_a_keras_layer_is_a_type_error(model):
    with pytest.raises(TypeError, match=r"`model` must be a built Keras model.*Received: model="):
        keras_lora.apply_lora(model, rank=RANK)


def test_a_failing_initializer_on_a_later_layer_changes_nothing():
    # "identity" fits the 2-D Dense A but not MultiHeadAttention's 3-D ones:
    # the Dense layers come first in the walk, so a layer-by-layer apply
    # would have swapped and frozen them before failing.
    inputs = keras.Input((5, 6))
    x = layers.Dense(6, name="first")(inputs)
    x = layers.MultiHeadAttention(2, 4, name="mha")(x, x)
    model = keras.Model(inputs, layers.Dense(3, name="head")(layers.Flatten()(x)))
    x_data = np.random.rand(4, 5, 6)
    before_out = to_numpy(model(x_data))
    before = snapshot(model)
    layer_flags = [layer.trainable for layer in model.layers]
    with pytest.raises(ValueError, match="Identity"):
        keras_lora.apply_lora(model, rank=RANK, lora_a_initializer="identity")
    assert snapshot(model) == before
    assert [layer.trainable for layer in model.layers] == layer_flags
    assert not keras_lora.lora_layers(model)
    np.testing.assert_array_equal(to_numpy(model(x_data))[0], before_out[0])
