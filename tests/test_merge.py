"""merge_lora, merge_adapters / unmerge_adapters: one table of models, shared checks."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import layers

from keras_lora import model_walk
from keras_lora.layers import LoRALayer
from keras_lora.merge import merge_adapters
from keras_lora.merge import merge_lora
from keras_lora.merge import unmerge_adapters
from keras_lora.surgery import apply_lora
from keras_lora.surgery import lora_layers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


@keras.saving.register_keras_serializable(package="keras_lora_merge_tests")
class Block(layers.Layer):
    """Sub-layers created in `__init__`, invisible in the config."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.up = layers.Dense(8, activation="relu", name="up")
        self.down = layers.Dense(4, name="down")

    def call(self, x):
        return x + self.down(self.up(x))


@keras.saving.register_keras_serializable(package="keras_lora_merge_tests")
class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.block = Block(name="block")
        self.head = layers.Dense(3, name="head")

    def call(self, x):
        return self.head(self.block(x))


def functional():
    inputs = keras.Input((4,))
    x = layers.Dense(6, activation="relu", name="dense")(inputs)
    x = layers.EinsumDense("ab,bc->ac", (3,), bias_axes="c", name="einsum")(x)
    return keras.Model(inputs, x), np.random.rand(5, 4).astype("float32")


def sequential():
    model = keras.Sequential(
        [keras.Input((4,)), layers.Dense(6, activation="tanh"), layers.Dense(3)]
    )
    return model, np.random.rand(5, 4).astype("float32")


def nested():
    inner = keras.Sequential(
        [keras.Input((4,)), layers.Dense(6, name="inner_dense")], name="inner"
    )
    inputs = keras.Input((4,))
    outputs = layers.Dense(3, name="head")(inner(inputs))
    return keras.Model(inputs, outputs), np.random.rand(5, 4).astype("float32")


def attention():
    inputs = keras.Input((3, 4))
    x = layers.MultiHeadAttention(2, 2, name="mha")(inputs, inputs)
    return keras.Model(inputs, x), np.random.rand(5, 3, 4).astype("float32")


def subclassed():
    model = Subclassed(name="sub")
    x = np.random.rand(5, 4).astype("float32")
    model(x)
    return model, x


def keras_hub_task():
    import keras_hub
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "fox"]
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        keras_hub.models.BertTokenizer(vocabulary=vocabulary), sequence_length=6
    )
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(vocabulary), num_layers=1, num_heads=2,
        hidden_dim=4, intermediate_dim=8, max_sequence_length=6,
    )
    task = keras_hub.models.BertTextClassifier(
        backbone, num_classes=2, preprocessor=preprocessor
    )
    return task, ["the fox", "fox the fox"]


TEST_CASES = [
    ("functional", functional),
    ("sequential", sequential),
    ("nested", nested),
    ("attention", attention),
    ("subclassed", subclassed),
    ("keras_hub_task", keras_hub_task),
]
CASE_IDS = [name for name, _ in TEST_CASES]
CASES = [factory for _, factory in TEST_CASES]


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def outputs(model, x):
    if getattr(model, "preprocessor", None) is not None:  # keras-hub task
        return to_numpy(model.predict(x, verbose=0))
    return to_numpy(model(x))


def adapted(factory, **lora_kwargs):
    """A model with LoRA applied and random (non-zero) adapters."""
    model, x = factory()
    apply_lora(model, rank=2, alpha=3.0, **lora_kwargs)
    rng = np.random.default_rng(0)
    for layer in lora_layers(model).values():
        layer.lora_b.assign(rng.normal(size=layer.lora_b.shape))
    return model, x


def has_lora_layers(model):
    return any(
        isinstance(entry.layer, LoRALayer)
        for entry in model_walk.walk(model).values()
    )


def kernels(model):
    return [to_numpy(layer.kernel).copy() for layer in lora_layers(model).values()]


@pytest.mark.parametrize("factory", CASES, ids=CASE_IDS)
def test_merged_model_gives_the_lora_outputs(factory):
    model, x = adapted(factory)
    expected = outputs(model, x)
    merged = merge_lora(model)
    np.testing.assert_allclose(
        outputs(merged, x), expected, **TOLERANCE
    )


@pytest.mark.parametrize("factory", CASES, ids=CASE_IDS)
def test_merged_model_keeps_the_class_and_has_no_lora_layers(factory):
    model, _ = adapted(factory)
    merged = merge_lora(model)
    assert type(merged) is type(model)
    assert merged is not model
    assert not has_lora_layers(merged)


@pytest.mark.parametrize("factory", CASES, ids=CASE_IDS)
def test_in_place_merge_gives_the_lora_outputs_without_copies(factory):
    model, x = adapted(factory)
    expected = outputs(model, x)
    base_kernels = [layer.kernel for layer in lora_layers(model).values()]
    assert merge_lora(model, in_place=True) is model
    assert not has_lora_layers(model)
    kept = {id(v) for v in model.weights}
    assert all(id(kernel) in kept for kernel in base_kernels)
    np.testing.assert_allclose(
        outputs(model, x), expected, **TOLERANCE
    )


def test_merged_kernel_is_base_plus_scaled_product():
    model, _ = adapted(functional)
    layer = lora_layers(model)["dense"]
    w, a, b = (to_numpy(v) for v in (layer.kernel, layer.lora_a, layer.lora_b))
    merged = merge_lora(model)
    np.testing.assert_allclose(
        to_numpy(merged.get_layer("dense").kernel), w + 1.5 * a.T @ b, rtol=1e-6
    )


def test_merge_leaves_the_lora_model_untouched():
    model, x = adapted(functional)
    before = [to_numpy(v).copy() for v in model.weights]
    expected = to_numpy(model(x))
    merge_lora(model)
    assert list(lora_layers(model)) == ["dense", "einsum"]
    for variable, value in zip(model.weights, before):
        np.testing.assert_array_equal(to_numpy(variable), value)
    np.testing.assert_array_equal(to_numpy(model(x)), expected)


def test_disabled_adapter_merges_to_the_base_kernel():
    model, x = adapted(functional)
    layer = lora_layers(model)["dense"]
    layer.disable_adapter()
    merged = merge_lora(model)
    np.testing.assert_array_equal(
        to_numpy(merged.get_layer("dense").kernel), to_numpy(layer.kernel)
    )
    np.testing.assert_allclose(
        to_numpy(merged(x)), to_numpy(model(x)), **TOLERANCE
    )


def test_already_merged_layers_are_not_merged_twice():
    model, x = adapted(functional)
    expected = to_numpy(model(x))
    merge_adapters(model)
    np.testing.assert_allclose(
        to_numpy(merge_lora(model)(x)), expected, **TOLERANCE
    )


@pytest.mark.parametrize("in_place", [False, True], ids=["new", "in_place"])
def test_non_finite_update_raises_and_changes_nothing(in_place):
    model, x = adapted(functional)
    lora_layers(model)["einsum"].lora_b.assign(
        np.full((2, 3), np.nan, "float32")
    )
    before = kernels(model)
    with pytest.raises(ValueError, match="'einsum'.*NaN or infinite"):
        merge_lora(model, in_place=in_place)
    assert list(lora_layers(model)) == ["dense", "einsum"]
    for kernel, value in zip(kernels(model), before):
        np.testing.assert_array_equal(kernel, value)


def test_merged_file_loads_with_plain_keras_in_a_fresh_process(tmp_path):
    model, x = adapted(functional)
    path = str(tmp_path / "merged.keras")
    merge_lora(model).save(path)
    np.save(tmp_path / "x.npy", x)
    code = (
        "import sys, numpy as np, keras\n"
        f"model = keras.saving.load_model({path!r})\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, "
        f"keras.ops.convert_to_numpy(model(np.load({str(tmp_path / 'x.npy')!r}))))\n"
        "assert not any(m.startswith('keras_lora') for m in sys.modules)\n"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True,
        env=env, cwd=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    np.testing.assert_allclose(
        np.load(tmp_path / "y.npy"), to_numpy(model(x)), **TOLERANCE
    )


def test_merge_adapters_keeps_lora_layers_and_outputs():
    model, x = adapted(functional)
    expected = outputs(model, x)
    assert merge_adapters(model) is model
    assert all(layer.merged for layer in lora_layers(model).values())
    np.testing.assert_allclose(
        outputs(model, x), expected, **TOLERANCE
    )


def test_merge_adapters_resets_compiled_functions():
    model, x = adapted(functional)
    model.compile(loss="mse")
    model.predict(x, verbose=0)
    assert model.predict_function is not None
    merge_adapters(model)
    assert model.predict_function is None
    assert model.train_function is None and model.test_function is None
    model.predict(x, verbose=0)
    unmerge_adapters(model)
    assert model.predict_function is None


def test_unmerge_restores_base_kernels_to_float_tolerance():
    model, x = adapted(functional)
    before = kernels(model)
    expected = to_numpy(model(x))
    unmerge_adapters(merge_adapters(model))
    assert not any(layer.merged for layer in lora_layers(model).values())
    for kernel, value in zip(kernels(model), before):
        np.testing.assert_allclose(kernel, value, rtol=0, atol=1e-6)
    np.testing.assert_allclose(to_numpy(model(x)), expected, **TOLERANCE)


def test_merge_adapters_with_non_finite_update_changes_nothing():
    model, _ = adapted(functional)
    lora_layers(model)["einsum"].lora_a.assign(
        np.full((2, 6), np.inf, "float32")
    )
    before = kernels(model)
    with pytest.raises(ValueError, match="'einsum'"):
        merge_adapters(model)
    assert not any(layer.merged for layer in lora_layers(model).values())
    for kernel, value in zip(kernels(model), before):
        np.testing.assert_array_equal(kernel, value)


@pytest.mark.parametrize("merge", [merge_lora, merge_adapters])
def test_model_without_lora_layers_is_an_error(merge):
    model, _ = functional()
    with pytest.raises(ValueError, match="has no LoRA layers"):
        merge(model)


def test_unrebuildable_model_error_suggests_in_place():
    class Unregistered(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    model = Unregistered()
    model(np.ones((1, 4)))
    apply_lora(model, rank=2)
    with pytest.raises(ValueError, match="in_place=True"):
        merge_lora(model)
    merge_lora(model, in_place=True)
    assert not has_lora_layers(model)


def test_disable_and_enable_adapters_reach_a_compiled_predict():
    import keras_lora

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    x = np.random.rand(5, 4).astype("float32")
    base = model.predict(x, verbose=0)
    keras_lora.apply_lora(model, rank=2)
    for layer in keras_lora.lora_layers(model).values():
        layer.lora_b.assign(np.ones(layer.lora_b.shape))
    adapted = model.predict(x, verbose=0)
    assert not np.allclose(adapted, base)
    keras_lora.disable_adapters(model)
    np.testing.assert_array_equal(model.predict(x, verbose=0), base)
    keras_lora.enable_adapters(model)
    np.testing.assert_allclose(model.predict(x, verbose=0), adapted, atol=1e-6)


def test_layer_level_disable_adapter_reaches_a_compiled_predict():
    import keras_lora

    model, x = adapted(functional)
    with_adapter = model.predict(x, verbose=0)
    layer = lora_layers(model)["einsum"]
    layer.disable_adapter()
    without = model.predict(x, verbose=0)
    assert not np.allclose(without, with_adapter)
    layer.enable_adapter()
    np.testing.assert_allclose(model.predict(x, verbose=0), with_adapter, atol=1e-6)
    keras_lora.disable_adapters(model)
    np.testing.assert_allclose(model.predict(x, verbose=0), to_numpy(
        merge_lora(model)(x)), atol=1e-6)


# Disabled adapters: merged models compute what the LoRA model computes ----


def test_merge_adapters_leaves_disabled_adapters_out_and_outputs_unmoved():
    import keras_lora

    model, x = adapted(functional)
    keras_lora.disable_adapters(model)
    before = to_numpy(model(x))
    kernels_before = kernels(model)
    merge_adapters(model)
    np.testing.assert_allclose(to_numpy(model(x)), before, **TOLERANCE)
    assert not any(layer.merged for layer in lora_layers(model).values())
    for kernel, value in zip(kernels(model), kernels_before):
        np.testing.assert_array_equal(kernel, value)
    # merge_lora agrees: a disabled adapter merges to the base kernel.
    np.testing.assert_allclose(to_numpy(merge_lora(model)(x)), before, **TOLERANCE)


def test_merge_adapters_ignores_nan_in_a_disabled_layer_and_merges_the_rest():
    model, x = adapted(functional)
    einsum = lora_layers(model)["einsum"]
    einsum.lora_b.assign(np.full((2, 3), np.nan, "float32"))
    einsum.disable_adapter()
    merge_adapters(model)
    assert lora_layers(model)["dense"].merged and not einsum.merged
    assert np.all(np.isfinite(to_numpy(model(x))))


def test_merging_a_disabled_layer_directly_is_refused():
    model, _ = adapted(functional)
    layer = lora_layers(model)["dense"]
    layer.disable_adapter()
    before = kernels(model)
    with pytest.raises(ValueError, match="'dense'.*disabled.*enable_adapter"):
        layer.merge()
    assert not layer.merged
    np.testing.assert_array_equal(kernels(model)[0], before[0])


# Merged kernels that overflow their dtype are refused, nothing changed ----


def overflowing(dtype):
    """A model whose "einsum" merged kernel overflows `dtype`; finite update."""
    model, x = adapted(functional)
    layer = lora_layers(model)["einsum"]
    if dtype == "float32":
        kernel = to_numpy(layer.kernel).copy()
        kernel[0, 0] = 3e38
        layer.kernel.assign(kernel)
        a = np.zeros((2, 6), "float32")
        a[0, 0] = 1.0
        b = np.zeros((2, 3), "float32")
        b[0, 0] = 2e38 / layer.scaling
    else:
        a = np.full((2, 6), 200.0, "float32")
        b = np.full((2, 3), 200.0, "float32")  # update 1.2e5 > 65504
    layer.lora_a.assign(a)
    layer.lora_b.assign(b)
    assert np.all(np.isfinite(to_numpy(layer.delta_kernel())))
    return model, x


@pytest.mark.parametrize("route", ["merge_adapters", "new", "in_place"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_merged_kernel_overflowing_its_dtype_is_refused(route, dtype):
    if dtype == "float16":
        keras.config.set_dtype_policy("float16")
    model, x = overflowing(dtype)
    before = kernels(model)
    with pytest.raises(ValueError, match=f"'einsum'.*overflows its dtype {dtype}"):
        if route == "merge_adapters":
            merge_adapters(model)
        else:
            merge_lora(model, in_place=route == "in_place")
    assert list(lora_layers(model)) == ["dense", "einsum"]
    assert not any(layer.merged for layer in lora_layers(model).values())
    for kernel, value in zip(kernels(model), before):
        np.testing.assert_array_equal(kernel, value)


# A new merged model keeps the compile settings ----------------------------


def test_merged_model_keeps_the_compile_settings():
    model, x = adapted(functional)
    model.compile(keras.optimizers.SGD(0.05), loss="mse", metrics=["mae"])
    merged = merge_lora(model)
    assert merged.compiled
    assert isinstance(merged.optimizer, keras.optimizers.SGD)
    assert merged.optimizer is not model.optimizer
    assert merged.get_compile_config()["loss"] == "mse"
    merged.fit(x, np.zeros((5, 3)), epochs=1, verbose=0)


def test_uncompiled_model_merges_uncompiled():
    model, _ = adapted(functional)
    assert not merge_lora(model).compiled
