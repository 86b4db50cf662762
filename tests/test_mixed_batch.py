"""Mixed batches (each example with its own adapter, one pass) and one
SavedModel serving every adapter."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from keras import layers

import keras_lora

NAMES = ["default", "task_b", "head_only"]
X = np.linspace(-1, 1, 42, dtype="float32").reshape(7, 6)
INDEX = np.array([0, 1, 2, -1, 1, 0, 2], "int32")


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def randomize(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in keras_lora.lora_layers(model).values():
        for adapter in layer.adapters.values():
            adapter.lora_b.assign(
                rng.normal(size=adapter.lora_b.shape).astype("float32")
            )


def three_adapters():
    """Dense + EinsumDense; ranks 2, 4 and 3; "head_only" on one layer."""
    inputs = keras.Input((6,))
    x = layers.Dense(8, activation="tanh", name="up")(inputs)
    x = layers.EinsumDense("ab,bc->ac", (5,), bias_axes="c", name="mid")(x)
    model = keras.Model(inputs, layers.Dense(3, name="head")(x), name="net")
    model = keras_lora.apply_lora(model, rank=2)
    keras_lora.add_adapter(model, "task_b", rank=4, alpha=8.0)
    keras_lora.add_adapter(model, "head_only", rank=3, targets=["head"])
    randomize(model)
    return model


def one_by_one(model, inputs, index, names=NAMES):
    """Each example through `model` with `set_adapter` / `disable_adapters`."""
    rows = []
    for i, k in enumerate(index):
        example = keras.tree.map_structure(lambda x: x[i:i + 1], inputs)
        if k < 0:
            with keras_lora.disable_adapters(model):
                rows.append(model(example))
        else:
            keras_lora.set_adapter(model, names[k])
            rows.append(model(example))
    return keras.tree.map_structure(
        lambda *r: np.concatenate([to_numpy(x) for x in r]), *rows
    )


def test_each_example_is_computed_with_its_own_adapter():
    model = three_adapters()
    mixed = keras_lora.mixed_batch_model(model, NAMES)
    got = to_numpy(mixed([X, INDEX]))
    np.testing.assert_allclose(got, one_by_one(model, X, INDEX), atol=1e-5)


def test_a_dense_layer_matches_numpy():
    layer = keras_lora.LoRADense(3, rank=2, alpha=4.0, name="proj")
    inputs = keras.Input((4,))
    model = keras.Model(inputs, layer(inputs))
    keras_lora.add_adapter(model, "b", rank=1)
    randomize(model, seed=3)
    layer = keras_lora.lora_layers(model)["proj"]
    x = np.arange(12, dtype="float32").reshape(3, 4) / 10
    w, bias = to_numpy(layer.kernel), to_numpy(layer.bias)
    expected = x @ w + bias
    for row, name in ((0, "default"), (1, "b")):
        adapter = layer.adapters[name]
        a, b = to_numpy(adapter.lora_a), to_numpy(adapter.lora_b)
        expected[row] += adapter.scaling * (x[row] @ a.T) @ b
    mixed = keras_lora.mixed_batch_model(model, ["default", "b"])
    got = to_numpy(mixed([x, np.array([0, 1, -1], "int32")]))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_predict_batches_the_index_with_the_data():
    model = three_adapters()
    mixed = keras_lora.mixed_batch_model(model, NAMES)
    got = mixed.predict([X, INDEX], batch_size=3, verbose=0)
    np.testing.assert_allclose(got, one_by_one(model, X, INDEX), atol=1e-5)


def test_an_equation_that_is_not_a_matmul_is_routed_with_its_split():
    inputs = keras.Input((3, 4))
    outputs = layers.EinsumDense("abc,dce->abde", (3, 5, 6), name="mix")(inputs)
    model = keras_lora.apply_lora(keras.Model(inputs, outputs), rank=2)
    keras_lora.add_adapter(model, "b", rank=3)
    randomize(model)
    x = np.linspace(-1, 1, 48, dtype="float32").reshape(4, 3, 4)
    index = np.array([1, -1, 0, 1], "int32")
    mixed = keras_lora.mixed_batch_model(model, ["default", "b"])
    np.testing.assert_allclose(
        to_numpy(mixed([x, index])),
        one_by_one(model, x, index, ["default", "b"]), atol=1e-5,
    )


def test_traced_predict_follows_in_place_adapter_changes():
    model = three_adapters()
    mixed = keras_lora.mixed_batch_model(model, NAMES)
    before = mixed.predict([X, INDEX], verbose=0)
    function = mixed.predict_function
    randomize(model, seed=9)
    after = mixed.predict([X, INDEX], verbose=0)
    assert mixed.predict_function is function  # no retrace
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after, one_by_one(model, X, INDEX), atol=1e-5)


def test_the_active_adapter_of_the_model_does_not_matter():
    model = three_adapters()
    mixed = keras_lora.mixed_batch_model(model, NAMES)
    first = to_numpy(mixed([X, INDEX]))
    keras_lora.set_adapter(model, ["task_b", "head_only"])
    np.testing.assert_allclose(to_numpy(mixed([X, INDEX])), first, atol=1e-6)


def test_keras_hub_backbone_takes_adapter_index_as_an_input_key():
    import keras_hub

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=64, num_layers=2, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=16,
    )
    model = keras_lora.apply_lora(backbone, rank=2)
    keras_lora.add_adapter(model, "task_b", rank=4)
    randomize(model, seed=1)
    token_ids = np.array([[1, 2, 3, 0], [4, 5, 0, 0], [6, 7, 8, 9]], "int32")
    inputs = {"token_ids": token_ids, "padding_mask": token_ids != 0}
    index = np.array([1, -1, 0], "int32")
    mixed = keras_lora.mixed_batch_model(model, ["default", "task_b"])
    got = mixed.predict(dict(inputs, adapter_index=index), batch_size=2,
                        verbose=0)
    np.testing.assert_allclose(
        got, one_by_one(model, inputs, index, ["default", "task_b"]),
        atol=1e-4,
    )


def test_export_of_a_keras_hub_backbone_serves_adapter_index_as_a_key(tmp_path):
    import keras_hub
    import tensorflow as tf

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=64, num_layers=1, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=16,
    )
    model = keras_lora.apply_lora(backbone, rank=2)
    keras_lora.add_adapter(model, "task_b", rank=4)
    randomize(model, seed=2)
    token_ids = np.array([[1, 2, 3, 0], [4, 5, 0, 0]], "int32")
    inputs = {"token_ids": token_ids,
              "padding_mask": (token_ids != 0).astype("int32"),
              "adapter_index": np.array([1, 0], "int32")}
    expected = to_numpy(
        keras_lora.mixed_batch_model(model, ["default", "task_b"])(inputs)
    )
    path = str(tmp_path / "served")
    keras_lora.export_multi_adapter(model, path, ["default", "task_b"])
    served = tf.saved_model.load(path)
    np.testing.assert_allclose(served.serve(inputs).numpy(), expected,
                               atol=1e-4)
    signature = served.signatures["serving_default"]
    assert sorted(signature.structured_input_signature[1]) == [
        "adapter_index", "padding_mask", "token_ids"]


def _merged_model():
    model = three_adapters()
    keras_lora.merge_adapters(model)
    return model


def _no_lora_model():
    return keras.Sequential([keras.Input((6,)), layers.Dense(3)])


@pytest.mark.parametrize(
    "make, names, error, message",
    [
        (three_adapters, ["default", "nope"], ValueError, "no adapter named 'nope'"),
        (three_adapters, ["task_b", "task_b"], ValueError, "named twice"),
        (three_adapters, [], TypeError, "non-empty list"),
        (three_adapters, "default", TypeError, "non-empty list"),
        (three_adapters, ["not valid"], ValueError, "Python identifier"),
        (_no_lora_model, ["default"], ValueError, "has no LoRA layers"),
        (_merged_model, ["default"], ValueError, "merged"),
    ],
)
def test_bad_requests_are_refused_by_name(make, names, error, message):
    model = make()
    with pytest.raises(error, match=message):
        keras_lora.mixed_batch_model(model, names)


def test_an_embedding_adapter_in_a_mixed_batch_is_refused():
    inputs = keras.Input((4,), dtype="int32")
    x = layers.Embedding(10, 6, name="table")(inputs)
    model = keras.Model(inputs, layers.Dense(3, name="head")(x))
    model = keras_lora.apply_lora(model, rank=2, targets=["table", "head"])
    with pytest.raises(ValueError, match="LoRAEmbedding"):
        keras_lora.mixed_batch_model(model, ["default"])


def test_dora_adapters_are_routed_per_example_too():
    # PEFT refuses DoRA in mixed batches; here each example gathers its
    # adapter's per-unit DoRA factor like its A and B.
    inputs = keras.Input((6,))
    x = layers.Dense(8, activation="tanh", name="up")(inputs)
    x = layers.EinsumDense("ab,bc->ac", (5,), bias_axes="c", name="mid")(x)
    model = keras.Model(inputs, layers.Dense(3, name="head")(x), name="net")
    keras_lora.apply_lora(model, rank=2, use_dora=True)
    keras_lora.add_adapter(model, "task_b", rank=4, alpha=8.0)
    keras_lora.add_adapter(model, "head_only", rank=3, targets=["head"], use_dora=True)
    randomize(model)
    rng = np.random.default_rng(5)
    for layer in keras_lora.lora_layers(model).values():
        for adapter in layer.adapters.values():
            if adapter.use_dora:
                adapter.lora_magnitude.assign(
                    rng.uniform(0.5, 2.0, size=adapter.lora_magnitude.shape)
                    .astype("float32"))
    mixed = keras_lora.mixed_batch_model(model, NAMES)
    got = to_numpy(mixed([X, INDEX]))
    np.testing.assert_allclose(got, one_by_one(model, X, INDEX), rtol=1e-5, atol=1e-5)


def test_export_is_served_by_plain_tensorflow(tmp_path):
    model = three_adapters()
    path = str(tmp_path / "served")
    assert keras_lora.export_multi_adapter(model, path, NAMES) == path
    expected = one_by_one(model, X, INDEX)
    np.save(tmp_path / "x.npy", X)
    np.save(tmp_path / "index.npy", INDEX)
    # A fresh process that never imports keras-lora (nor Keras).
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        import tensorflow as tf
        served = tf.saved_model.load({path!r})
        x = np.load({str(tmp_path / "x.npy")!r})
        index = np.load({str(tmp_path / "index.npy")!r})
        np.save({str(tmp_path / "serve.npy")!r}, served.serve([x, index]).numpy())
        signature = served.signatures["serving_default"]
        names = sorted(signature.structured_input_signature[1])
        outputs = signature(**dict(zip(names, [tf.constant(index), tf.constant(x)])))
        np.save({str(tmp_path / "signature.npy")!r}, outputs["output_0"].numpy())
        assert not any(m.startswith("keras_lora") for m in sys.modules), "imported"
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path,
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("serve.npy", "signature.npy"):
        np.testing.assert_allclose(np.load(tmp_path / name), expected,
                                   atol=1e-5)


def test_export_refuses_bad_names_and_writes_nothing(tmp_path):
    model = three_adapters()
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        keras_lora.export_multi_adapter(model, tmp_path / "served", ["nope"])
    assert os.listdir(tmp_path) == []
