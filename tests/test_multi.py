"""Many named adapters on one model: add, switch, train one, save one, delete."""

import keras
import numpy as np
import pytest
from keras import layers

import keras_lora
from keras_lora import model_walk

X = np.linspace(-1, 1, 24, dtype="float32").reshape(4, 6)
Y = np.linspace(0, 1, 12, dtype="float32").reshape(4, 3)


def base():
    inputs = keras.Input((6,))
    x = layers.Dense(8, activation="tanh", name="up")(inputs)
    x = layers.EinsumDense("ab,bc->ac", (5,), bias_axes="c", name="mid")(x)
    model = keras.Model(inputs, layers.Dense(3, name="head")(x), name="net")
    rng = np.random.default_rng(3)
    for variable in model.weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    return model


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def randomize(model, name, seed):
    rng = np.random.default_rng(seed)
    for layer in keras_lora.lora_layers(model).values():
        if name in layer.adapters:
            adapter = layer.adapters[name]
            adapter.lora_b.assign(rng.normal(size=adapter.lora_b.shape).astype("float32"))


def two_adapters():
    model = keras_lora.apply_lora(base(), rank=2)
    keras_lora.add_adapter(model, "task_b", rank=4, alpha=8.0)
    randomize(model, "default", 1)
    randomize(model, "task_b", 2)
    return model


def snapshot(model):
    return (
        [(e.path, type(e.layer).__name__) for e in model_walk.walk(model).values()],
        [v.path for v in model.weights],
        [v.trainable for v in model.weights],
        [to_numpy(v).copy() for v in model.weights],
        keras_lora.list_adapters(model),
        keras_lora.active_adapters(model),
    )


def assert_unchanged(model, before):
    now = snapshot(model)
    assert now[0] == before[0] and now[1] == before[1] and now[2] == before[2]
    assert now[4:] == before[4:]
    for got, expected in zip(now[3], before[3]):
        np.testing.assert_array_equal(got, expected)


def test_add_list_and_switch_adapters():
    model = two_adapters()
    assert keras_lora.list_adapters(model) == ["default", "task_b"]
    assert keras_lora.active_adapters(model) == ["default"]
    layer = keras_lora.lora_layers(model)["up"]
    assert {n: a.rank for n, a in layer.adapters.items()} == {"default": 2, "task_b": 4}
    assert layer.lora_a is layer.adapters["default"].lora_a
    assert layer.adapters["task_b"].scaling == 2.0
    keras_lora.set_adapter(model, "task_b")
    assert keras_lora.active_adapters(model) == ["task_b"]


def test_variable_paths_are_readable_and_unique_per_adapter():
    model = two_adapters()
    paths = [v.path for v in model.weights]
    assert len(set(paths)) == len(paths)
    assert "up/lora_a" in paths and "task_b/up/lora_a" in paths


def expected_with(model, names):
    """The outputs computed by hand: W + Σ scaling·AᵀB per layer (numpy)."""
    merged = base()
    for path, layer in keras_lora.lora_layers(model).items():
        kernel = to_numpy(layer.kernel).copy()
        for name in names:
            if name in layer.adapters:
                adapter = layer.adapters[name]
                a = to_numpy(adapter.lora_a).reshape(adapter.rank, -1)
                b = to_numpy(adapter.lora_b).reshape(adapter.rank, -1)
                kernel = kernel + adapter.scaling * (a.T @ b).reshape(kernel.shape)
        merged.get_layer(path).kernel.assign(kernel)
    return to_numpy(merged(X))


@pytest.mark.parametrize(
    "names", [["default"], ["task_b"], ["default", "task_b"]],
    ids=["default", "task_b", "both"],
)
def test_active_adapters_updates_add(names):
    model = two_adapters()
    keras_lora.set_adapter(model, names)
    np.testing.assert_allclose(to_numpy(model(X)), expected_with(model, names),
                               rtol=1e-5, atol=1e-5)


def test_compiled_predict_follows_set_adapter_and_disable():
    model = two_adapters()
    model.compile("sgd", "mse")
    default = model.predict(X, verbose=0)
    keras_lora.set_adapter(model, "task_b")
    task_b = model.predict(X, verbose=0)
    np.testing.assert_allclose(task_b, expected_with(model, ["task_b"]), rtol=1e-5, atol=1e-5)
    with keras_lora.disable_adapters(model):
        np.testing.assert_allclose(model.predict(X, verbose=0), to_numpy(base()(X)),
                                   rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.predict(X, verbose=0), task_b, rtol=1e-6, atol=1e-6)
    keras_lora.set_adapter(model, "default")
    np.testing.assert_allclose(model.predict(X, verbose=0), default, rtol=1e-6, atol=1e-6)


def test_only_the_active_adapter_trains():
    model = two_adapters()
    keras_lora.set_adapter(model, "task_b")
    trainable = {v.path for v in model.trainable_weights}
    assert trainable and all("task_b" in p for p in trainable)
    layer = keras_lora.lora_layers(model)["up"]
    default_before = to_numpy(layer.adapters["default"].lora_b).copy()
    task_b_before = to_numpy(layer.adapters["task_b"].lora_b).copy()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(X, Y, epochs=2, verbose=0)
    np.testing.assert_array_equal(to_numpy(layer.adapters["default"].lora_b), default_before)
    assert not np.allclose(to_numpy(layer.adapters["task_b"].lora_b), task_b_before)


def test_an_adapter_may_cover_a_subset_of_layers():
    model = keras_lora.apply_lora(base(), rank=2)
    keras_lora.add_adapter(model, "head_only", rank=2, targets=["head"])
    layers_ = keras_lora.lora_layers(model)
    assert "head_only" in layers_["head"].adapters
    assert "head_only" not in layers_["up"].adapters
    randomize(model, "head_only", 4)
    keras_lora.set_adapter(model, "head_only")
    np.testing.assert_allclose(to_numpy(model(X)), expected_with(model, ["head_only"]),
                               rtol=1e-5, atol=1e-5)


def test_add_adapter_targets_a_layer_not_yet_adapted():
    model = keras_lora.apply_lora(base(), rank=2, targets=["up"])
    keras_lora.add_adapter(model, "other", rank=2, targets=["mid", "up"])
    layers_ = keras_lora.lora_layers(model)
    assert sorted(layers_) == ["mid", "up"]
    assert list(layers_["mid"].adapters) == ["other"]
    assert list(layers_["up"].adapters) == ["default", "other"]
    assert keras_lora.active_adapters(model) == ["default"]
    np.testing.assert_allclose(to_numpy(model(X)), expected_with(model, ["default"]),
                               rtol=1e-5, atol=1e-5)


def test_merges_fold_the_active_adapters():
    model = two_adapters()
    keras_lora.set_adapter(model, ["default", "task_b"])
    expected = expected_with(model, ["default", "task_b"])
    np.testing.assert_allclose(to_numpy(keras_lora.merge_lora(model)(X)), expected,
                               rtol=1e-5, atol=1e-5)
    keras_lora.merge_adapters(model)
    np.testing.assert_allclose(to_numpy(model(X)), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="merged.*unmerge"):
        keras_lora.set_adapter(model, "default")
    keras_lora.unmerge_adapters(model)
    keras_lora.set_adapter(model, "default")
    np.testing.assert_allclose(to_numpy(model(X)), expected_with(model, ["default"]),
                               rtol=1e-5, atol=1e-5)


def test_delete_adapter():
    model = two_adapters()
    keras_lora.set_adapter(model, ["default", "task_b"])
    keras_lora.delete_adapter(model, "task_b")
    assert keras_lora.list_adapters(model) == ["default"]
    assert keras_lora.active_adapters(model) == ["default"]
    assert not any("task_b" in v.path for v in model.weights)
    np.testing.assert_allclose(to_numpy(model(X)), expected_with(model, ["default"]),
                               rtol=1e-5, atol=1e-5)


def test_deleting_an_adapter_of_a_subset_restores_plain_layers():
    model = keras_lora.apply_lora(base(), rank=2, targets=["up"])
    keras_lora.add_adapter(model, "other", rank=2, targets=["mid"])
    keras_lora.delete_adapter(model, "other")
    assert type(model.get_layer("mid")).__name__ == "EinsumDense"
    assert list(keras_lora.lora_layers(model)) == ["up"]


def test_save_and_load_one_named_adapter(tmp_path):
    model = two_adapters()
    path = str(tmp_path / "b.safetensors")
    keras_lora.save_adapter(model, path, adapter_name="task_b")
    adapter = keras_lora.read_adapter(path)
    assert adapter.layers["up"].rank == 4
    # Onto a base model: the file's adapter, as "default".
    single = keras_lora.load_adapter(base(), path)
    keras_lora.set_adapter(model, "task_b")
    np.testing.assert_allclose(to_numpy(single(X)), to_numpy(model(X)), rtol=1e-5, atol=1e-5)
    # Added under a new name beside the others, not active.
    keras_lora.load_adapter(model, path, adapter_name="copy_of_b")
    assert keras_lora.list_adapters(model) == ["default", "task_b", "copy_of_b"]
    assert keras_lora.active_adapters(model) == ["task_b"]
    keras_lora.set_adapter(model, "copy_of_b")
    np.testing.assert_allclose(to_numpy(model(X)), to_numpy(single(X)), rtol=1e-5, atol=1e-5)


def test_loading_values_into_an_existing_adapter_does_not_retrace(tmp_path):
    model = two_adapters()
    path = str(tmp_path / "b.safetensors")
    keras_lora.save_adapter(model, path, adapter_name="task_b")
    randomize(model, "task_b", 9)
    keras_lora.set_adapter(model, "task_b")
    model.predict(X, verbose=0)
    traced = model.predict_function
    keras_lora.load_adapter(model, path, adapter_name="task_b")
    assert model.predict_function is traced
    np.testing.assert_allclose(
        model.predict(X, verbose=0), to_numpy(keras_lora.load_adapter(base(), path)(X)),
        rtol=1e-5, atol=1e-5,
    )


def test_save_without_a_name_needs_one_adapter_or_one_active(tmp_path):
    model = two_adapters()
    keras_lora.set_adapter(model, ["default", "task_b"])
    with pytest.raises(ValueError, match="pass adapter_name"):
        keras_lora.save_adapter(model, str(tmp_path / "x.safetensors"))
    path = str(tmp_path / "d.safetensors")
    keras_lora.save_adapter(model, path, adapter_name="default")
    before = snapshot(model)
    with pytest.raises(ValueError, match="several adapters.*adapter_name"):
        keras_lora.load_adapter(model, path)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: keras_lora.set_adapter(m, "nope"), "no adapter named 'nope'"),
        (lambda m: keras_lora.set_adapter(m, ["default", "default"]), "named twice"),
        (lambda m: keras_lora.add_adapter(m, "task_b"), "already has an adapter named 'task_b'"),
        (lambda m: keras_lora.add_adapter(m, "not valid"), "Python identifier"),
        (lambda m: keras_lora.add_adapter(m, "c", rank=0), "rank=0"),
        (lambda m: keras_lora.add_adapter(m, "c", targets=["nothing"]), "matches no layer"),
        (lambda m: keras_lora.delete_adapter(m, "nope"), "no adapter named 'nope'"),
        (lambda m: keras_lora.set_adapter(m, []), "non-empty list"),
    ],
    ids=["unknown", "duplicate", "existing_name", "bad_name", "bad_rank",
         "no_target", "delete_unknown", "empty"],
)
def test_bad_requests_name_the_adapter_and_change_nothing(call, message):
    model = two_adapters()
    before = snapshot(model)
    with pytest.raises((ValueError, TypeError), match=message):
        call(model)
    assert_unchanged(model, before)


def test_deleting_the_last_adapter_is_refused():
    model = keras_lora.apply_lora(base(), rank=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match="last adapter.*merge_lora"):
        keras_lora.delete_adapter(model, "default")
    assert_unchanged(model, before)


@pytest.mark.parametrize("step", ["add_adapter", "load_adapter"])
def test_a_failure_midway_changes_nothing(monkeypatch, tmp_path, step):
    from keras_lora import multi

    model = two_adapters()
    path = str(tmp_path / "b.safetensors")
    keras_lora.save_adapter(model, path, adapter_name="task_b")
    before = snapshot(model)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("failure midway")

    monkeypatch.setattr(multi, "_with_adapters", failing)
    with pytest.raises(RuntimeError, match="failure midway"):
        if step == "add_adapter":
            keras_lora.add_adapter(model, "c", rank=2)
        else:
            keras_lora.load_adapter(model, path, adapter_name="c")
    assert calls
    assert_unchanged(model, before)


def test_layer_config_round_trips_every_adapter(tmp_path):
    inputs = keras.Input((6,))
    lora = keras_lora.LoRADense(3, rank=2, name="proj")
    model = keras.Model(inputs, lora(inputs))
    keras_lora.add_adapter(model, "task_b", rank=3)
    randomize(model, "task_b", 5)
    keras_lora.set_adapter(model, ["default", "task_b"])
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    layer = keras_lora.lora_layers(loaded)["proj"]
    assert list(layer.adapters) == ["default", "task_b"]
    assert layer.active_adapters == ("default", "task_b")
    np.testing.assert_allclose(to_numpy(loaded(X)), to_numpy(model(X)), rtol=1e-6, atol=1e-6)


def test_model_save_round_trips_every_adapter_of_nested_layers(tmp_path):
    inputs = keras.Input((3, 6))
    x = layers.MultiHeadAttention(2, 4, name="mha")(inputs, inputs)
    model = keras.Model(inputs, layers.Dense(3, name="head")(x))
    keras_lora.apply_lora(model, rank=2)
    keras_lora.add_adapter(model, "task_b", rank=3, targets=["mha"])
    randomize(model, "default", 1)
    randomize(model, "task_b", 2)
    keras_lora.set_adapter(model, ["task_b"])
    x_data = np.random.default_rng(0).normal(size=(2, 3, 6)).astype("float32")
    expected = to_numpy(model(x_data))
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert keras_lora.list_adapters(loaded) == ["default", "task_b"]
    assert keras_lora.active_adapters(loaded) == ["task_b"]
    np.testing.assert_allclose(to_numpy(loaded(x_data)), expected, rtol=1e-5, atol=1e-5)
    keras_lora.set_adapter(loaded, "default")
    keras_lora.set_adapter(model, "default")
    np.testing.assert_allclose(to_numpy(loaded(x_data)), to_numpy(model(x_data)),
                               rtol=1e-5, atol=1e-5)


def test_an_adapter_on_fewer_layers_saves_while_another_is_active(tmp_path):
    model = keras_lora.apply_lora(base(), rank=2, adapter_name="task_b")
    keras_lora.add_adapter(model, "task_c", rank=2, targets=["head"])
    randomize(model, "task_c", 3)
    keras_lora.set_adapter(model, "task_b")
    path = str(tmp_path / "c.safetensors")
    keras_lora.save_adapter(model, path, adapter_name="task_c")
    assert list(keras_lora.read_adapter(path).layers) == ["head"]
    keras_lora.set_adapter(model, "task_c")
    single = keras_lora.load_adapter(base(), path)
    np.testing.assert_allclose(to_numpy(single(X)), to_numpy(model(X)), rtol=1e-5, atol=1e-5)
