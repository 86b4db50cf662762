"""Switching adapters re-traces nothing: traced predict / generate are kept
per adapter state (keras_lora/traced_cache.py), and never go stale.

Traces are counted twice: `make_predict_function` building a new function
(every backend), and an identity layer counting its calls, which on JAX and
TensorFlow run only while tracing (eager PyTorch calls it every time).
"""

import gc
import weakref

import keras
import numpy as np
import pytest
from keras import layers

import keras_lora
from keras_lora import hub
from keras_lora import traced_cache

X = np.linspace(-1, 1, 24, dtype="float32").reshape(4, 6)
Y = np.linspace(0, 1, 12, dtype="float32").reshape(4, 3)
TRACING = keras.backend.backend() != "torch"


class CountCalls(layers.Layer):
    """The identity; counts its calls (on JAX / TensorFlow, its traces)."""

    calls = 0

    def call(self, x):
        type(self).calls += 1
        return x


def base(counted=False):
    inputs = keras.Input((6,))
    x = layers.Dense(8, activation="tanh", name="up")(inputs)
    if counted:
        x = CountCalls()(x)
    x = layers.EinsumDense("ab,bc->ac", (5,), bias_axes="c", name="mid")(x)
    model = keras.Model(inputs, layers.Dense(3, name="head")(x), name="net")
    rng = np.random.default_rng(3)
    for variable in model.weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    return model


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def two_adapters():
    """Two adapters of the same shapes (a function traced for one would run
    on the other's values without re-tracing), different scalings."""
    model = keras_lora.apply_lora(base(counted=True), rank=2)
    keras_lora.add_adapter(model, "task_b", rank=2, alpha=4.0)
    for seed, name in enumerate(("default", "task_b")):
        rng = np.random.default_rng(seed)
        for layer in keras_lora.lora_layers(model).values():
            adapter = layer.adapters[name]
            adapter.lora_b.assign(rng.normal(size=adapter.lora_b.shape).astype("float32"))
    model.compile(keras.optimizers.SGD(0.1), "mse")
    return model


def expected_with(model, names, enabled=True):
    """What the model computes with `names` active, by hand (a plain model
    holding W + Σ scaling·AᵀB per layer)."""
    plain = base()
    for path, layer in keras_lora.lora_layers(model).items():
        kernel = to_numpy(layer.kernel).copy()
        if layer.merged:
            kernel = kernel - to_numpy(layer.delta_kernel())
        for name in names if enabled else ():
            adapter = layer.adapters[name]
            a = to_numpy(adapter.lora_a).reshape(adapter.rank, -1)
            b = to_numpy(adapter.lora_b).reshape(adapter.rank, -1)
            kernel = kernel + adapter.scaling * (a.T @ b).reshape(kernel.shape)
        plain.get_layer(path).kernel.assign(kernel)
    return to_numpy(plain(X))


@pytest.fixture
def builds(monkeypatch):
    """The predict functions `make_predict_function` builds from now on."""
    made = []
    original = keras.Model.make_predict_function

    def counting(self, force=False):
        fresh = force or self.predict_function is None
        result = original(self, force=force)
        if fresh:
            made.append(self.predict_function)
        return result

    monkeypatch.setattr(keras.Model, "make_predict_function", counting)
    return made


def traces():
    return CountCalls.calls


def check(model, names, enabled=True):
    np.testing.assert_allclose(model.predict(X, verbose=0),
                               expected_with(model, names, enabled),
                               rtol=1e-5, atol=1e-5)


def warm(model):
    """Predicts with each adapter once; returns `{name: predict_function}`."""
    functions = {}
    for name in ("default", "task_b"):
        keras_lora.set_adapter(model, name)
        check(model, [name])
        functions[name] = model.predict_function
    return functions


def test_switching_back_and_forth_or_loading_in_place_traces_nothing_again(
        builds, tmp_path):
    model = two_adapters()
    path = str(tmp_path / "b.safetensors")
    keras_lora.save_adapter(model, path, adapter_name="task_b")
    loaded = to_numpy(keras_lora.load_adapter(base(), path)(X))
    functions = warm(model)
    assert len(builds) == 2 and functions["default"] is not functions["task_b"]
    before = traces()
    for name in ("default", "task_b", "default", "task_b"):
        keras_lora.set_adapter(model, name)
        check(model, [name])
        assert model.predict_function is functions[name]
    # New values of the same shapes, into the active adapter, then into an
    # inactive one: variables are assigned, nothing is traced.
    for layer in keras_lora.lora_layers(model).values():
        layer.adapters["task_b"].lora_b.assign(np.zeros(layer.adapters["task_b"].lora_b.shape))
    keras_lora.load_adapter(model, path, adapter_name="task_b")
    assert model.predict_function is functions["task_b"]
    np.testing.assert_allclose(model.predict(X, verbose=0), loaded, rtol=1e-5, atol=1e-5)
    keras_lora.set_adapter(model, "default")
    keras_lora.load_adapter(model, path, adapter_name="task_b")
    keras_lora.set_adapter(model, "task_b")
    np.testing.assert_allclose(model.predict(X, verbose=0), loaded, rtol=1e-5, atol=1e-5)
    assert len(builds) == 2
    if TRACING:
        assert traces() == before
    # Several adapters at once is a state of its own, traced once.
    keras_lora.set_adapter(model, ["default", "task_b"])
    check(model, ["default", "task_b"])
    assert len(builds) == 3
    keras_lora.set_adapter(model, "default")
    check(model, ["default"])
    assert len(builds) == 3


def test_disable_merge_or_reset_between_switches_never_run_a_stale_trace(builds):
    model = two_adapters()
    functions = warm(model)
    with keras_lora.disable_adapters(model):
        check(model, [], enabled=False)
    assert len(builds) == 3
    check(model, ["task_b"])  # enabled again: the kept trace
    assert model.predict_function is functions["task_b"]
    keras_lora.merge_adapters(model)
    check(model, ["task_b"])
    assert len(builds) == 4
    keras_lora.unmerge_adapters(model)
    check(model, ["task_b"])
    with keras_lora.disable_adapters(model):  # the disabled trace is kept too
        check(model, [], enabled=False)
    keras_lora.set_adapter(model, "default")
    check(model, ["default"])
    assert len(builds) == 4
    # One layer's own switch resets its model too.
    layer = keras_lora.lora_layers(model)["up"]
    layer.disable_adapter()
    assert model.predict_function is None
    layer.enable_adapter()
    check(model, ["default"])
    assert model.predict_function is functions["default"]
    assert len(builds) == 4
    # By hand, in an unchanged state: every kept function is dropped.
    hub.reset_compiled_functions(model)
    assert traced_cache.cached_states(model) == 0
    check(model, ["default"])
    keras_lora.set_adapter(model, "task_b")
    check(model, ["task_b"])
    assert len(builds) == 6
    # Merged by hand (no reset: the live trace is stale until one): the next
    # switch must not keep that trace as the merged state's.
    for layer in keras_lora.lora_layers(model).values():
        layer.merge()
    with keras_lora.disable_adapters(model):
        pass
    check(model, ["task_b"])


def test_fit_after_set_adapter_trains_only_the_active_adapter(builds):
    model = two_adapters()
    warm(model)
    for trained, other in (("task_b", "default"), ("default", "task_b")):
        keras_lora.set_adapter(model, trained)
        values = {name: [to_numpy(layer.adapters[name].lora_b).copy()
                         for layer in keras_lora.lora_layers(model).values()]
                  for name in (trained, other)}
        model.fit(X, Y, epochs=1, verbose=0)
        for layer, before in zip(keras_lora.lora_layers(model).values(), values[other]):
            np.testing.assert_array_equal(to_numpy(layer.adapters[other].lora_b), before)
        assert not all(
            np.allclose(to_numpy(layer.adapters[trained].lora_b), before)
            for layer, before in zip(keras_lora.lora_layers(model).values(),
                                     values[trained])
        )
        check(model, [trained])  # the kept trace reads the trained values
    assert len(builds) == 2


def test_the_cache_is_bounded_dropped_with_rebuilt_layers_and_with_its_model(
        builds, monkeypatch):
    model = two_adapters()
    warm(model)
    keras_lora.set_adapter(model, "default")  # keeps task_b's trace too
    assert traced_cache.cached_states(model) == 2
    keras_lora.add_adapter(model, "task_c", rank=2)  # rebuilt LoRA layers
    assert traced_cache.cached_states(model) == 0
    monkeypatch.setattr(traced_cache, "MAX_STATES", 1)
    warm(model)
    keras_lora.set_adapter(model, "default")
    check(model, ["default"])
    assert traced_cache.cached_states(model) == 1
    assert len(builds) == 5  # "default" was evicted when "task_b" was kept
    # The kept functions refer to the model: they must not keep it alive.
    reference = weakref.ref(model)
    del model
    builds.clear()
    gc.collect()
    assert reference() is None


def gpt2_causal_lm():
    import keras_hub

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=64, num_layers=1, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=16,
    )
    return keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)


def test_causal_lm_generate_follows_set_adapter_without_tracing_again(monkeypatch):
    lm = gpt2_causal_lm()
    steps = []
    original = type(lm).generate_step

    def counting(self, *args, **kwargs):
        steps.append(1)  # JAX / TensorFlow: only while tracing
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(lm), "generate_step", counting)
    lm.compile(sampler="greedy")
    keras_lora.apply_lora(lm, rank=2, adapter_name="a")
    keras_lora.add_adapter(lm, "b", rank=2)
    rng = np.random.default_rng(0)
    for layer in keras_lora.lora_layers(lm).values():
        for adapter in layer.adapters.values():
            adapter.lora_b.assign(
                (0.5 * rng.normal(size=adapter.lora_b.shape)).astype("float32"))
    token_ids = np.zeros((2, 8), "int32")
    token_ids[0, :3] = [1, 2, 3]
    token_ids[1, :2] = [4, 5]
    prompt = {"token_ids": token_ids, "padding_mask": token_ids != 0}
    outputs, functions = {}, {}
    for name in ("a", "b"):
        keras_lora.set_adapter(lm, name)
        outputs[name] = lm.generate(prompt, stop_token_ids=None)["token_ids"]
        functions[name] = lm.generate_function
    assert not np.array_equal(outputs["a"], outputs["b"])
    traced = len(steps)
    for name in ("a", "b", "a"):
        keras_lora.set_adapter(lm, name)
        assert lm.generate_function is functions[name]
        np.testing.assert_array_equal(
            lm.generate(prompt, stop_token_ids=None)["token_ids"], outputs[name])
    if TRACING:
        assert len(steps) == traced
