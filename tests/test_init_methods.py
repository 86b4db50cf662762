"""apply_lora(init=...): gaussian, PiSSA (exact and randomized) and OLoRA equal
PEFT's init_lora_weights on the same weights; residual kernels keep outputs;
adapters saved from such models load onto the untouched original base."""

import keras
import numpy as np
import pytest
import torch
from keras import layers
from peft import LoraConfig
from peft import get_peft_model

import keras_lora
from keras_lora import init_methods
from keras_lora.layers.adapter import AdapterSpec

D_IN, D_OUT, RANK, ALPHA = 6, 5, 2, 4.0
RNG = np.random.default_rng(0)
W = RNG.normal(size=(D_IN, D_OUT)).astype("float32")
X = RNG.normal(size=(8, D_IN)).astype("float32")
Y = RNG.normal(size=(8, 3)).astype("float32")


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def peft_init(weight_in_out, init, rank=RANK, alpha=ALPHA, use_rslora=False):
    """PEFT's (residual kernel as (in, out), s·Aᵀ·B as (in, out))."""
    torch.manual_seed(0)
    d_in, d_out = weight_in_out.shape

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(d_in, d_out, bias=False)

        def forward(self, x):
            return self.lin(x)

    net = Net()
    with torch.no_grad():
        net.lin.weight.copy_(torch.from_numpy(weight_in_out.T.copy()))
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["lin"],
                        init_lora_weights=init, use_rslora=use_rslora)
    peft_model = get_peft_model(net, config)
    lin = peft_model.base_model.model.lin
    scaling = lin.scaling["default"]
    update = scaling * (lin.lora_B["default"].weight @ lin.lora_A["default"].weight)
    residual = lin.base_layer.weight
    return residual.detach().numpy().T, update.detach().numpy().T


def dense_model(weight=W, name="proj"):
    model = keras.Sequential([
        keras.Input((weight.shape[0],)),
        layers.Dense(weight.shape[1], use_bias=False, name=name),
    ])
    model.layers[0].kernel.assign(weight)
    return model


def ours(model, path="proj"):
    layer = keras_lora.lora_layers(model)[path]
    update = to_numpy(layer.delta_kernel())
    return to_numpy(layer.kernel.value), update, layer


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_pissa_and_olora_residual_and_update_equal_peft(init, use_rslora):
    model = keras_lora.apply_lora(dense_model(), rank=RANK, alpha=ALPHA,
                                  use_rslora=use_rslora, init=init)
    residual, update, _ = ours(model)
    peft_residual, peft_update = peft_init(W, init, use_rslora=use_rslora)
    np.testing.assert_allclose(residual, peft_residual, atol=1e-5)
    np.testing.assert_allclose(update, peft_update, atol=1e-5)
    np.testing.assert_allclose(residual + update, W, atol=1e-5)


def test_olora_factors_equal_peft_factors():
    model = keras_lora.apply_lora(dense_model(), rank=RANK, alpha=ALPHA, init="olora")
    layer = keras_lora.lora_layers(model)["proj"]
    q, r = np.linalg.qr(W.T)
    # PEFT: lora_A = R[:r], lora_B = Q[:, :r] (our B is its transpose).
    np.testing.assert_allclose(to_numpy(layer.lora_a), r[:RANK], atol=1e-5)
    np.testing.assert_allclose(to_numpy(layer.lora_b), q[:, :RANK].T, atol=1e-5)


def test_pissa_niter_spans_the_top_singular_subspace_like_peft():
    # A kernel with a clear spectral gap: a few iterations find the subspace.
    u, _, vh = np.linalg.svd(RNG.normal(size=(12, 10)), full_matrices=False)
    spectrum = np.array([10.0, 8.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.1, 0.05, 0.01])
    weight = (u * spectrum @ vh).astype("float32")
    model = keras_lora.apply_lora(dense_model(weight), rank=RANK, alpha=ALPHA,
                                  init="pissa_niter_4")
    residual, update, _ = ours(model)
    _, peft_update = peft_init(weight, "pissa_niter_4")
    _, exact_update = peft_init(weight, "pissa")
    np.testing.assert_allclose(update, peft_update, atol=1e-3)
    np.testing.assert_allclose(update, exact_update, atol=1e-3)
    np.testing.assert_allclose(residual + update, weight, atol=1e-5)


def test_randomized_svd_matches_exact_svd_on_a_low_rank_matrix():
    matrix = (RNG.normal(size=(9, 3)) @ RNG.normal(size=(3, 7))).astype("float32")
    for shape in (matrix, matrix.T):
        u, s, v = init_methods.randomized_svd(shape, 3, niter=2)
        np.testing.assert_allclose(u @ np.diag(s) @ v.T, shape, atol=1e-4)
        np.testing.assert_allclose(s, np.linalg.svd(shape)[1][:3], rtol=1e-4)


def test_gaussian_draws_a_with_std_one_over_rank_and_b_zero():
    keras.utils.set_random_seed(3)
    model = dense_model(RNG.normal(size=(400, 40)).astype("float32"))
    model = keras_lora.apply_lora(model, rank=4, init="gaussian")
    layer = keras_lora.lora_layers(model)["proj"]
    a = to_numpy(layer.lora_a)
    assert abs(a.std() - 0.25) < 0.02 and abs(a.mean()) < 0.02
    np.testing.assert_array_equal(to_numpy(layer.lora_b), 0.0)
    assert layer.adapters["default"].init == "gaussian"


def test_gaussian_std_follows_the_rank_pattern():
    model = dense_model(RNG.normal(size=(400, 40)).astype("float32"))
    model = keras_lora.apply_lora(model, rank=4, rank_pattern={"proj": 8},
                                  init="gaussian")
    a = to_numpy(keras_lora.lora_layers(model)["proj"].lora_a)
    assert abs(a.std() - 0.125) < 0.01


GEMMA_QUERY = "btd,ndh->btnh"  # contracted axis in the middle of the kernel


def einsum_model(init):
    keras.utils.set_random_seed(5)
    inputs = keras.Input((3, 6))
    outputs = layers.EinsumDense(GEMMA_QUERY, (3, 2, 4), name="query")(inputs)
    model = keras.Model(inputs, outputs)
    if init is not None:
        keras_lora.apply_lora(model, rank=RANK, alpha=ALPHA, init=init)
    return model


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_einsum_kernel_is_seen_as_contracted_by_free_matrix(init):
    base = einsum_model(None)
    kernel = to_numpy(base.get_layer("query").kernel.value)  # (n, d, h)
    x = RNG.normal(size=(2, 3, 6)).astype("float32")
    expected = base.predict(x, verbose=0)
    model = keras_lora.apply_lora(base, rank=RANK, alpha=ALPHA, init=init)
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, atol=1e-5)
    residual, update, _ = ours(model, "query")
    matrix = np.transpose(kernel, (1, 0, 2)).reshape(6, 8)
    peft_residual, peft_update = peft_init(matrix, init)

    def as_kernel(m):
        return np.transpose(m.reshape(6, 2, 4), (1, 0, 2))

    np.testing.assert_allclose(residual, as_kernel(peft_residual), atol=1e-5)
    np.testing.assert_allclose(update, as_kernel(peft_update), atol=1e-5)


def mlp():
    keras.utils.set_random_seed(7)
    return keras.Sequential([
        keras.Input((D_IN,)),
        layers.Dense(8, activation="tanh", name="up"),
        layers.Dense(3, name="out"),
    ])


def trained(init, **kwargs):
    model = keras_lora.apply_lora(mlp(), rank=RANK, alpha=ALPHA, init=init, **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(X, Y, epochs=3, batch_size=4, verbose=0)
    return model


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_1", "olora"])
def test_fresh_model_computes_the_base_outputs(init):
    expected = mlp().predict(X, verbose=0)
    model = keras_lora.apply_lora(mlp(), rank=RANK, init=init)
    np.testing.assert_allclose(model.predict(X, verbose=0), expected, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_saved_adapter_loads_onto_the_original_base(tmp_path, init, use_rslora):
    model = trained(init, use_rslora=use_rslora)
    expected = model.predict(X, verbose=0)
    path = keras_lora.save_adapter(model, str(tmp_path / "a.safetensors"))
    base = mlp()
    original = to_numpy(base.get_layer("up").kernel.value)
    loaded = keras_lora.load_adapter(base, path)
    np.testing.assert_allclose(loaded.predict(X, verbose=0), expected, atol=1e-5)
    layer = keras_lora.lora_layers(loaded)["up"]
    assert layer.rank == 2 * RANK
    assert layer.scaling == pytest.approx(keras_lora.lora_layers(model)["up"].scaling)
    np.testing.assert_array_equal(to_numpy(layer.kernel.value), original)


def test_loading_a_plain_adapter_into_a_pissa_model_restores_the_kernel(tmp_path):
    plain = keras_lora.apply_lora(mlp(), rank=RANK)
    path = keras_lora.save_adapter(plain, str(tmp_path / "plain.safetensors"))
    expected = plain.predict(X, verbose=0)
    model = trained("pissa")
    keras_lora.load_adapter(model, path)
    np.testing.assert_allclose(model.predict(X, verbose=0), expected, atol=1e-5)


@pytest.mark.parametrize("in_place", [False, True])
def test_merge_gives_the_trained_outputs(in_place):
    model = trained("pissa")
    expected = model.predict(X, verbose=0)
    merged = keras_lora.merge_lora(model, in_place=in_place)
    np.testing.assert_allclose(merged.predict(X, verbose=0), expected, atol=1e-5)


def test_clone_with_lora_leaves_the_original_kernel():
    base = mlp()
    kernel = to_numpy(base.get_layer("up").kernel.value)
    clone = keras_lora.clone_with_lora(base, rank=RANK, init="pissa")
    np.testing.assert_array_equal(to_numpy(base.get_layer("up").kernel.value), kernel)
    np.testing.assert_allclose(
        clone.predict(X, verbose=0), base.predict(X, verbose=0), atol=1e-5
    )
    assert not np.allclose(to_numpy(keras_lora.lora_layers(clone)["up"].kernel.value),
                           kernel)


def test_add_adapter_with_pissa_and_delete_adapter_restores_the_kernel():
    model = keras_lora.apply_lora(mlp(), rank=RANK)
    expected = model.predict(X, verbose=0)
    kernel = to_numpy(model.get_layer("up").kernel.value)
    keras_lora.add_adapter(model, "svd", rank=RANK, init="pissa")
    layer = keras_lora.lora_layers(model)["up"]
    assert layer.adapters["svd"].init == "pissa"
    assert layer.adapters["default"].init == "default"
    keras_lora.set_adapter(model, ["default", "svd"])
    np.testing.assert_allclose(model.predict(X, verbose=0), expected, atol=1e-5)
    keras_lora.add_adapter(model, "third", rank=1)  # rebuilds the layers
    assert keras_lora.lora_layers(model)["up"].adapters["svd"].initial_factors
    keras_lora.delete_adapter(model, "svd")
    np.testing.assert_allclose(
        to_numpy(keras_lora.lora_layers(model)["up"].kernel.value), kernel, atol=1e-5
    )


def test_spec_serializes_init_and_refuses_unknown_values():
    spec = AdapterSpec.validated("default", 2, init="pissa_niter_3")
    assert spec.get_config()["init"] == "pissa_niter_3"
    assert AdapterSpec.from_config(spec.get_config()).init == "pissa_niter_3"
    with pytest.raises(ValueError, match="init='svd'"):
        AdapterSpec.validated("default", 2, init="svd")


def assert_untouched(model, kernels):
    assert not keras_lora.lora_layers(model)
    for layer, kernel in zip(model.layers, kernels):
        np.testing.assert_array_equal(to_numpy(layer.kernel.value), kernel)


@pytest.mark.parametrize("arguments, message", [
    (dict(init="svd"), "Received: init='svd'"),
    (dict(init="pissa_niter_x"), "Received: init='pissa_niter_x'"),
    (dict(init="pissa", rank=4), "layer 'out'.*Received: rank=4"),
    (dict(init="olora", use_dora=True), "use_dora=True"),
    (dict(init="gaussian", lora_a_initializer="zeros"), "not both"),
])
def test_bad_requests_raise_and_change_nothing(arguments, message):
    model = mlp()
    kernels = [to_numpy(layer.kernel.value) for layer in model.layers]
    arguments = dict(dict(rank=RANK), **arguments)
    with pytest.raises(ValueError, match=message):
        keras_lora.apply_lora(model, **arguments)
    assert_untouched(model, kernels)


def test_pissa_refuses_layers_other_than_dense_and_einsum():
    model = keras.Sequential([keras.Input((4,), dtype="int32"),
                              layers.Embedding(10, 6, name="embed")])
    with pytest.raises(ValueError, match="layer 'embed'.*Dense and EinsumDense"):
        keras_lora.apply_lora(model, rank=RANK, targets=["embed"], init="pissa")


def test_failure_on_a_late_layer_rolls_back_earlier_kernels(monkeypatch):
    model = mlp()
    kernels = [to_numpy(layer.kernel.value) for layer in model.layers]
    real, calls = init_methods.initial_factors, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 2:
            raise np.linalg.LinAlgError("SVD did not converge")
        return real(*args)

    monkeypatch.setattr(init_methods, "initial_factors", failing)
    with pytest.raises(np.linalg.LinAlgError):
        keras_lora.apply_lora(model, rank=RANK, init="pissa")
    assert_untouched(model, kernels)


def test_save_refuses_a_pissa_adapter_without_initial_factors(tmp_path):
    model = keras_lora.apply_lora(mlp(), rank=RANK, init="olora")
    for layer in keras_lora.lora_layers(model).values():
        layer.adapters["default"].initial_factors = None  # as after a reload
    with pytest.raises(ValueError, match="layer 'up'.*init='olora'"):
        keras_lora.save_adapter(model, str(tmp_path / "a.safetensors"))
    assert not list(tmp_path.iterdir())


def test_keras_file_round_trip_keeps_the_residual_model(tmp_path):
    model = trained("olora")
    expected = model.predict(X, verbose=0)
    model.save(str(tmp_path / "m.keras"))
    loaded = keras.saving.load_model(str(tmp_path / "m.keras"))
    np.testing.assert_allclose(loaded.predict(X, verbose=0), expected, atol=1e-5)


def test_gaussian_works_with_dora():
    expected = mlp().predict(X, verbose=0)
    model = keras_lora.apply_lora(mlp(), rank=RANK, init="gaussian", use_dora=True)
    np.testing.assert_allclose(model.predict(X, verbose=0), expected, atol=1e-5)
    assert keras_lora.lora_layers(model)["up"].use_dora


@pytest.mark.parametrize("first, second", [
    (dict(use_dora=True), dict(init="pissa")),
    (dict(init="olora"), dict(use_dora=True)),
])
def test_dora_and_residual_adapters_do_not_share_a_layer(first, second):
    model = keras_lora.apply_lora(mlp(), rank=RANK, **first)
    kernel = to_numpy(model.get_layer("up").kernel.value)
    with pytest.raises(ValueError, match="layer 'up'.*DoRA"):
        keras_lora.add_adapter(model, "second", rank=RANK, **second)
    assert keras_lora.list_adapters(model) == ["default"]
    np.testing.assert_array_equal(to_numpy(model.get_layer("up").kernel.value), kernel)
