"""LoRA on bases quantized by Keras's own `model.quantize` (int8, int4).

One small model holds a `Dense` with an activation, Gemma's query
`EinsumDense` (`btd,ndh->btnh`: the contracted axis in the middle) and
Gemma's attention output (`btnh,nhd->btd`: two contracted axes); each
check runs on an int8 and an int4 base (Keras's default int4 quantizes in
blocks with zero points; one test takes the per-channel form too).
"""

import os

import keras
import numpy as np
import pytest

import keras_lora
from keras_lora import hub

MODES = ["int8", "int4"]
X = np.random.default_rng(0).normal(size=(4, 3, 8)).astype("float32")


def float_model(seed=3):
    """Dense(relu) -> Gemma query -> Gemma attention output, seeded."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((3, 8))
    hidden = keras.layers.Dense(6, activation="relu", name="dense")(inputs)
    query = keras.layers.EinsumDense(
        "btd,ndh->btnh", (3, 2, 4), bias_axes="nh", name="query"
    )(hidden)
    outputs = keras.layers.EinsumDense(
        "btnh,nhd->btd", (3, 5), bias_axes="d", name="attention_output"
    )(query)
    return keras.Model(inputs, outputs, name="tiny")


def quantized_model(mode, config=None, seed=3):
    model = float_model(seed)
    if config is None:
        model.quantize(mode)
    else:
        model.quantize(config=config)
    return model


def randomize_lora_b(model, scale=0.3, seed=1):
    rng = np.random.default_rng(seed)
    for layer in keras_lora.lora_layers(model).values():
        layer.lora_b.assign(
            (scale * rng.normal(size=layer.lora_b.shape)).astype("float32")
        )
    hub.reset_compiled_functions(model)


def predict(model, x=X):
    return keras.ops.convert_to_numpy(model(x))


def adapted(mode, config=None):
    model = keras_lora.apply_lora(quantized_model(mode, config), rank=2)
    randomize_lora_b(model)
    return model


def quantized_state(model):
    """`{"<layer>/<variable>": dtype}` of the non-adapter weights."""
    return {
        "/".join(v.path.split("/")[-2:]): keras.backend.standardize_dtype(v.dtype)
        for v in model.weights if "lora" not in v.path
    }


@pytest.fixture(scope="module", params=MODES)
def trained(request):
    """A LoRA model on a quantized base after one epoch of `fit`, with the
    weights before training and the base's quantization error."""
    mode = request.param
    model = keras_lora.apply_lora(quantized_model(mode), rank=2)
    randomize_lora_b(model)
    before = {v.path: keras.ops.convert_to_numpy(v.value).copy() for v in model.weights}
    model.compile(keras.optimizers.Adam(0.05), "mse")
    target = np.random.default_rng(2).normal(size=(4, 3, 5)).astype("float32")
    history = model.fit(X, target, epochs=3, verbose=0)
    base_error = np.abs(predict(quantized_model(mode)) - predict(float_model())).max()
    return mode, model, before, history.history["loss"], base_error


# Forward ----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_fresh_adapter_computes_exactly_what_the_quantized_model_computes(mode):
    model = quantized_model(mode)
    expected = predict(model)
    keras_lora.apply_lora(model, rank=2)
    assert [type(layer).__name__ for layer in model.layers[1:]] == [
        "LoRADense", "LoRAEinsumDense", "LoRAEinsumDense"]
    np.testing.assert_array_equal(predict(model), expected)


def _int8_values_and_input_gradient(layer, x, fast):
    from keras_lora.layers import quantized
    from keras_lora.layers import quantized_kernels

    quantized_kernels.ENABLED = fast
    try:
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            x = tf.constant(x)
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = quantized.preactivation(layer, x)
                loss = tf.reduce_sum(y * y)
            grad = tape.gradient(loss, x)
        elif keras.backend.backend() == "torch":
            import torch

            x = torch.tensor(x, requires_grad=True)
            y = quantized.preactivation(layer, x)
            (y * y).sum().backward()
            grad = x.grad
        else:
            import jax

            def loss(x):
                y = quantized.preactivation(layer, x)
                return (y * y).sum(), y

            grad, y = jax.grad(loss, has_aux=True)(x)
        return keras.ops.convert_to_numpy(y), keras.ops.convert_to_numpy(grad)
    finally:
        quantized_kernels.ENABLED = True


@pytest.mark.parametrize(
    "equation, input_shape, output_shape",
    [
        (None, (5, 3, 1100), 24),  # Dense, 1100 > 1024 terms: chunked
        (None, (6, 16), 8),
        ("btd,ndh->btnh", (2, 3, 16), (3, 2, 4)),
        ("btnh,nhd->btd", (2, 3, 2, 4), (3, 5)),
    ],
)
def test_int8_fast_path_is_bit_for_bit_keras_int8_call(
        equation, input_shape, output_shape):
    # keras-lora's faster int8 x int8 contraction (torch / TF on CPU; JAX
    # and GPUs use Keras's op) gives Keras's outputs and input gradients.
    keras.utils.set_random_seed(0)
    if equation is None:
        layer = keras.layers.Dense(output_shape, activation="relu")
    else:
        layer = keras.layers.EinsumDense(equation, output_shape, bias_axes="d"
                                         if equation.endswith("btd") else "nh")
    layer.build((None,) + input_shape[1:])
    layer.quantize("int8")
    layer.bias.assign(np.random.default_rng(2).normal(
        size=layer.bias.shape).astype("float32"))
    x = 3 * np.random.default_rng(1).normal(size=input_shape).astype("float32")
    keras_y, keras_grad = _int8_values_and_input_gradient(layer, x, fast=False)
    fast_y, fast_grad = _int8_values_and_input_gradient(layer, x, fast=True)
    np.testing.assert_array_equal(fast_y, keras_y)
    np.testing.assert_array_equal(fast_grad, keras_grad)
    # Keras's own forward, activation excluded, is what both compute.
    activation, layer.activation = layer.activation, None
    np.testing.assert_array_equal(
        fast_y, keras.ops.convert_to_numpy(layer(x)))
    layer.activation = activation


@pytest.mark.parametrize("mode", MODES)
def test_adapters_are_float32_with_the_logical_kernel_shapes(mode):
    model = keras_lora.apply_lora(quantized_model(mode), rank=2)
    layers = keras_lora.lora_layers(model)
    query = layers["query"]
    assert query.kernel_shape(query.base_layer) == (2, 6, 4)
    assert tuple(query.lora_a.shape) == (2, 6)
    assert tuple(query.lora_b.shape) == (2, 2, 4)
    assert tuple(layers["attention_output"].lora_a.shape) == (2, 2, 4)
    assert all(
        v.dtype == "float32" for layer in layers.values()
        for v in (layer.lora_a, layer.lora_b)
    )


def test_fit_learns_and_trains_only_the_adapters(trained):
    mode, model, before, losses, _ = trained
    assert losses[-1] < losses[0]
    changed = sorted(
        v.path for v in model.weights
        if not np.array_equal(before[v.path], keras.ops.convert_to_numpy(v.value))
    )
    assert changed == sorted(
        f"{name}/{factor}" for name in ("dense", "query", "attention_output")
        for factor in ("lora_a", "lora_b")
    )


def test_the_base_stays_quantized_while_training(trained):
    mode, model, _, _, _ = trained
    state = quantized_state(model)
    assert state["query/kernel"] == "int8"
    assert state["dense/kernel"] == "int8"
    for layer in keras_lora.lora_layers(model).values():
        assert layer.base_layer.quantization_mode == mode
        assert layer.dtype_policy.quantization_mode is None
    if mode == "int4":
        # Packed: two int4 values per byte along the last axis.
        assert tuple(model.get_layer("dense").base_layer._kernel.shape) == (8, 3)


def test_no_float_copy_of_a_base_kernel_is_kept(trained):
    _, model, _, _, _ = trained
    float_kernels = [
        v.path for v in model.weights
        if "kernel" in v.name and "lora" not in v.path
        and "float" in keras.backend.standardize_dtype(v.dtype)
        and "scale" not in v.name
    ]
    assert float_kernels == []


# Merging ----------------------------------------------------------------


def test_merge_lora_keeps_the_quantization_within_one_rounding(trained):
    mode, model, _, _, base_error = trained
    merged = keras_lora.merge_lora(model)
    for name in ("dense", "query", "attention_output"):
        layer = merged.get_layer(name)
        assert type(layer).__name__ in ("Dense", "EinsumDense")
        assert layer.quantization_mode == mode
    assert quantized_state(merged)["query/kernel"] == "int8"
    # Quantizing W + s·A·B again costs about what quantizing W did.
    error = np.abs(predict(merged) - predict(model)).max()
    assert error <= 3 * base_error


def test_merge_lora_dequantize_equals_the_lora_outputs_on_int4(trained):
    mode, model, _, _, base_error = trained
    merged = keras_lora.merge_lora(model, dequantize=True)
    for name in ("dense", "query", "attention_output"):
        assert merged.get_layer(name).quantization_mode is None
        assert merged.get_layer(name).kernel.dtype == "float32"
    if mode == "int4":
        # Keras's int4 layers quantize weights only.
        np.testing.assert_allclose(predict(merged), predict(model), atol=2e-5)
    else:
        # Keras's int8 layers also round their inputs to int8.
        assert np.abs(predict(merged) - predict(model)).max() <= 3 * base_error


@pytest.mark.parametrize("config", [
    keras.quantizers.Int8QuantizationConfig(activation_quantizer=None),
    keras.quantizers.Int4QuantizationConfig(block_size=-1),
], ids=["int8_weight_only", "int4_per_channel"])
def test_merge_lora_dequantize_is_exact_for_weight_only_quantization(config):
    model = adapted(None, config)
    merged = keras_lora.merge_lora(model, dequantize=True)
    np.testing.assert_allclose(predict(merged), predict(model), atol=2e-5)


def test_merge_lora_in_place_requantizes_the_base_layers():
    mode = "int4"
    model = adapted(mode)
    lora_outputs = predict(model)
    base_error = np.abs(predict(quantized_model(mode)) - predict(float_model())).max()
    merged = keras_lora.merge_lora(model, in_place=True)
    assert merged is model
    assert [type(layer).__name__ for layer in model.layers[1:]] == [
        "Dense", "EinsumDense", "EinsumDense"]
    assert model.get_layer("query").quantization_mode == mode
    assert quantized_state(model)["query/kernel"] == "int8"
    assert np.abs(predict(model) - lora_outputs).max() <= 3 * base_error


def test_merge_adapters_is_refused_and_changes_nothing():
    model = adapted("int8")
    before = predict(model)
    with pytest.raises(ValueError, match="'dense'.*int8-quantized.*merge_lora"):
        keras_lora.merge_adapters(model)
    assert not any(l.merged for l in keras_lora.lora_layers(model).values())
    np.testing.assert_array_equal(predict(model), before)


def test_in_place_dequantize_is_refused():
    model = adapted("int4")
    with pytest.raises(ValueError, match="in_place=True, dequantize=True"):
        keras_lora.merge_lora(model, in_place=True, dequantize=True)
    assert type(model.get_layer("dense")).__name__ == "LoRADense"


# Adapter files across bases ----------------------------------------------


@pytest.mark.parametrize("source,target", [("int8", None), (None, "int4")])
def test_an_adapter_loads_across_float_int8_and_int4_bases(tmp_path, source, target):
    trained_model = adapted(source) if source else keras_lora.apply_lora(
        float_model(), rank=2)
    randomize_lora_b(trained_model, seed=5)
    path = str(tmp_path / "adapter.safetensors")
    keras_lora.save_adapter(trained_model, path)
    base = quantized_model(target) if target else float_model()
    keras_lora.load_adapter(base, path)
    for name, layer in keras_lora.lora_layers(trained_model).items():
        loaded = keras_lora.lora_layers(base)[name]
        for factor in ("lora_a", "lora_b"):
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(getattr(loaded, factor).value),
                keras.ops.convert_to_numpy(getattr(layer, factor).value),
            )
    # The same update on the other base: outputs differ only by the bases.
    difference = np.abs(predict(base) - predict(trained_model)).max()
    assert difference <= 0.2 * np.abs(predict(trained_model)).max()


def test_an_int8_adapter_loads_in_place_onto_an_adapted_int4_model(tmp_path):
    path = str(tmp_path / "adapter.safetensors")
    keras_lora.save_adapter(adapted("int8"), path)
    target = keras_lora.apply_lora(quantized_model("int4"), rank=2)
    keras_lora.load_adapter(target, path)
    assert keras_lora.lora_layers(target)["query"].base_layer.quantization_mode == "int4"
    assert np.abs(keras.ops.convert_to_numpy(
        keras_lora.lora_layers(target)["query"].lora_b.value)).max() > 0


# Other entry points --------------------------------------------------------


def test_clone_with_lora_and_add_adapter_on_a_quantized_model():
    base = quantized_model("int8")
    clone = keras_lora.clone_with_lora(base, rank=2)
    np.testing.assert_array_equal(predict(clone), predict(base))
    assert clone.get_layer("query").base_layer.quantization_mode == "int8"
    assert base.get_layer("query").quantization_mode == "int8"
    keras_lora.add_adapter(clone, "second", rank=3)
    assert set(keras_lora.lora_layers(clone)["query"].adapters) == {"default", "second"}


def test_a_keras_file_round_trips_a_quantized_lora_model(tmp_path):
    model = adapted("int4")
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.get_layer("query").base_layer.quantization_mode == "int4"
    np.testing.assert_allclose(predict(loaded), predict(model), atol=1e-6)


def test_export_merged_serves_the_requantized_model(tmp_path):
    model = adapted("int8")
    artifact = keras_lora.export_merged(model, str(tmp_path / "served"))
    import tensorflow as tf

    loaded = tf.saved_model.load(artifact)
    served = loaded.serve(tf.constant(X)).numpy()
    np.testing.assert_allclose(
        served, predict(keras_lora.merge_lora(model)), atol=1e-5
    )


# What is refused ---------------------------------------------------------


def test_float8_base_is_refused_naming_the_layer_and_mode():
    model = quantized_model("float8")
    with pytest.raises(ValueError, match="'dense' is quantized with mode 'float8'"):
        keras_lora.apply_lora(model, rank=2)
    assert type(model.get_layer("dense")).__name__ == "Dense"


def test_dora_and_residual_inits_are_refused_on_a_quantized_base():
    model = quantized_model("int8")
    with pytest.raises(ValueError, match="DoRA.*int8 base"):
        keras_lora.apply_lora(model, rank=2, use_dora=True)
    with pytest.raises(ValueError, match="init='pissa'.*int8 base"):
        keras_lora.apply_lora(model, rank=2, init="pissa")
    assert type(model.get_layer("dense")).__name__ == "Dense"


def test_a_quantized_embedding_is_refused_by_name():
    inputs = keras.Input((3,), dtype="int32")
    model = keras.Model(inputs, keras.layers.Embedding(10, 4, name="emb")(inputs))
    model.quantize("int8")
    with pytest.raises(ValueError, match="'emb' is quantized.*LoRAEmbedding adapts float"):
        keras_lora.apply_lora(model, rank=2, targets=["emb"])


def test_quantize_after_apply_lora_is_refused_saying_the_order():
    model = keras_lora.apply_lora(float_model(), rank=2)
    with pytest.raises(ValueError, match="quantize the base first"):
        model.quantize("int8")
    assert model.get_layer("dense").base_layer.quantization_mode is None


# keras-hub -----------------------------------------------------------------


def _tiny_int8_lm(name):
    """A tiny keras-hub causal LM quantized int8, its tied embedding float:
    Keras's int8 ReversibleEmbedding rounds the logits' inputs with no
    gradient through them, which would stop every gradient below the logits
    (docs/quantized_bases.md)."""
    import keras_hub

    keras.utils.set_random_seed(0)
    sizes = dict(vocabulary_size=64, num_layers=1, num_query_heads=2,
                 num_key_value_heads=1, hidden_dim=16, intermediate_dim=32)
    if name == "GemmaCausalLM":
        backbone = keras_hub.models.GemmaBackbone(head_dim=8, **sizes)
    else:
        backbone = keras_hub.models.Llama3Backbone(**sizes)
    lm = getattr(keras_hub.models, name)(backbone, preprocessor=None)
    lm.quantize("int8", filters=lambda layer: not isinstance(
        layer, keras.layers.Embedding))
    return lm


@pytest.mark.parametrize("name", ["GemmaCausalLM", "Llama3CausalLM"])
def test_a_tiny_int8_causal_lm_trains_and_generates(name):
    lm = _tiny_int8_lm(name)
    token_ids = np.zeros((2, 8), "int32")
    token_ids[0, :3] = [1, 2, 3]
    token_ids[1, :2] = [4, 5]
    prompt = {"token_ids": token_ids, "padding_mask": token_ids != 0}
    x = {"token_ids": np.tile(np.arange(8, dtype="int32"), (4, 1)),
         "padding_mask": np.ones((4, 8), bool)}
    y = np.tile(np.arange(1, 9, dtype="int32"), (4, 1))
    before = keras.ops.convert_to_numpy(lm(x))
    keras_lora.apply_lora(lm, rank=4)
    assert type(lm).__name__ == name
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(lm(x)), before)
    adapted_layers = keras_lora.lora_layers(lm)
    assert adapted_layers and all(
        layer.base_layer.quantization_mode == "int8"
        for layer in adapted_layers.values())
    query = adapted_layers[next(p for p in adapted_layers if p.endswith("/query"))]
    assert keras.backend.standardize_dtype(query.kernel.dtype) == "int8"
    lm.compile(optimizer=keras.optimizers.Adam(0.02),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    losses = lm.fit(x, y, epochs=3, verbose=0).history["loss"]
    assert losses[-1] < losses[0]
    generated = lm.generate(prompt, stop_token_ids=None)["token_ids"]
    assert generated.shape == (2, 8)


# Mixed batches ---------------------------------------------------------


def test_mixed_batch_model_on_an_int8_base_routes_each_example():
    # Each example computed with its own adapter (or the base, -1) equals
    # the single-adapter int8 LoRA model's output for it.
    model = adapted("int8")
    keras_lora.add_adapter(model, "task_b", rank=3)
    rng = np.random.default_rng(1)
    lora_bs = [v for v in model.weights if "lora_b" in v.path]
    assert len(lora_bs) == 6  # two adapters on each of the three layers
    for variable in lora_bs:
        variable.assign((0.3 * rng.normal(size=variable.shape)).astype("float32"))
    hub.reset_compiled_functions(model)
    index = np.array([1, -1, 0, 1], "int32")
    names = ["default", "task_b"]
    mixed = keras_lora.mixed_batch_model(model, names)
    got = keras.ops.convert_to_numpy(mixed([X, index]))
    rows = []
    for i, k in enumerate(index):
        if k < 0:
            with keras_lora.disable_adapters(model):
                rows.append(predict(model, X[i:i + 1]))
        else:
            keras_lora.set_adapter(model, names[k])
            rows.append(predict(model, X[i:i + 1]))
    np.testing.assert_allclose(got, np.concatenate(rows), atol=1e-5)
    with keras_lora.disable_adapters(model):
        base = predict(model)
    for i in (0, 2, 3):  # the adapted examples are not the base's
        assert not np.allclose(got[i], base[i], atol=1e-3)
