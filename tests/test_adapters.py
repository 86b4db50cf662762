"""Adapter files: contents, atomic writes, round trips, and every error path."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import safetensors.numpy
from keras import layers

from keras_lora import model_walk
from keras_lora.adapters import load_adapter
from keras_lora.adapters import read_adapter
from keras_lora.adapters import save_adapter
from keras_lora.merge import merge_adapters
from keras_lora.surgery import apply_lora
from keras_lora.surgery import lora_layers

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
PATHS = ["inner/inner_dense", "einsum", "head"]
X = np.linspace(-1, 1, 12, dtype="float32").reshape(3, 4)


def base_model(head_units=3, head_name="head", einsum_as_dense=False):
    """A base model with fixed names and weights, the same on every backend."""
    inner = keras.Sequential(
        [keras.Input((4,)), layers.Dense(6, name="inner_dense")], name="inner"
    )
    inputs = keras.Input((4,))
    x = inner(inputs)
    if einsum_as_dense:
        x = layers.Dense(5, name="einsum")(x)
    else:
        x = layers.EinsumDense("ab,bc->ac", (5,), bias_axes="c", name="einsum")(x)
    outputs = layers.Dense(head_units, name=head_name)(x)
    model = keras.Model(inputs, outputs, name="base")
    rng = np.random.default_rng(7)
    for variable in model.weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    return model


def adapt(model, seed=0, **lora_kwargs):
    """Applies LoRA (per-layer ranks and alphas) and random adapters."""
    lora_kwargs.setdefault("rank_pattern", {"head": 1})
    lora_kwargs.setdefault("alpha_pattern", {"einsum": 8.0})
    apply_lora(model, rank=2, alpha=4.0, **lora_kwargs)
    rng = np.random.default_rng(seed)
    for layer in lora_layers(model).values():
        layer.lora_a.assign(rng.normal(size=layer.lora_a.shape))
        layer.lora_b.assign(rng.normal(size=layer.lora_b.shape))
    return model


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def state(model):
    """Everything load_adapter could change: structure and every value."""
    structure = [
        (entry.path, type(entry.layer).__name__)
        for entry in model_walk.walk(model).values()
    ]
    return structure, [to_numpy(v).copy() for v in model.weights]


def assert_unchanged(model, before):
    structure, values = state(model)
    assert structure == before[0]
    assert len(values) == len(before[1])
    for value, expected in zip(values, before[1]):
        np.testing.assert_array_equal(value, expected)


@pytest.fixture
def adapter_path(tmp_path):
    path = str(tmp_path / "task.safetensors")
    save_adapter(adapt(base_model()), path)
    return path


def rewrite(source, target, change):
    """Writes `target`: `source`'s tensors and metadata passed through `change`."""
    tensors = safetensors.numpy.load_file(source)
    document = read_adapter(source).metadata
    tensors, document = change(tensors, document)
    if document.get("format_version", 4) < 4:
        # An older format: no digests or structural keys yet.
        document = {k: v for k, v in document.items()
                    if k not in ("digests", "layer_keys", "header_digest")}
    elif "digests" in document:
        # Keep the header's digests true to the changed tensors, so a test
        # reaches the check it is about rather than the digest check.
        from keras_lora import adapter_file

        document = adapter_file.sealed(dict(document, digests={
            key: adapter_file._digest(value) for key, value in tensors.items()
        }))
    safetensors.numpy.save_file(
        tensors, target, metadata={"keras_lora": json.dumps(document)}
    )
    return target


# The file -----------------------------------------------------------------


def test_file_holds_exactly_lora_a_and_lora_b_per_layer_as_float32(adapter_path):
    tensors = safetensors.numpy.load_file(adapter_path)
    assert sorted(tensors) == sorted(
        f"{path}/{name}" for path in PATHS for name in ("lora_a", "lora_b")
    )
    assert all(t.dtype == np.float32 for t in tensors.values())
    assert tensors["einsum/lora_a"].shape == (2, 6)  # rank-first
    assert tensors["head/lora_b"].shape == (1, 3)


def test_metadata_records_each_layer(adapter_path):
    metadata = read_adapter(adapter_path).metadata
    assert metadata["format"] == "keras_lora.adapter"
    assert metadata["format_version"] == 4
    assert metadata["trainable_layers"] == []
    assert metadata["extra_tensors"] == {}
    assert metadata["keras_lora_version"]
    assert list(metadata["layers"]) == PATHS
    einsum = metadata["layers"]["einsum"]
    assert einsum["class"] == "LoRAEinsumDense"
    assert (einsum["rank"], einsum["alpha"], einsum["scaling"]) == (2, 8.0, 4.0)
    assert einsum["use_rslora"] is False
    assert einsum["lora_a_shape"] == [2, 6]
    assert einsum["lora_b_shape"] == [2, 5]
    assert einsum["base_kernel_shape"] == [6, 5]
    assert metadata["layers"]["head"]["rank"] == 1


def test_file_size_is_adapter_bytes_plus_a_header_under_64_kib(tmp_path):
    # 48 layers with keras-hub-like long paths.
    model = keras.Sequential(
        [keras.Input((4,))]
        + [
            layers.Dense(4, name=f"transformer_layer_{i:02d}_feedforward_output")
            for i in range(48)
        ]
    )
    apply_lora(model, rank=2)
    path = str(tmp_path / "many.safetensors")
    save_adapter(model, path)
    adapter_bytes = sum(
        t.nbytes for t in safetensors.numpy.load_file(path).values()
    )
    assert adapter_bytes == 48 * 2 * (4 * 2) * 4
    assert 0 < os.path.getsize(path) - adapter_bytes < 64 * 1024


def test_save_replaces_the_file_and_leaves_no_temporary_file(tmp_path):
    model = adapt(base_model())
    path = str(tmp_path / "task.safetensors")
    save_adapter(model, path)
    lora_layers(model)["head"].lora_b.assign(np.zeros((1, 3), "float32"))
    save_adapter(model, path)
    assert os.listdir(tmp_path) == ["task.safetensors"]
    assert not safetensors.numpy.load_file(path)["head/lora_b"].any()


def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    model = adapt(base_model())
    path = str(tmp_path / "task.safetensors")
    save_adapter(model, path)
    with open(path, "rb") as handle:
        previous = handle.read()

    def interrupted(descriptor):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(adapt(base_model(), seed=1), path)
    with open(path, "rb") as handle:
        assert handle.read() == previous
    assert os.listdir(tmp_path) == ["task.safetensors"]


def test_missing_parent_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_adapter(adapt(base_model()), str(tmp_path / "nope" / "a.safetensors"))


def test_save_without_lora_layers_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="has no LoRA layers"):
        save_adapter(base_model(), str(tmp_path / "a.safetensors"))


def test_save_refuses_non_finite_adapters(tmp_path):
    model = adapt(base_model())
    lora_layers(model)["einsum"].lora_a.assign(np.full((2, 6), np.nan, "float32"))
    with pytest.raises(ValueError, match="'einsum': lora_a holds NaN"):
        save_adapter(model, str(tmp_path / "a.safetensors"))
    assert os.listdir(tmp_path) == []


# Round trips --------------------------------------------------------------


def test_load_into_a_base_model_applies_lora_as_recorded(adapter_path):
    expected = to_numpy(adapt(base_model())(X))
    model = base_model()
    assert load_adapter(model, adapter_path) is model
    adapted = lora_layers(model)
    assert list(adapted) == PATHS
    assert [(l.rank, l.alpha) for l in adapted.values()] == [
        (2, 4.0), (2, 8.0), (1, 4.0)
    ]
    np.testing.assert_allclose(to_numpy(model(X)), expected, rtol=1e-6)


def test_load_into_an_adapted_model_assigns_in_place(adapter_path):
    model = adapt(base_model(), seed=5)
    layers_before = dict(lora_layers(model))
    load_adapter(model, adapter_path)
    tensors = safetensors.numpy.load_file(adapter_path)
    for path, layer in lora_layers(model).items():
        assert layer is layers_before[path]
        np.testing.assert_array_equal(
            to_numpy(layer.lora_b), tensors[f"{path}/lora_b"]
        )


def test_rslora_dropout_and_train_bias_are_re_created(tmp_path):
    path = str(tmp_path / "a.safetensors")
    save_adapter(
        adapt(base_model(), use_rslora=True, dropout=0.25, train_bias=True), path
    )
    model = load_adapter(base_model(), path)
    for layer in lora_layers(model).values():
        assert (layer.use_rslora, layer.dropout, layer.train_bias) == (
            True, 0.25, True
        )


def test_adapter_saved_on_another_backend_loads_here(tmp_path):
    other = {"jax": "torch", "tensorflow": "jax", "torch": "jax"}[
        keras.backend.backend()
    ]
    code = (
        "import sys\n"
        f"sys.path[:0] = [{REPO_ROOT!r}, {TESTS_DIR!r}]\n"
        "import numpy as np, keras, test_adapters as t\n"
        "from keras_lora.adapters import save_adapter\n"
        "model = t.adapt(t.base_model(), seed=3)\n"
        f"save_adapter(model, {str(tmp_path / 'a.safetensors')!r})\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, "
        "keras.ops.convert_to_numpy(model(t.X)))\n"
    )
    env = dict(os.environ, KERAS_BACKEND=other, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    path = str(tmp_path / "a.safetensors")
    assert read_adapter(path).metadata["backend"] == other
    model = load_adapter(base_model(), path)
    np.testing.assert_allclose(
        to_numpy(model(X)), np.load(tmp_path / "y.npy"), rtol=1e-5, atol=1e-5
    )


# Fully trainable layers and train_bias biases ------------------------------


def trained_head_model(seed=0):
    """LoRA on inner/einsum, a fully trainable head, trained biases, all
    set to random values (as training would)."""
    model = adapt(
        base_model(), seed=seed, targets=["inner/inner_dense", "einsum"],
        trainable=["head"], train_bias=True, rank_pattern={}, alpha_pattern={},
    )
    rng = np.random.default_rng(seed + 100)
    for variable in model.trainable_weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    return model


EXTRA_KEYS = ["inner/inner_dense/bias", "einsum/bias", "head/kernel", "head/bias"]


def trainable_paths(model):
    return sorted(v.path for v in model.trainable_weights)


def test_file_holds_trainable_layers_and_trained_biases(tmp_path):
    path = str(tmp_path / "a.safetensors")
    save_adapter(trained_head_model(), path)
    adapter = read_adapter(path)
    assert adapter.trainable_layers == ("head",)
    assert sorted(adapter.extra_tensors) == sorted(EXTRA_KEYS)
    assert adapter.extra_tensors["head/kernel"] == (5, 3)
    tensors = safetensors.numpy.load_file(path)
    assert all(tensors[key].dtype == np.float32 for key in EXTRA_KEYS)


def test_load_onto_a_base_reproduces_head_biases_and_outputs(tmp_path):
    original = trained_head_model()
    path = str(tmp_path / "a.safetensors")
    save_adapter(original, path)
    loaded = load_adapter(base_model(), path)
    np.testing.assert_allclose(
        to_numpy(loaded(X)), to_numpy(original(X)), rtol=0, atol=1e-6
    )
    values = {v.path: to_numpy(v) for v in original.trainable_weights}
    for variable in loaded.trainable_weights:
        np.testing.assert_array_equal(to_numpy(variable), values[variable.path])


def test_loaded_model_trains_the_same_variables(tmp_path):
    original = trained_head_model()
    path = str(tmp_path / "a.safetensors")
    save_adapter(original, path)
    loaded = load_adapter(base_model(), path)
    assert trainable_paths(loaded) == trainable_paths(original)
    assert "head/kernel" in trainable_paths(loaded)


def test_load_into_an_adapted_model_assigns_the_extras(tmp_path):
    path = str(tmp_path / "a.safetensors")
    original = trained_head_model()
    save_adapter(original, path)
    model = trained_head_model(seed=4)
    load_adapter(model, path)
    np.testing.assert_allclose(
        to_numpy(model(X)), to_numpy(original(X)), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("kind", ["base", "adapted"])
def test_extra_tensor_shape_mismatch_names_key_and_leaves_model(tmp_path, kind):
    path = str(tmp_path / "a.safetensors")
    save_adapter(trained_head_model(), path)
    model = base_model(head_units=4)
    if kind == "adapted":
        model = adapt(
            model, targets=["inner/inner_dense", "einsum"], trainable=["head"],
            train_bias=True, rank_pattern={}, alpha_pattern={},
        )
    before = state(model)
    with pytest.raises(
        ValueError,
        match=r"'head/kernel' has shape \(5, 4\) in the model but \(5, 3\) in the file",
    ):
        load_adapter(model, path)
    assert_unchanged(model, before)


def rank_last(tensors, document, version):
    """A version 1-2 file: `lora_a` stored `contracted + (rank,)`."""
    tensors, layers = dict(tensors), {}
    for path, record in document["layers"].items():
        tensors[f"{path}/lora_a"] = np.ascontiguousarray(
            np.moveaxis(tensors[f"{path}/lora_a"], 0, -1)
        )
        shape = record["lora_a_shape"]
        layers[path] = dict(record, lora_a_shape=shape[1:] + shape[:1])
    return tensors, dict(document, format_version=version, layers=layers)


def test_version_2_file_with_rank_last_lora_a_still_loads(adapter_path, tmp_path):
    path = rewrite(
        adapter_path, str(tmp_path / "v2.safetensors"),
        lambda t, d: rank_last(t, d, 2),
    )
    np.testing.assert_array_equal(
        read_adapter(path).tensors["einsum/lora_a"],
        read_adapter(adapter_path).tensors["einsum/lora_a"],
    )
    assert read_adapter(path).layers["einsum"].lora_a_shape == (2, 6)
    expected = to_numpy(adapt(base_model())(X))
    np.testing.assert_allclose(
        to_numpy(load_adapter(base_model(), path)(X)), expected, rtol=1e-6
    )


def test_version_2_file_whose_rank_disagrees_is_rejected(adapter_path, tmp_path):
    # Written rank-first but labelled version 2: the rank is not last.
    path = rewrite(
        adapter_path, str(tmp_path / "bad.safetensors"),
        lambda t, d: (t, dict(d, format_version=2)),
    )
    with pytest.raises(ValueError, match="rank 2 disagrees with lora_a_shape"):
        read_adapter(path)
    model = adapt(base_model())
    before = state(model)
    with pytest.raises(ValueError, match="rank 2 disagrees with lora_a_shape"):
        load_adapter(model, path)
    assert_unchanged(model, before)


def test_version_1_file_without_extras_still_loads(adapter_path, tmp_path):
    def as_version_1(tensors, document):
        tensors, document = rank_last(tensors, document, 1)
        del document["trainable_layers"], document["extra_tensors"]
        return tensors, document

    path = rewrite(adapter_path, str(tmp_path / "v1.safetensors"), as_version_1)
    expected = to_numpy(adapt(base_model())(X))
    np.testing.assert_allclose(
        to_numpy(load_adapter(base_model(), path)(X)), expected, rtol=1e-6
    )


# Bad files: the model is left exactly as it was ---------------------------


@pytest.fixture(params=["base", "adapted"])
def target_model(request):
    model = base_model()
    return adapt(model, seed=9) if request.param == "adapted" else model


def test_truncated_file_is_rejected(adapter_path, tmp_path, target_model):
    with open(adapter_path, "rb") as handle:
        data = handle.read()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) - 20])
    before = state(target_model)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_adapter(target_model, str(path))
    assert_unchanged(target_model, before)


def test_non_safetensors_file_is_rejected(tmp_path, target_model):
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(b"PK\x03\x04 this is a zip, not safetensors")
    before = state(target_model)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_adapter(target_model, str(path))
    assert_unchanged(target_model, before)


def test_foreign_safetensors_file_is_rejected(tmp_path, target_model):
    path = str(tmp_path / "model.safetensors")
    safetensors.numpy.save_file({"weight": np.ones((2, 2), "float32")}, path)
    before = state(target_model)
    with pytest.raises(ValueError, match="not a keras-lora adapter.*'weight'"):
        load_adapter(target_model, path)
    assert_unchanged(target_model, before)


def test_missing_file_is_rejected(tmp_path, target_model):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_adapter(target_model, str(tmp_path / "none.safetensors"))


def _set(tensors, key, value):
    tensors[key] = value
    return tensors


CORRUPTIONS = [
    (
        "tensor_shape_disagrees_with_metadata",
        lambda t, d: (_set(t, "einsum/lora_b", np.ones((2, 4), "float32")), d),
        r"'einsum/lora_b' has shape \(2, 4\) but the metadata records \(2, 5\)",
    ),
    (
        "missing_tensor",
        lambda t, d: ({k: v for k, v in t.items() if k != "head/lora_a"}, d),
        "tensor 'head/lora_a' is missing",
    ),
    (
        "extra_tensor",
        lambda t, d: (_set(t, "other/lora_a", np.ones((1,), "float32")), d),
        "'other/lora_a' belongs to no recorded layer",
    ),
    (
        "float16_tensor",
        lambda t, d: (_set(t, "head/lora_a", t["head/lora_a"].astype("float16")), d),
        "'head/lora_a' has dtype F16",
    ),
    (
        "nan_tensor",
        lambda t, d: (_set(t, "head/lora_b", np.full((1, 3), np.nan, "float32")), d),
        "'head/lora_b' holds NaN",
    ),
    (
        "newer_format",
        lambda t, d: (t, dict(d, format_version=99)),
        "format version 99, newer",
    ),
    (
        "unknown_layer_class",
        lambda t, d: (t, _with_layer(d, "head", **{"class": "LoRAMystery"})),
        "layer 'head': unknown LoRA class 'LoRAMystery'",
    ),
    (
        "rank_disagrees_with_shapes",
        lambda t, d: (t, _with_layer(d, "head", rank=3)),
        "layer 'head': rank 3 disagrees",
    ),
]


def _with_layer(document, path, **changes):
    layers_ = dict(document["layers"])
    layers_[path] = dict(layers_[path], **changes)
    return dict(document, layers=layers_)


@pytest.mark.parametrize(
    "change, message",
    [(c, m) for _, c, m in CORRUPTIONS],
    ids=[name for name, _, _ in CORRUPTIONS],
)
def test_inconsistent_file_is_rejected(
    adapter_path, tmp_path, target_model, change, message
):
    path = rewrite(adapter_path, str(tmp_path / "bad.safetensors"), change)
    before = state(target_model)
    with pytest.raises(ValueError, match=message):
        load_adapter(target_model, path)
    assert_unchanged(target_model, before)


# Models that do not match: nothing changes --------------------------------


def test_a_renamed_layer_of_the_same_architecture_is_found_by_its_key(adapter_path):
    model = load_adapter(base_model(head_name="classifier"), adapter_path)
    assert sorted(lora_layers(model)) == sorted(
        ["inner/inner_dense", "einsum", "classifier"]
    )
    np.testing.assert_allclose(
        to_numpy(model(X)), to_numpy(load_adapter(base_model(), adapter_path)(X)),
        atol=1e-6,
    )


def test_an_old_file_is_matched_by_name(adapter_path, tmp_path):
    path = rewrite(adapter_path, str(tmp_path / "v3.safetensors"),
                   lambda t, d: (t, dict(d, format_version=3)))
    model = base_model(head_name="classifier")
    before = state(model)
    with pytest.raises(ValueError, match="layer 'head' is not in model"):
        load_adapter(model, path)
    assert_unchanged(model, before)


def test_base_kernel_shape_mismatch_names_layer_and_both_shapes(adapter_path):
    model = base_model(head_units=4)
    before = state(model)
    with pytest.raises(
        ValueError, match=r"'head'.*\(5, 4\) in the model but \(5, 3\) in the file"
    ):
        load_adapter(model, adapter_path)
    assert_unchanged(model, before)


def test_base_layer_of_another_type(adapter_path):
    model = base_model(einsum_as_dense=True)
    before = state(model)
    with pytest.raises(ValueError, match=r"'einsum' \(structural key 'einsum_dense'\) is not in"):
        load_adapter(model, adapter_path)
    assert_unchanged(model, before)
    old_file = rewrite(adapter_path, adapter_path + ".v3",
                       lambda t, d: (t, dict(d, format_version=3)))
    with pytest.raises(
        ValueError,
        match=r"layer 'einsum' is a Dense \(adapted by LoRADense\), but the file "
              r"records a LoRAEinsumDense for it \(base class EinsumDense\)",
    ):
        load_adapter(model, old_file)
    assert_unchanged(model, before)


def assert_same_outputs(model, reference):
    np.testing.assert_allclose(
        to_numpy(model(X)), to_numpy(reference(X)), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize(
    "other",
    [dict(rank_pattern={"head": 2}), dict(alpha_pattern={"einsum": 2.0}),
     dict(targets=["head"]), dict(dropout=0.25), dict(train_bias=True)],
    ids=["rank", "alpha", "targets", "dropout", "train_bias"],
)
def test_another_adapter_is_replaced_by_the_files(adapter_path, other):
    model = adapt(base_model(), seed=3, **other)
    load_adapter(model, adapter_path)
    reference = load_adapter(base_model(), adapter_path)
    assert_same_outputs(model, reference)
    assert trainable_paths(model) == trainable_paths(reference)
    layers_ = lora_layers(model)
    assert layers_["head"].rank == 1 and layers_["einsum"].alpha == 8.0


def test_loading_the_same_layout_assigns_in_place_without_retracing(adapter_path):
    model = adapt(base_model(), seed=3)
    layer_objects = list(lora_layers(model).values())
    variables = [id(v) for v in model.weights]
    model.predict(X, verbose=0)
    traced = model.predict_function
    load_adapter(model, adapter_path)
    assert list(lora_layers(model).values()) == layer_objects
    assert [id(v) for v in model.weights] == variables
    assert model.predict_function is traced
    np.testing.assert_allclose(
        model.predict(X, verbose=0),
        to_numpy(load_adapter(base_model(), adapter_path)(X)), rtol=1e-5,
    )


def test_merged_model_must_be_unmerged_first(adapter_path):
    model = merge_adapters(adapt(base_model()))
    before = state(model)
    with pytest.raises(ValueError, match="is merged"):
        load_adapter(model, adapter_path)
    assert_unchanged(model, before)


def test_mixed_dropout_cannot_be_applied_to_a_base_model(adapter_path, tmp_path):
    path = rewrite(
        adapter_path,
        str(tmp_path / "mixed.safetensors"),
        lambda t, d: (t, _with_layer(d, "head", dropout=0.5)),
    )
    model = base_model()
    before = state(model)
    with pytest.raises(ValueError, match="several values of `dropout`"):
        load_adapter(model, path)
    assert_unchanged(model, before)


# Structural keys: any instance of the architecture, whatever its names -----


def unnamed_sequential(units=6):
    return keras.Sequential(
        [keras.Input((4,)), layers.Dense(units), layers.Dense(3)]
    )


def unnamed_functional(units=6, depth=2):
    inputs = keras.Input((4,))
    x = inputs
    for _ in range(depth - 1):
        x = layers.Dense(units, activation="tanh")(x)
    return keras.Model(inputs, layers.Dense(3)(x))


def trained_copy(factory):
    """A model adapted with random adapters, and its base weights."""
    model = factory()
    base = [to_numpy(v).copy() for v in model.weights]
    adapt(model, rank_pattern={}, alpha_pattern={})
    return model, base


@pytest.mark.parametrize(
    "factory", [unnamed_sequential, unnamed_functional],
    ids=["sequential", "functional"],
)
def test_adapter_loads_into_a_model_built_again_with_other_names(tmp_path, factory):
    model, base_values = trained_copy(factory)
    path = str(tmp_path / "a.safetensors")
    save_adapter(model, path)
    rebuilt = factory()
    assert [layer.name for layer in rebuilt.layers] != [
        layer.name for layer in model.layers
    ]
    rebuilt.set_weights(base_values)
    load_adapter(rebuilt, path)
    assert_same_outputs(rebuilt, model)
    # ...and again, in place, onto the now adapted rebuilt model.
    load_adapter(rebuilt, path)
    assert_same_outputs(rebuilt, model)


def test_the_file_keeps_readable_names_beside_the_keys(tmp_path):
    unnamed_sequential()  # push the auto-generated names up
    model, _ = trained_copy(unnamed_sequential)
    path = str(tmp_path / "a.safetensors")
    save_adapter(model, path)
    adapter = read_adapter(path)
    names = [layer.name for layer in model.layers]
    assert list(adapter.layers) == names
    assert adapter.layer_keys == {names[0]: "dense", names[1]: "dense_1"}


@pytest.mark.parametrize(
    "factory, message",
    [
        (lambda: unnamed_functional(units=7), r"base kernel has shape \(4, 7\) in the model but \(4, 6\)"),
        (lambda: unnamed_functional(depth=1), r"structural key 'dense_1'\) is not in model"),
    ],
    ids=["other_width", "fewer_layers"],
)
def test_another_architecture_is_refused_and_left_untouched(tmp_path, factory, message):
    model, _ = trained_copy(unnamed_functional)
    path = str(tmp_path / "a.safetensors")
    save_adapter(model, path)
    other = factory()
    before = state(other)
    with pytest.raises(ValueError, match=message):
        load_adapter(other, path)
    assert_unchanged(other, before)


# Nothing half-done: a file that does not fit is found out before any change


def test_file_that_trains_an_adapted_layer_fully_is_refused_on_a_base(adapter_path, tmp_path):
    path = rewrite(
        adapter_path, str(tmp_path / "bad.safetensors"),
        lambda t, d: (t, dict(d, trainable_layers=["head"])),
    )
    model = base_model()
    before = state(model)
    flags = [layer.trainable for layer in model.layers]
    with pytest.raises(ValueError, match="adapted or fully trainable, not both.*trainable_layers='head'"):
        load_adapter(model, path)
    assert_unchanged(model, before)
    assert [layer.trainable for layer in model.layers] == flags
    assert [v.trainable for v in model.weights] == [True] * len(model.weights)


def test_file_whose_extras_hold_an_adapted_kernel_is_refused_on_a_base(adapter_path, tmp_path):
    def add_kernel(tensors, document):
        tensors = dict(tensors, **{"head/kernel": np.ones((5, 3), "float32")})
        extra = dict(document["extra_tensors"], **{"head/kernel": [5, 3]})
        return tensors, dict(document, extra_tensors=extra)

    path = rewrite(adapter_path, str(tmp_path / "bad.safetensors"), add_kernel)
    model = base_model()
    before = state(model)
    with pytest.raises(ValueError, match="'head/kernel'.*adapted layer 'head' other than its bias"):
        load_adapter(model, path)
    assert_unchanged(model, before)
    assert not lora_layers(model)
    assert [v.trainable for v in model.weights] == [True] * len(model.weights)


@pytest.mark.parametrize("kind", ["base", "adapted"])
def test_a_failure_after_lora_is_applied_rolls_everything_back(adapter_path, monkeypatch, kind):
    # Whatever fails late (here: the last check, after the file's LoRA
    # layers exist), the Transaction puts the model back as it was.
    from keras_lora import adapter_matching

    model = base_model() if kind == "base" else adapt(base_model(), seed=5, targets=["head"])
    model.predict(X, verbose=0)
    before = state(model)
    flags = [v.trainable for v in model.weights]
    layer_objects = list(lora_layers(model).values())

    def failing(*args, **kwargs):
        raise ValueError("late failure")

    monkeypatch.setattr(adapter_matching, "check_extras", failing)
    with pytest.raises(ValueError, match="late failure"):
        load_adapter(model, adapter_path)
    assert_unchanged(model, before)
    assert [v.trainable for v in model.weights] == flags
    assert list(lora_layers(model).values()) == layer_objects


@pytest.mark.parametrize("model", [None, "base.keras"], ids=["none", "str"])
def test_load_and_save_refuse_a_non_model(adapter_path, model):
    with pytest.raises(TypeError, match="Received: model="):
        load_adapter(model, adapter_path)
    with pytest.raises(TypeError, match="Received: model="):
        save_adapter(model, adapter_path)


# Swapping tasks: the model becomes the file's model ------------------------


def head_task(tmp_path, name, seed, with_head):
    """An adapter trained on the same base, with or without a trained head."""
    kwargs = dict(targets=["inner/inner_dense", "einsum"], rank_pattern={},
                  alpha_pattern={})
    if with_head:
        kwargs["trainable"] = ["head"]
    model = adapt(base_model(), seed=seed, **kwargs)
    if with_head:
        model.get_layer("head").kernel.assign(np.full((5, 3), 0.3, "float32"))
    path = str(tmp_path / f"{name}.safetensors")
    save_adapter(model, path)
    return path


def test_swapping_to_a_task_without_the_head_restores_the_base_head(tmp_path):
    a = head_task(tmp_path, "a", seed=1, with_head=True)
    b = head_task(tmp_path, "b", seed=2, with_head=False)
    model = load_adapter(base_model(), a)
    assert "head/kernel" in trainable_paths(model)
    load_adapter(model, b)
    reference_b = load_adapter(base_model(), b)
    assert_same_outputs(model, reference_b)
    np.testing.assert_array_equal(
        to_numpy(model.get_layer("head").kernel),
        to_numpy(base_model().get_layer("head").kernel),
    )
    assert trainable_paths(model) == trainable_paths(reference_b)
    assert not model.get_layer("head").trainable
    # ...and back: A's head weights and its trainable flag return.
    load_adapter(model, a)
    reference_a = load_adapter(base_model(), a)
    assert_same_outputs(model, reference_a)
    assert trainable_paths(model) == trainable_paths(reference_a)


def test_a_head_trained_in_process_is_restored_when_another_task_loads(tmp_path):
    b = head_task(tmp_path, "b", seed=2, with_head=False)
    model = adapt(base_model(), seed=1, targets=["inner/inner_dense", "einsum"],
                  trainable=["head"], rank_pattern={}, alpha_pattern={})
    model.get_layer("head").kernel.assign(np.full((5, 3), 0.3, "float32"))
    load_adapter(model, b)
    assert_same_outputs(model, load_adapter(base_model(), b))
