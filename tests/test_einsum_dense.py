"""LoRAEinsumDense: the low-rank split follows the EinsumDense equation."""

import keras
import numpy as np
import pytest
from test_dense import assert_sgd_steps_follow_numpy_gradients

from keras_lora import LoRAEinsumDense
from keras_lora.layers.einsum_dense import split_equation

RANK = 2


def to_np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def sample(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


# Each case: the equation, the EinsumDense arguments, an input shape, the
# expected kernel / lora_a / lora_b shapes (lora_a is stored rank-first),
# and the kernel-shaped delta A·B written out by hand in numpy with A in
# kernel layout, `contracted + (r,)` (r = RANK).
CASES = {
    "free_axes_split": dict(
        equation="abc,cde->abde",
        output_shape=(None, 4, 8),
        bias_axes=None,
        input_shape=(2, 3, 32),
        kernel=(32, 4, 8),
        lora_a=(RANK, 32),
        lora_b=(RANK, 4, 8),
        delta=lambda a, b: (a @ b.reshape(RANK, 32)).reshape(32, 4, 8),
    ),
    "contracted_axes_split": dict(
        equation="abcd,cde->abe",
        output_shape=(None, 32),
        bias_axes="e",
        input_shape=(2, 3, 4, 8),
        kernel=(4, 8, 32),
        lora_a=(RANK, 4, 8),
        lora_b=(RANK, 32),
        delta=lambda a, b: (a.reshape(32, RANK) @ b).reshape(4, 8, 32),
    ),
    "gemma_query_contracted_axis_in_the_middle": dict(
        equation="btd,ndh->btnh",
        output_shape=(None, 2, 4),
        bias_axes=None,
        input_shape=(2, 3, 16),
        kernel=(2, 16, 4),
        lora_a=(RANK, 16),
        lora_b=(RANK, 2, 4),
        # A·B is laid out (d, n, h); the kernel is (n, d, h).
        delta=lambda a, b: (a @ b.reshape(RANK, 8))
        .reshape(16, 2, 4)
        .transpose(1, 0, 2),
    ),
    "bias_over_two_axes": dict(
        equation="abc,cde->abde",
        output_shape=(None, 4, 8),
        bias_axes="de",
        input_shape=(2, 3, 32),
        kernel=(32, 4, 8),
        lora_a=(RANK, 32),
        lora_b=(RANK, 4, 8),
        delta=lambda a, b: (a @ b.reshape(RANK, 32)).reshape(32, 4, 8),
    ),
    # The next two are not a matmul on 2-D views (axes out of order), so
    # they take the two-einsum path; the cases above take the 2-D one.
    "output_free_axes_reordered": dict(
        equation="abc,cde->abed",
        output_shape=(None, 8, 4),
        bias_axes=None,
        input_shape=(2, 3, 32),
        kernel=(32, 4, 8),
        lora_a=(RANK, 32),
        lora_b=(RANK, 4, 8),
        delta=lambda a, b: (a @ b.reshape(RANK, 32)).reshape(32, 4, 8),
    ),
    "input_contracted_axis_first": dict(
        equation="acb,cd->abd",
        output_shape=(3, 8),
        bias_axes="d",
        input_shape=(2, 16, 3),
        kernel=(16, 8),
        lora_a=(RANK, 16),
        lora_b=(RANK, 8),
        delta=lambda a, b: a @ b,
    ),
    "ellipsis_input": dict(
        equation="...b,bc->...c",
        output_shape=(8,),
        bias_axes="c",
        input_shape=(2, 3, 16),
        kernel=(16, 8),
        lora_a=(RANK, 16),
        lora_b=(RANK, 8),
        delta=lambda a, b: a @ b,
    ),
}


def built_einsum(case, name="einsum", **kwargs):
    """A built EinsumDense for `case`, with a non-zero bias if it has one."""
    layer = keras.layers.EinsumDense(
        case["equation"],
        case["output_shape"],
        bias_axes=case["bias_axes"],
        name=name,
        **kwargs,
    )
    layer.build(case["input_shape"])
    if layer.bias is not None:
        layer.bias.assign(sample(tuple(layer.bias.shape), seed=1))
    return layer


def adapted(case, **kwargs):
    kwargs.setdefault(
        "lora_b_initializer", keras.initializers.RandomNormal(seed=7)
    )
    return LoRAEinsumDense.from_layer(built_einsum(case), rank=RANK, **kwargs)


def numpy_delta(case, layer):
    # lora_a is stored (r,) + contracted; the cases write A as
    # contracted + (r,).
    a = np.moveaxis(to_np(layer.lora_a).astype("float64"), 0, -1)
    b = to_np(layer.lora_b).astype("float64")
    return case["delta"](a, b)


def numpy_output(case, layer, x):
    """einsum(x, W + s·delta) + bias, all in float64 numpy."""
    kernel = to_np(layer.kernel).astype("float64")
    kernel = kernel + layer.scaling * numpy_delta(case, layer)
    out = np.einsum(case["equation"], x.astype("float64"), kernel)
    if layer.bias is not None:
        out = out + to_np(layer.bias)
    return out


def snapshot(layer):
    return (
        layer.trainable,
        [(v.path, v.trainable, to_np(v).copy()) for v in layer.weights],
    )


def assert_unchanged(layer, before):
    trainable, weights = snapshot(layer)
    assert trainable == before[0]
    assert [w[:2] for w in weights] == [w[:2] for w in before[1]]
    for new, old in zip(weights, before[1]):
        np.testing.assert_array_equal(new[2], old[2])


# The split, one equation at a time ----------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_adapter_shapes_follow_the_equation(name):
    case = CASES[name]
    layer = adapted(case)
    assert tuple(layer.kernel.shape) == case["kernel"]
    assert tuple(layer.lora_a.shape) == case["lora_a"]
    assert tuple(layer.lora_b.shape) == case["lora_b"]


@pytest.mark.parametrize("name", CASES)
def test_fresh_adapter_output_equals_base_output_exactly(name):
    case = CASES[name]
    base = built_einsum(case)
    x = sample(case["input_shape"])
    base_out = to_np(base(x))
    layer = LoRAEinsumDense.from_layer(base, rank=RANK)
    np.testing.assert_array_equal(to_np(layer(x)), base_out)


@pytest.mark.parametrize("name", CASES)
def test_output_equals_numpy_einsum_with_the_updated_kernel(name):
    case = CASES[name]
    layer = adapted(case, alpha=3.0)
    x = sample(case["input_shape"])
    np.testing.assert_allclose(
        to_np(layer(x)), numpy_output(case, layer, x), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("jit_compile", [False, "auto"])
@pytest.mark.parametrize(
    "name",
    ["free_axes_split", "contracted_axes_split",
     "gemma_query_contracted_axis_in_the_middle"],
)
def test_gradients_of_2d_view_equations_match_numpy(name, jit_compile):
    # These equations take the shared 2-D kernel (reshaped A and B); one
    # SGD step with learning rate 1 per adapter exposes its gradient (one
    # at a time: see tests/test_dense.py on TensorFlow's update order).
    case = CASES[name]
    layer = adapted(case, alpha=3.0)
    model = keras.Sequential([keras.Input(case["input_shape"][1:]), layer])
    x = sample(case["input_shape"])
    g = sample(to_np(layer(x)).shape, seed=5)
    assert_sgd_steps_follow_numpy_gradients(model, layer, x, g, jit_compile)


@pytest.mark.parametrize("name", CASES)
def test_call_never_forms_the_kernel_shaped_delta(name, monkeypatch):
    case = CASES[name]
    layer = adapted(case)

    def forbidden(*args):
        raise AssertionError("call() built A·B")

    monkeypatch.setattr(layer, "_delta_kernel", forbidden)
    x = sample(case["input_shape"])
    np.testing.assert_allclose(
        to_np(layer(x)), numpy_output(case, layer, x), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("name", CASES)
def test_delta_kernel_is_a_times_b_in_kernel_axis_order(name):
    case = CASES[name]
    layer = adapted(case, alpha=3.0)
    expected = layer.scaling * numpy_delta(case, layer)
    np.testing.assert_allclose(
        to_np(layer.delta_kernel()), expected, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("name", CASES)
def test_merge_keeps_the_output_and_unmerge_restores_the_kernel(name):
    case = CASES[name]
    layer = adapted(case)
    x = sample(case["input_shape"])
    kernel_before = to_np(layer.kernel).copy()
    out = to_np(layer(x))
    layer.merge()
    np.testing.assert_allclose(to_np(layer(x)), out, rtol=1e-4, atol=1e-4)
    layer.unmerge()
    np.testing.assert_allclose(to_np(layer.kernel), kernel_before, atol=1e-6)


def test_bias_over_two_axes_is_shared_and_frozen():
    case = CASES["bias_over_two_axes"]
    base = built_einsum(case)
    layer = LoRAEinsumDense.from_layer(base, rank=RANK)
    assert tuple(layer.bias.shape) == (4, 8)
    assert layer.bias is base.bias and layer.kernel is base.kernel
    assert [id(v) for v in layer.trainable_weights] == [
        id(layer.lora_a),
        id(layer.lora_b),
    ]


def test_drop_in_takes_einsum_dense_arguments():
    layer = LoRAEinsumDense(
        "abc,cde->abde",
        (None, 4, 8),
        bias_axes="de",
        activation="relu",
        rank=RANK,
        lora_b_initializer=keras.initializers.RandomNormal(seed=7),
        name="proj",
    )
    x = sample((2, 3, 32))
    y = to_np(layer(x))
    expected = np.maximum(
        numpy_output(CASES["bias_over_two_axes"], layer, x), 0
    )
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    assert [v.path for v in layer.weights] == [
        "proj/lora_a",
        "proj/lora_b",
        "proj/kernel",
        "proj/bias",
    ]


def test_disabled_adapter_gives_the_base_output_exactly():
    case = CASES["gemma_query_contracted_axis_in_the_middle"]
    base = built_einsum(case)
    x = sample(case["input_shape"])
    base_out = to_np(base(x))
    layer = LoRAEinsumDense.from_layer(
        base, rank=RANK, lora_b_initializer="ones"
    )
    layer.disable_adapter()
    np.testing.assert_array_equal(to_np(layer(x)), base_out)


# split_equation -----------------------------------------------------------


@pytest.mark.parametrize(
    "equation, contracted, free, project, expand, delta",
    [
        (
            "abc,cde->abde",
            (0,),
            (1, 2),
            "abc,zc->abz",
            "abz,zde->abde",
            "zc,zde->cde",
        ),
        (
            "abcd,cde->abe",
            (0, 1),
            (2,),
            "abcd,zcd->abz",
            "abz,ze->abe",
            "zcd,ze->cde",
        ),
        (
            "btd,ndh->btnh",
            (1,),
            (0, 2),
            "btd,zd->btz",
            "btz,znh->btnh",
            "zd,znh->ndh",
        ),
        (
            "...b,bc->...c",
            (0,),
            (1,),
            "...b,zb->...z",
            "...z,zc->...c",
            "zb,zc->bc",
        ),
    ],
)
def test_split_equation(equation, contracted, free, project, expand, delta):
    split = split_equation(equation)
    assert split.contracted_axes == contracted
    assert split.free_axes == free
    assert split.project_equation == project
    assert split.expand_equation == expand
    assert split.delta_equation == delta


@pytest.mark.parametrize(
    "equation, matmul_view",
    [
        ("abc,cde->abde", True),
        ("abcd,cde->abe", True),
        ("btd,ndh->btnh", True),  # Gemma: contracted axis in the middle
        ("...b,bc->...c", True),
        ("abc,cde->abed", False),  # free axes out of kernel order
        ("acb,cd->abd", False),  # contracted axis not last in the input
        ("abcd,dce->abe", False),  # contracted axes out of kernel order
    ],
)
def test_split_equation_knows_when_the_update_is_a_2d_matmul(
    equation, matmul_view
):
    assert split_equation(equation).matmul_view is matmul_view


def test_split_equation_picks_a_rank_letter_unused_by_the_equation():
    split = split_equation("wxy,yz->wxz")
    assert split.project_equation == "wxy,vy->wxv"
    assert split.delta_equation == "vy,vz->yz"


def test_split_equation_ignores_spaces():
    assert split_equation("ab, bc -> ac") == split_equation("ab,bc->ac")


@pytest.mark.parametrize(
    "equation, reason",
    [
        ("abc,bcd->abd", "'b'.*in both the input and the output"),
        ("ab,bcd->ac", "'d'.*in neither"),
        ("abc,bc->a", "at least one contracted and one free axis"),
        ("abc->ab", "form 'input,kernel->output'"),
        ("ab,b...->a...", "ellipsis"),
        ("ab,bb->ab", "repeated axis"),
    ],
)
def test_split_equation_names_equations_it_cannot_express(equation, reason):
    with pytest.raises(ValueError, match=reason) as info:
        split_equation(equation)
    assert f"equation={equation!r}" in str(info.value)


# Errors: each leaves the base layer as it was -------------------------------


def test_unexpressible_equation_is_refused_and_the_base_left_alone():
    base = keras.layers.EinsumDense("abc,bcd->abd", (3, 6), name="shared")
    base.build((2, 3, 4))
    before = snapshot(base)
    with pytest.raises(ValueError, match=r"equation='abc,bcd->abd'"):
        LoRAEinsumDense.from_layer(base, rank=RANK)
    assert_unchanged(base, before)


def test_unexpressible_equation_is_refused_in_drop_in_use():
    with pytest.raises(ValueError, match=r"equation='abc,bcd->abd'"):
        LoRAEinsumDense("abc,bcd->abd", (None, 6), rank=RANK)


@pytest.mark.parametrize("make_layer", ["dense", "conv"])
def test_from_layer_refuses_other_layer_types(make_layer):
    if make_layer == "dense":
        layer = keras.layers.Dense(4)
        layer.build((None, 8))
        type_name = "Dense"
    else:
        layer = keras.layers.Conv2D(2, 3)
        layer.build((None, 8, 8, 3))
        type_name = "Conv2D"
    before = snapshot(layer)
    with pytest.raises(
        TypeError, match=rf"adapts `EinsumDense`.*type {type_name}"
    ):
        LoRAEinsumDense.from_layer(layer, rank=RANK)
    with pytest.raises(TypeError, match=rf"type {type_name}"):
        LoRAEinsumDense(base_layer=layer, rank=RANK)
    assert_unchanged(layer, before)


def test_from_layer_refuses_an_unbuilt_layer():
    base = keras.layers.EinsumDense("ab,bc->ac", (4,), name="late")
    with pytest.raises(ValueError, match="'late' is not built"):
        LoRAEinsumDense.from_layer(base, rank=RANK)
    assert base.trainable and not base.built


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=0), "rank=0"),
        (dict(rank=RANK, alpha=-1.0), "alpha=-1.0"),
        (dict(rank=RANK, dropout=1.0), "dropout=1.0"),
    ],
)
def test_bad_numbers_are_refused_and_the_base_left_alone(kwargs, message):
    base = built_einsum(CASES["bias_over_two_axes"])
    before = snapshot(base)
    with pytest.raises(ValueError, match=rf"'einsum'.*{message}"):
        LoRAEinsumDense.from_layer(base, **kwargs)
    assert_unchanged(base, before)


def test_rank_above_the_smaller_split_side_is_accepted_as_full_rank():
    # kernel (4, 2, 3): contracted size 4, free size 2 * 3 = 6.
    base = keras.layers.EinsumDense("abc,cde->abde", (None, 2, 3))
    base.build((2, 3, 4))
    assert LoRAEinsumDense.width_below_rank(base, 5) == (4, 6)
    layer = LoRAEinsumDense.from_layer(base, rank=5)
    assert tuple(layer.lora_a.shape) == (5, 4)
    assert tuple(layer.lora_b.shape) == (5, 2, 3)


def test_base_with_keras_builtin_lora_is_refused():
    base = built_einsum(CASES["free_axes_split"])
    base.enable_lora(2)
    before = snapshot(base)
    with pytest.raises(ValueError, match="enable_lora"):
        LoRAEinsumDense.from_layer(base, rank=RANK)
    assert_unchanged(base, before)
