"""DoRA: equal to PEFT's use_dora=True (forward, one gradient step, merge),
computed without W + s·A·B; magnitude in adapter files; several adapters."""

import keras
import numpy as np
import pytest
import torch
from keras import layers
from peft import LoraConfig
from peft import get_peft_model

import keras_lora

D_IN, D_OUT, RANK, ALPHA = 6, 5, 2, 4.0
RNG = np.random.default_rng(0)
W = RNG.normal(size=(D_IN, D_OUT)).astype("float32")
BIAS = RNG.normal(size=(D_OUT,)).astype("float32")
A = RNG.normal(size=(RANK, D_IN)).astype("float32")
B = RNG.normal(size=(RANK, D_OUT)).astype("float32")
X = RNG.normal(size=(4, D_IN)).astype("float32")
Y = RNG.normal(size=(4, D_OUT)).astype("float32")


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def peft_step(weight, bias, lora_a, lora_b, x, y, magnitude=None):
    """PEFT's DoRA on one `nn.Linear` (`weight` is `(out, in)`): outputs,
    its initial magnitude, and the MSE loss's gradients of A, B
    (`lora_b` is `(rank, out)`, PEFT's weight transposed) and magnitude."""
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(weight.shape[1], weight.shape[0],
                                       bias=bias is not None)

        def forward(self, x):
            return self.lin(x)

    net = Net()
    net.lin.weight.data = torch.tensor(weight)
    if bias is not None:
        net.lin.bias.data = torch.tensor(bias)
    model = get_peft_model(net, LoraConfig(
        r=lora_a.shape[0], lora_alpha=ALPHA, target_modules=["lin"], use_dora=True))
    lin = model.base_model.model.lin
    lin.lora_A["default"].weight.data = torch.tensor(lora_a)
    lin.lora_B["default"].weight.data = torch.tensor(lora_b.T.copy())
    magnitude_vector = lin.lora_magnitude_vector["default"].weight
    initial_magnitude = magnitude_vector.detach().numpy().copy()
    if magnitude is not None:
        magnitude_vector.data = torch.tensor(magnitude)
    outputs = model(torch.tensor(x))
    loss = ((outputs - torch.tensor(y)) ** 2).mean()
    loss.backward()
    grads = (lin.lora_A["default"].weight.grad.numpy(),
             lin.lora_B["default"].weight.grad.numpy().T,
             magnitude_vector.grad.numpy())
    return outputs.detach().numpy(), initial_magnitude, grads


def peft_reference():
    """PEFT's DoRA Linear on the Dense test weights."""
    return peft_step(W.T, BIAS, A, B, X, Y)


def sgd_step_deltas(model, adapter, x, y):
    """`old − new` of A, B and magnitude after one SGD(1.0) MSE step: the
    gradients."""
    variables = (adapter.lora_a, adapter.lora_b, adapter.lora_magnitude)
    model.compile(keras.optimizers.SGD(1.0), "mse")
    before = [to_numpy(v).copy() for v in variables]
    model.train_on_batch(x, y)
    return [old - to_numpy(v) for old, v in zip(before, variables)]


def keras_dora():
    inputs = keras.Input((D_IN,))
    dense = layers.Dense(D_OUT, name="lin")
    model = keras.Model(inputs, dense(inputs))
    dense.kernel.assign(W)
    dense.bias.assign(BIAS)
    keras_lora.apply_lora(model, rank=RANK, alpha=ALPHA, use_dora=True)
    layer = keras_lora.lora_layers(model)["lin"]
    layer.lora_a.assign(A)
    layer.lora_b.assign(B)
    return model, layer


def test_magnitude_starts_at_the_kernel_norm_and_changes_nothing():
    inputs = keras.Input((D_IN,))
    dense = layers.Dense(D_OUT, name="lin")
    model = keras.Model(inputs, dense(inputs))
    dense.kernel.assign(W)
    base = to_numpy(model(X))
    keras_lora.apply_lora(model, rank=RANK, use_dora=True)
    adapter = keras_lora.lora_layers(model)["lin"].adapters["default"]
    np.testing.assert_allclose(to_numpy(adapter.lora_magnitude),
                               np.linalg.norm(W, axis=0), rtol=1e-6)
    np.testing.assert_allclose(to_numpy(model(X)), base, rtol=1e-5, atol=1e-5)


def test_forward_equals_peft():
    expected, _, _ = peft_reference()
    model, _ = keras_dora()
    np.testing.assert_allclose(to_numpy(model(X)), expected, rtol=1e-5, atol=1e-5)


def test_magnitude_is_initialized_like_peft():
    _, peft_magnitude, _ = peft_reference()
    inputs = keras.Input((D_IN,))
    dense = layers.Dense(D_OUT, name="lin")
    model = keras.Model(inputs, dense(inputs))
    dense.kernel.assign(W)
    keras_lora.apply_lora(model, rank=RANK, alpha=ALPHA, use_dora=True)
    adapter = keras_lora.lora_layers(model)["lin"].adapters["default"]
    # PEFT initializes m = ‖W + s·AᵀB‖ with B = 0 at creation: ‖W‖.
    np.testing.assert_allclose(to_numpy(adapter.lora_magnitude), peft_magnitude,
                               rtol=1e-5)


def test_one_gradient_step_equals_peft():
    _, peft_magnitude, (grad_a, grad_b, grad_m) = peft_reference()
    model, layer = keras_dora()
    adapter = layer.adapters["default"]
    adapter.lora_magnitude.assign(peft_magnitude)
    deltas = sgd_step_deltas(model, adapter, X, Y)
    for delta, grad in zip(deltas, (grad_a, grad_b, grad_m)):
        np.testing.assert_allclose(delta, grad, rtol=1e-4, atol=1e-5)


# Gemma's query projection: the contracted axis `d` sits in the middle of
# the kernel `(n, d, h)`; PEFT's `nn.Linear` weight is `(n·h, d)`.
HEADS, HEAD_DIM, SEQ = 2, 3, 3


def keras_query(bias_axes):
    inputs = keras.Input((SEQ, D_IN))
    query = layers.EinsumDense("btd,ndh->btnh", (SEQ, HEADS, HEAD_DIM),
                               bias_axes=bias_axes, name="query")
    model = keras.Model(inputs, query(inputs))
    rng = np.random.default_rng(1)
    query.kernel.assign(rng.normal(size=query.kernel.shape).astype("float32"))
    if bias_axes:
        query.bias.assign(rng.normal(size=query.bias.shape).astype("float32"))
    keras_lora.apply_lora(model, rank=RANK, alpha=ALPHA, use_dora=True)
    layer = keras_lora.lora_layers(model)["query"]
    layer.lora_a.assign(rng.normal(size=layer.lora_a.shape).astype("float32"))
    layer.lora_b.assign(rng.normal(size=layer.lora_b.shape).astype("float32"))
    return model, query, layer.adapters["default"]


@pytest.mark.parametrize("bias_axes", [None, "h"])
def test_query_einsum_forward_and_gradient_step_equal_peft(bias_axes):
    model, query, adapter = keras_query(bias_axes)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, SEQ, D_IN)).astype("float32")
    y = rng.normal(size=(2, SEQ, HEADS, HEAD_DIM)).astype("float32")
    width = HEADS * HEAD_DIM
    kernel = to_numpy(query.kernel)  # (n, d, h) -> Linear weight (n·h, d)
    weight = np.transpose(kernel, (0, 2, 1)).reshape(width, D_IN)
    bias = None
    if bias_axes:
        bias = np.broadcast_to(to_numpy(query.bias), (HEADS, HEAD_DIM)).reshape(-1)
    lora_b = to_numpy(adapter.lora_b)
    expected, peft_magnitude, (grad_a, grad_b, grad_m) = peft_step(
        weight, bias, to_numpy(adapter.lora_a), lora_b.reshape(RANK, width),
        x, y.reshape(2, SEQ, width),
        magnitude=to_numpy(adapter.lora_magnitude).reshape(-1),
    )
    # Both start the magnitude at ‖W‖ (B = 0 at creation).
    np.testing.assert_allclose(to_numpy(adapter.lora_magnitude).reshape(-1),
                               peft_magnitude, rtol=1e-5)
    np.testing.assert_allclose(to_numpy(model(x)).reshape(expected.shape),
                               expected, rtol=1e-5, atol=1e-5)
    delta_a, delta_b, delta_m = sgd_step_deltas(model, adapter, x, y)
    np.testing.assert_allclose(delta_a, grad_a, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(delta_b.reshape(RANK, width), grad_b,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(delta_m.reshape(-1), grad_m, rtol=1e-4, atol=1e-5)


def test_call_never_forms_the_full_kernel_update(monkeypatch):
    model, layer = keras_dora()
    expected = to_numpy(model(X))

    def forbidden(*args, **kwargs):
        raise AssertionError("the d_in x d_out update was formed in call")

    monkeypatch.setattr(type(layer), "_delta_kernel", forbidden)
    np.testing.assert_allclose(to_numpy(model(X)), expected, rtol=1e-6)


@pytest.mark.parametrize("in_place", [False, True])
def test_merge_folds_dora_exactly(in_place):
    model, _ = keras_dora()
    expected = to_numpy(model(X))
    merged = keras_lora.merge_lora(model, in_place=in_place)
    np.testing.assert_allclose(to_numpy(merged(X)), expected, rtol=1e-5, atol=1e-5)


def test_merge_and_unmerge_adapters():
    model, _ = keras_dora()
    expected = to_numpy(model(X))
    keras_lora.merge_adapters(model)
    np.testing.assert_allclose(to_numpy(model(X)), expected, rtol=1e-5, atol=1e-5)
    keras_lora.unmerge_adapters(model)
    np.testing.assert_allclose(to_numpy(model(X)), expected, rtol=1e-5, atol=1e-5)


def test_einsum_with_the_contracted_axis_in_the_middle_merges_exactly():
    inputs = keras.Input((3, 6))
    query = layers.EinsumDense("btd,ndh->btnh", (3, 2, 4), name="query")
    model = keras.Model(inputs, query(inputs))
    keras_lora.apply_lora(model, rank=2, use_dora=True)
    layer = keras_lora.lora_layers(model)["query"]
    layer.lora_b.assign(RNG.normal(size=layer.lora_b.shape).astype("float32"))
    adapter = layer.adapters["default"]
    adapter.lora_magnitude.assign(
        RNG.uniform(0.5, 2.0, size=adapter.lora_magnitude.shape).astype("float32"))
    x = RNG.normal(size=(2, 3, 6)).astype("float32")
    expected = to_numpy(model(x))
    np.testing.assert_allclose(to_numpy(keras_lora.merge_lora(model)(x)), expected,
                               rtol=1e-4, atol=1e-4)


def test_adapter_file_holds_the_magnitude_and_round_trips(tmp_path):
    model, layer = keras_dora()
    layer.adapters["default"].lora_magnitude.assign(np.full((D_OUT,), 1.5, "float32"))
    path = str(tmp_path / "dora.safetensors")
    keras_lora.save_adapter(model, path)
    adapter = keras_lora.read_adapter(path)
    assert adapter.layers["lin"].use_dora
    assert adapter.tensors["lin/lora_magnitude"].shape == (D_OUT,)
    inputs = keras.Input((D_IN,))
    dense = layers.Dense(D_OUT, name="lin")
    fresh = keras.Model(inputs, dense(inputs))
    dense.kernel.assign(W)
    dense.bias.assign(BIAS)
    keras_lora.load_adapter(fresh, path)
    np.testing.assert_allclose(to_numpy(fresh(X)), to_numpy(model(X)), rtol=1e-5, atol=1e-5)


def test_dora_beside_plain_lora_adapters():
    model, layer = keras_dora()
    dora_only = to_numpy(model(X))
    keras_lora.add_adapter(model, "plain", rank=2)
    plain = keras_lora.lora_layers(model)["lin"].adapters["plain"]
    plain.lora_b.assign(RNG.normal(size=plain.lora_b.shape).astype("float32"))
    keras_lora.set_adapter(model, ["default", "plain"])
    expected = to_numpy(keras_lora.merge_lora(model)(X))
    np.testing.assert_allclose(to_numpy(model(X)), expected, rtol=1e-5, atol=1e-5)
    keras_lora.set_adapter(model, "default")
    np.testing.assert_allclose(to_numpy(model(X)), dora_only, rtol=1e-6, atol=1e-6)
    assert {v.name for v in model.trainable_weights} == {"lora_a", "lora_b", "lora_magnitude"}


def test_dora_is_refused_where_it_does_not_fit():
    inputs = keras.Input((3, 4))
    model = keras.Model(inputs, layers.EinsumDense("abc,cd->adb", (5, 3), name="e")(inputs))
    with pytest.raises(ValueError, match="use_dora=True.*equation"):
        keras_lora.apply_lora(model, rank=2, use_dora=True)
    assert not keras_lora.lora_layers(model)
    with pytest.raises(TypeError, match="use_dora"):
        keras_lora.apply_lora(model, rank=2, use_dora="yes")


def test_mixed_precision_dora_starts_as_the_base_and_trains():
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        inputs = keras.Input((D_IN,))
        dense = layers.Dense(D_OUT, name="lin")
        model = keras.Model(inputs, dense(inputs))
        dense.kernel.assign(W)
        base = to_numpy(keras.ops.cast(model(X), "float32"))
        keras_lora.apply_lora(model, rank=RANK, use_dora=True, dropout=0.1)
        outputs = model(X)
        assert keras.backend.standardize_dtype(outputs.dtype) == "bfloat16"
        np.testing.assert_allclose(to_numpy(keras.ops.cast(outputs, "float32")),
                                   base, rtol=2e-2, atol=2e-2)
        model.compile(keras.optimizers.SGD(0.1), "mse")
        loss = model.train_on_batch(X, Y)
    finally:
        keras.config.set_dtype_policy("float32")
    assert np.isfinite(loss)


def test_variants_are_strategies_and_merge_unmerge_together():
    """Each adapter's variant computes its term; DoRA and plain LoRA merge
    into one kernel and unmerge back to the base kernel together."""
    from keras_lora.layers import variants

    model, layer = keras_dora()
    keras_lora.add_adapter(model, "plain", rank=2)
    layer = keras_lora.lora_layers(model)["lin"]
    plain = layer.adapters["plain"]
    plain.lora_b.assign(RNG.normal(size=plain.lora_b.shape).astype("float32"))
    assert layer.adapters["default"].variant is variants.DORA
    assert plain.variant is variants.LORA
    keras_lora.set_adapter(model, ["default", "plain"])
    expected = to_numpy(model(X))
    layer.merge()
    np.testing.assert_allclose(to_numpy(model(X)), expected, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    np.testing.assert_allclose(to_numpy(layer.kernel), W, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_numpy(model(X)), expected, rtol=1e-5, atol=1e-5)


def test_unmerging_a_dora_merge_of_unknown_factors_is_refused():
    _, layer = keras_dora()
    config = layer.get_config()
    config["merged"] = True
    merged = type(layer).from_config(config)
    merged.build((None, D_IN))
    before = to_numpy(merged.kernel).copy()
    with pytest.raises(ValueError, match="DoRA adapter 'default' was merged"):
        merged.unmerge()
    np.testing.assert_array_equal(to_numpy(merged.kernel), before)
    assert merged.merged
