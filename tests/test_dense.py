"""LoRADense: a frozen Dense plus a trainable low-rank update A·B."""

import keras
import numpy as np
import pytest

from keras_lora import LoRADense

D_IN, UNITS = 5, 3


def to_np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def sample(shape=(4, D_IN), seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def built_dense(units=UNITS, d_in=D_IN, name="dense", **kwargs):
    """A built Dense with a non-zero bias, so the bias shows in outputs."""
    layer = keras.layers.Dense(units, name=name, **kwargs)
    layer.build((None, d_in))
    if layer.bias is not None:
        layer.bias.assign(sample((units,), seed=1))
    return layer


def random_b():
    # A non-zero B makes the low-rank path visible in the output.
    return keras.initializers.RandomNormal(stddev=1.0, seed=7)


def lora_reference(layer, x):
    """`x·W + b + scaling·(x·A)·B` in float64 numpy, before activation."""
    x = x.astype("float64")
    out = x @ to_np(layer.kernel).astype("float64")
    if layer.bias is not None:
        out = out + to_np(layer.bias)
    # lora_a stores A rank-first: (rank, d_in).
    a, b = to_np(layer.lora_a).T, to_np(layer.lora_b)
    return out + layer.scaling * (x @ a) @ b


def snapshot(layer):
    """Everything a failed LoRA constructor must leave as it was."""
    return {
        "trainable": layer.trainable,
        "weights": [
            (v.path, v.trainable, to_np(v).copy()) for v in layer.weights
        ],
    }


def assert_unchanged(layer, before):
    after = snapshot(layer)
    assert after["trainable"] == before["trainable"]
    assert [(p, t) for p, t, _ in after["weights"]] == [
        (p, t) for p, t, _ in before["weights"]
    ]
    for (_, _, new), (_, _, old) in zip(after["weights"], before["weights"]):
        np.testing.assert_array_equal(new, old)


# Drop-in use --------------------------------------------------------------


def test_drop_in_takes_dense_arguments_and_applies_activation_after_sum():
    layer = LoRADense(
        UNITS,
        rank=2,
        activation="relu",
        bias_initializer="ones",
        lora_b_initializer=random_b(),
        name="q",
    )
    x = sample()
    y = to_np(layer(x))
    pre = lora_reference(layer, x)
    assert (pre < 0).any(), "the check needs some negative pre-activations"
    np.testing.assert_allclose(y, np.maximum(pre, 0), rtol=1e-5, atol=1e-5)
    assert layer.units == UNITS


def test_drop_in_without_bias_has_no_bias():
    layer = LoRADense(UNITS, rank=2, use_bias=False)
    layer.build((None, D_IN))
    assert layer.bias is None
    assert len(layer.weights) == 3


def test_drop_in_variable_paths_read_like_a_plain_dense():
    layer = LoRADense(UNITS, rank=2, name="q")
    layer.build((None, D_IN))
    assert [v.path for v in layer.weights] == [
        "q/lora_a",
        "q/lora_b",
        "q/kernel",
        "q/bias",
    ]


def test_drop_in_paths_nest_under_an_outer_layer_like_a_plain_dense():
    class Block(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.up = LoRADense(UNITS, rank=2, name="up")

        def call(self, x):
            return self.up(x)

    block = Block(name="block")
    block(sample())
    assert [v.path for v in block.weights] == [
        "block/up/lora_a",
        "block/up/lora_b",
        "block/up/kernel",
        "block/up/bias",
    ]


def test_drop_in_rejects_units_together_with_base_layer():
    with pytest.raises(ValueError, match="not both"):
        LoRADense(UNITS, base_layer=built_dense())


# Adopting an existing Dense -------------------------------------------------


def test_from_layer_shares_kernel_and_bias_by_identity():
    dense = built_dense()
    layer = LoRADense.from_layer(dense, rank=2)
    assert layer.kernel is dense.kernel
    assert layer.bias is dense.bias
    assert layer.base_layer is dense


def test_from_layer_sees_later_changes_to_the_shared_kernel():
    dense = built_dense()
    layer = LoRADense.from_layer(dense, rank=2)
    dense.kernel.assign(np.ones((D_IN, UNITS), "float32"))
    x = sample()
    expected = x.sum(axis=1, keepdims=True) + to_np(dense.bias)
    np.testing.assert_allclose(to_np(layer(x)), expected, rtol=1e-5)


def test_from_layer_keeps_the_base_name_and_the_adapter_sits_beside_kernel():
    dense = built_dense(name="proj")
    layer = LoRADense.from_layer(dense, rank=2)
    assert layer.name == "proj"
    assert layer.lora_a.path == "proj/lora_a"
    assert layer.lora_b.path == "proj/lora_b"


def test_fresh_adapter_output_equals_base_output_exactly():
    dense = built_dense(activation="tanh")
    x = sample()
    base_out = to_np(dense(x))
    layer = LoRADense.from_layer(dense, rank=2)
    np.testing.assert_array_equal(to_np(layer(x)), base_out)


def test_only_lora_a_and_lora_b_are_trainable():
    dense = built_dense()
    layer = LoRADense.from_layer(dense, rank=2)
    assert [id(v) for v in layer.trainable_weights] == [
        id(layer.lora_a),
        id(layer.lora_b),
    ]
    assert not dense.kernel.trainable and not dense.bias.trainable
    assert {id(v) for v in layer.non_trainable_weights} == {
        id(dense.kernel),
        id(dense.bias),
    }


def test_train_bias_makes_the_bias_trainable_but_not_the_kernel():
    dense = built_dense()
    layer = LoRADense.from_layer(dense, rank=2, train_bias=True)
    assert [id(v) for v in layer.trainable_weights] == [
        id(layer.lora_a),
        id(layer.lora_b),
        id(dense.bias),
    ]
    assert not dense.kernel.trainable


def test_setting_trainable_on_a_model_never_unfreezes_the_kernel():
    layer = LoRADense.from_layer(built_dense(), rank=2)
    model = keras.Sequential([keras.Input((D_IN,)), layer])
    model.trainable = False
    assert model.trainable_weights == []
    model.trainable = True
    assert [id(v) for v in model.trainable_weights] == [
        id(layer.lora_a),
        id(layer.lora_b),
    ]
    assert not layer.kernel.trainable and not layer.bias.trainable


def test_adapter_shapes_are_rank_by_d_in_and_rank_by_units():
    # A (d_in × r) is stored rank-first, as PEFT stores lora_A.weight.
    layer = LoRADense.from_layer(built_dense(), rank=2)
    assert tuple(layer.lora_a.shape) == (2, D_IN)
    assert tuple(layer.lora_b.shape) == (2, UNITS)
    assert layer.lora_a.dtype == "float32" and layer.lora_b.dtype == "float32"


def test_lora_b_starts_at_zero_and_lora_a_does_not():
    layer = LoRADense.from_layer(built_dense(), rank=2)
    assert not to_np(layer.lora_b).any()
    assert np.abs(to_np(layer.lora_a)).min() > 0


# Scaling and the forward pass ---------------------------------------------


@pytest.mark.parametrize(
    "rank, alpha, use_rslora, expected",
    [
        (2, 6.0, False, 3.0),  # alpha / rank
        (2, None, False, 1.0),  # alpha defaults to rank
        (4, 6.0, True, 3.0),  # alpha / sqrt(rank)
        (3, None, True, 3 / np.sqrt(3)),  # rslora with alpha = rank
    ],
)
def test_scaling(rank, alpha, use_rslora, expected):
    layer = LoRADense.from_layer(
        built_dense(units=4), rank=rank, alpha=alpha, use_rslora=use_rslora
    )
    assert layer.alpha == (rank if alpha is None else alpha)
    assert layer.scaling == pytest.approx(expected)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_output_equals_numpy_base_plus_scaled_low_rank_path(use_rslora):
    layer = LoRADense.from_layer(
        built_dense(),
        rank=2,
        alpha=3.0,
        use_rslora=use_rslora,
        lora_b_initializer=random_b(),
    )
    x = sample((2, 3, D_IN))  # leading batch axes pass through
    expected = lora_reference(layer, x)
    np.testing.assert_allclose(to_np(layer(x)), expected, rtol=1e-5, atol=1e-5)


def test_he_uniform_a_is_drawn_with_the_input_size_as_fan_in():
    # lora_a is stored (rank, d_in); its initializer must still see d_in,
    # not the rank, as the fan-in (sqrt(6 / 2) would be ~9x too wide).
    d_in = 512
    layer = LoRADense.from_layer(built_dense(d_in=d_in), rank=2)
    a = to_np(layer.lora_a)
    limit = np.sqrt(6.0 / d_in)
    assert np.abs(a).max() <= limit
    assert np.abs(a).max() > 0.9 * limit


@pytest.mark.backend("torch")
def test_lora_a_is_stored_contiguous_rank_first_on_torch():
    # A strided (rank-last in memory) lora_a would make torch compute dA
    # as the slow tall product again (benchmarks/FINDINGS.md, 1b).
    layer = LoRADense.from_layer(built_dense(), rank=2)
    assert layer.lora_a.value.is_contiguous()
    assert tuple(layer.lora_a.value.stride()) == (D_IN, 1)


class DotLoss(keras.losses.Loss):
    """`sum(y_pred * y_true)`: its gradient w.r.t. the output is `y_true`.

    Also used by tests/test_einsum_dense.py.
    """

    def __init__(self):
        super().__init__(reduction="sum")

    def call(self, y_true, y_pred):
        axes = tuple(range(1, len(y_pred.shape)))
        return keras.ops.sum(y_pred * y_true, axis=axes)


@pytest.mark.parametrize("jit_compile", [False, "auto"])
def test_gradients_on_3d_inputs_match_numpy(jit_compile):
    # Transformer-shaped inputs go through the 2-D-view kernel (a jitted
    # function on JAX, torch.addmm on torch), compiled or not. One SGD step
    # with learning rate 1 exposes a gradient. One adapter trains per step:
    # with both, TensorFlow may apply one update before the other's
    # gradient has read the old value (plain stacked Dense layers show the
    # same at this learning rate), which is not what is tested here.
    layer = LoRADense.from_layer(
        built_dense(), rank=2, alpha=3.0, lora_b_initializer=random_b()
    )
    model = keras.Sequential([keras.Input((None, D_IN)), layer])
    x, g = sample((2, 3, D_IN)), sample((2, 3, UNITS), seed=5)
    np.testing.assert_allclose(
        to_np(model.predict(x, verbose=0)), lora_reference(layer, x),
        rtol=1e-5, atol=1e-5,
    )
    assert_sgd_steps_follow_numpy_gradients(model, layer, x, g, jit_compile)


def assert_sgd_steps_follow_numpy_gradients(model, layer, x, g, jit_compile):
    """One SGD step (learning rate 1, loss `sum(y * g)`) per adapter moves
    it by exactly its numpy gradient, computed on 2-D views: `x` as
    `(N, d_in)`, `g` as `(N, d_out)`, A as `(rank, d_in)`, B as
    `(rank, d_out)`. Also used by tests/test_einsum_dense.py."""
    rank = layer.rank
    d_in = int(np.prod(layer.lora_a.shape[1:]))
    d_out = int(np.prod(layer.lora_b.shape[1:]))
    x2, g2 = x.reshape(-1, d_in), g.reshape(-1, d_out)
    for trained, frozen in ((layer.lora_b, layer.lora_a),
                            (layer.lora_a, layer.lora_b)):
        trained.trainable, frozen.trainable = True, False
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate=1.0),
            loss=DotLoss(),
            jit_compile=jit_compile,
        )
        a = to_np(layer.lora_a).astype("float64").reshape(rank, d_in)
        b = to_np(layer.lora_b).astype("float64").reshape(rank, d_out)
        model.train_on_batch(x, g)
        if trained is layer.lora_b:
            expected = b - layer.scaling * (x2 @ a.T).T @ g2
        else:
            expected = a - layer.scaling * (g2 @ b.T).T @ x2
        np.testing.assert_allclose(
            to_np(trained).reshape(expected.shape), expected,
            rtol=1e-4, atol=1e-4,
        )


def test_call_never_forms_the_kernel_shaped_delta(monkeypatch):
    layer = LoRADense.from_layer(
        built_dense(), rank=2, lora_b_initializer=random_b()
    )

    def forbidden(*args):
        raise AssertionError("call() built A·B")

    monkeypatch.setattr(layer, "_delta_kernel", forbidden)
    x = sample()
    np.testing.assert_allclose(
        to_np(layer(x, training=True)),
        lora_reference(layer, x),
        rtol=1e-5,
        atol=1e-5,
    )


def test_dropout_only_acts_in_training():
    layer = LoRADense.from_layer(
        built_dense(), rank=2, dropout=0.5, lora_b_initializer=random_b()
    )
    x = sample((8, D_IN))
    np.testing.assert_allclose(
        to_np(layer(x, training=False)),
        lora_reference(layer, x),
        rtol=1e-5,
        atol=1e-5,
    )
    assert not np.allclose(to_np(layer(x, training=True)), to_np(layer(x)))


def test_dropout_never_touches_the_base_path():
    dense = built_dense()
    x = sample((8, D_IN))
    base_out = to_np(dense(x))
    layer = LoRADense.from_layer(dense, rank=2, dropout=0.5)
    np.testing.assert_array_equal(to_np(layer(x, training=True)), base_out)


def test_disabled_adapter_gives_the_base_output_exactly():
    dense = built_dense()
    x = sample()
    base_out = to_np(dense(x))
    layer = LoRADense.from_layer(dense, rank=2, lora_b_initializer=random_b())
    layer.disable_adapter()
    np.testing.assert_array_equal(to_np(layer(x)), base_out)
    layer.enable_adapter()
    np.testing.assert_allclose(
        to_np(layer(x)), lora_reference(layer, x), rtol=1e-5, atol=1e-5
    )


# Merging --------------------------------------------------------------------


def test_merged_kernel_is_kernel_plus_scaled_a_times_b():
    layer = LoRADense.from_layer(
        built_dense(), rank=2, alpha=5.0, lora_b_initializer=random_b()
    )
    kernel_before = to_np(layer.kernel).copy()
    expected = kernel_before + 2.5 * to_np(layer.lora_a).T @ to_np(layer.lora_b)
    np.testing.assert_allclose(
        to_np(layer.merged_kernel()), expected, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(to_np(layer.kernel), kernel_before)


def test_merge_keeps_the_output_and_unmerge_restores_the_kernel():
    layer = LoRADense.from_layer(
        built_dense(), rank=2, lora_b_initializer=random_b()
    )
    x = sample()
    kernel_before = to_np(layer.kernel).copy()
    unmerged_out = to_np(layer(x))
    merged_kernel = to_np(layer.merged_kernel())

    layer.merge()
    assert layer.merged
    np.testing.assert_array_equal(to_np(layer.kernel), merged_kernel)
    np.testing.assert_allclose(to_np(layer(x)), unmerged_out, atol=1e-5)
    layer.merge()  # a second merge is a no-op
    np.testing.assert_array_equal(to_np(layer.kernel), merged_kernel)

    layer.unmerge()
    assert not layer.merged
    np.testing.assert_allclose(to_np(layer.kernel), kernel_before, atol=1e-6)
    np.testing.assert_allclose(to_np(layer(x)), unmerged_out, atol=1e-5)


def test_nan_in_the_adapter_makes_merge_raise_and_keeps_the_kernel():
    layer = LoRADense.from_layer(built_dense(), rank=2)
    a = to_np(layer.lora_a).copy()
    a[0, 0] = np.nan
    layer.lora_a.assign(a)
    kernel_before = to_np(layer.kernel).copy()
    with pytest.raises(ValueError, match="'dense'.*NaN"):
        layer.merged_kernel()
    with pytest.raises(ValueError, match="NaN"):
        layer.merge()
    assert not layer.merged
    np.testing.assert_array_equal(to_np(layer.kernel), kernel_before)


# Errors: each leaves the base layer as it was --------------------------------


@pytest.mark.parametrize("rank", [0, -1, 2.5, True])
def test_rank_must_be_a_positive_integer(rank):
    dense = built_dense()
    before = snapshot(dense)
    with pytest.raises(ValueError, match=rf"'dense'.*rank={rank!r}"):
        LoRADense.from_layer(dense, rank=rank)
    assert_unchanged(dense, before)


@pytest.mark.parametrize("alpha", [0, -2.0])
def test_alpha_must_be_positive(alpha):
    dense = built_dense()
    before = snapshot(dense)
    with pytest.raises(ValueError, match=rf"'dense'.*alpha={alpha!r}"):
        LoRADense.from_layer(dense, rank=2, alpha=alpha)
    assert_unchanged(dense, before)


@pytest.mark.parametrize("dropout", [-0.1, 1.0])
def test_dropout_must_lie_in_zero_one(dropout):
    dense = built_dense()
    before = snapshot(dense)
    with pytest.raises(ValueError, match=rf"dropout={dropout!r}"):
        LoRADense.from_layer(dense, rank=2, dropout=dropout)
    assert_unchanged(dense, before)


def test_from_layer_refuses_an_unbuilt_layer():
    dense = keras.layers.Dense(UNITS, name="late")
    with pytest.raises(ValueError, match="'late' is not built"):
        LoRADense.from_layer(dense, rank=2)
    assert dense.trainable and not dense.built


@pytest.mark.parametrize(
    "make_layer, type_name",
    [
        (lambda: keras.layers.EinsumDense("ab,bc->ac", (UNITS,)), "EinsumDense"),
        (lambda: keras.layers.Conv2D(2, 3), "Conv2D"),
    ],
)
def test_from_layer_refuses_other_layer_types(make_layer, type_name):
    layer = make_layer()
    layer.build((None, 8, 8, D_IN) if type_name == "Conv2D" else (None, D_IN))
    before = snapshot(layer)
    with pytest.raises(TypeError, match=rf"adapts `Dense`.*type {type_name}"):
        LoRADense.from_layer(layer, rank=2)
    assert_unchanged(layer, before)


def test_rank_above_the_smaller_kernel_side_is_accepted_as_full_rank():
    # As in PEFT and Keras's enable_lora: the requested rank is kept.
    dense = built_dense()  # kernel (5, 3)
    layer = LoRADense.from_layer(dense, rank=4)
    assert tuple(layer.lora_a.shape) == (4, 5)
    assert tuple(layer.lora_b.shape) == (4, 3)
    assert LoRADense.width_below_rank(dense, 4) == (5, 3)
    assert LoRADense.width_below_rank(dense, 3) is None
    x = sample()
    np.testing.assert_allclose(to_np(layer(x)), to_np(dense(x)), atol=1e-6)


def test_drop_in_layer_narrower_than_its_rank_builds():
    layer = LoRADense(UNITS, rank=4)
    layer(sample())
    assert tuple(layer.lora_b.shape) == (4, UNITS)


def test_base_with_keras_builtin_lora_is_refused():
    dense = built_dense()
    dense.enable_lora(2)
    before = snapshot(dense)
    with pytest.raises(ValueError, match="'dense'.*enable_lora"):
        LoRADense.from_layer(dense, rank=2)
    assert_unchanged(dense, before)


def test_quantized_base_is_refused():
    dense = built_dense()
    dense.quantize("float8")
    with pytest.raises(ValueError, match="'dense' is quantized"):
        LoRADense.from_layer(dense, rank=2)
    assert dense.trainable


# Variable tracking (torch: a Keras layer is also a torch.nn.Module) --------


def test_wrapper_tracks_the_base_kernel_exactly_once():
    dense = built_dense()
    layer = LoRADense.from_layer(dense, rank=2)
    model = keras.Sequential([keras.Input((D_IN,)), layer])
    for owner in (layer, model):
        assert sum(w is dense.kernel for w in owner.weights) == 1
        assert len(owner.weights) == 4


@pytest.mark.backend("torch")  # torch.nn.Module tracking
def test_torch_module_sees_each_parameter_once():
    layer = LoRADense(UNITS, rank=2)
    layer(sample())
    params = list(layer.parameters())
    assert len(params) == 4
    assert len({id(p) for p in params}) == 4
    assert any(p is layer.lora_a.value for p in params)
    assert dict(layer.named_children())["base_layer"] is layer.base_layer
