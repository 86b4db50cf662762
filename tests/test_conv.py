"""LoRAConv1D / 2D / 3D: an r-filter conv then a 1×1, equal to PEFT's."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_lora
from keras_lora.distribution import adapter_axes
from keras_lora.distribution import kernel_axes_of
from keras_lora.layers import LoRAConv1D
from keras_lora.layers import LoRAConv2D
from keras_lora.layers import LoRAConv3D
from keras_lora.layers import lora_class_for
from keras_lora.layers import supported_types

RANK = 2


def to_np(x):
    return ops.convert_to_numpy(x)


def rng():
    return np.random.default_rng(0)


def built(layer, input_shape):
    layer.build(input_shape)
    return layer


def adapted(base, **kwargs):
    kwargs.setdefault("lora_b_initializer", keras.initializers.RandomNormal(seed=2))
    return lora_class_for(base).from_layer(base, rank=RANK, alpha=4.0, **kwargs)


def merged_reference(layer, x):
    """The base conv run with the kernel W + s·A·B (built by numpy)."""
    a, b = to_np(layer.lora_a), to_np(layer.lora_b)
    delta = np.tensordot(a, b, axes=[[0], [0]]) * layer.scaling
    base = layer.base_layer
    twin = base.__class__.from_config(base.get_config())
    twin.build(x.shape)
    twin.set_weights([to_np(base.kernel) + delta]
                     + ([to_np(base.bias)] if base.use_bias else []))
    return to_np(twin(x))


CASES = [
    ("conv1d", lambda: keras.layers.Conv1D(5, 3, strides=2), (2, 9, 3)),
    ("conv1d_causal", lambda: keras.layers.Conv1D(
        4, 3, padding="causal", dilation_rate=2, activation="relu"), (2, 9, 3)),
    ("conv2d", lambda: keras.layers.Conv2D(5, 3, padding="same"), (2, 7, 7, 3)),
    ("conv2d_strided", lambda: keras.layers.Conv2D(
        4, (3, 2), strides=2, dilation_rate=1, use_bias=False), (2, 8, 8, 3)),
    ("conv3d", lambda: keras.layers.Conv3D(4, 2, activation="tanh"), (2, 4, 5, 4, 2)),
]


@pytest.mark.parametrize("name, make, shape", CASES, ids=[c[0] for c in CASES])
def test_factored_output_equals_the_merged_kernel_conv(name, make, shape):
    layer = adapted(built(make(), shape))
    x = rng().normal(size=shape).astype("float32")
    np.testing.assert_allclose(to_np(layer(x)), merged_reference(layer, x),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "cls, kernel_size, in_shape, a_shape",
    [(keras.layers.Conv1D, 3, (None, 8, 2), (RANK, 3, 2)),
     (keras.layers.Conv2D, (3, 2), (None, 8, 8, 2), (RANK, 3, 2, 2)),
     (keras.layers.Conv3D, 2, (None, 4, 4, 4, 2), (RANK, 2, 2, 2, 2))],
)
def test_adapters_follow_the_layout_convention(cls, kernel_size, in_shape, a_shape):
    layer = adapted(built(cls(5, kernel_size), in_shape))
    assert tuple(layer.lora_a.shape) == a_shape
    assert tuple(layer.lora_b.shape) == (RANK, 5)
    contracted, free = kernel_axes_of(layer)
    assert free == (len(a_shape) - 1,)
    # Under a distribution the adapters shard like the kernel's axes.
    kernel_axes = (None,) * (len(a_shape) - 2) + ("batch", "model")
    assert adapter_axes(kernel_axes, contracted, free)[1] == (None, "model")


@pytest.mark.backend("jax", "torch")  # TF's CPU conv has no NCHW kernels
def test_channels_first_matches_the_merged_kernel():
    base = built(keras.layers.Conv2D(4, 3, data_format="channels_first"),
                 (2, 3, 6, 6))
    layer = adapted(base)
    x = rng().normal(size=(2, 3, 6, 6)).astype("float32")
    np.testing.assert_allclose(to_np(layer(x)), merged_reference(layer, x),
                               rtol=1e-4, atol=1e-5)


def test_fresh_adapter_leaves_the_output_unchanged():
    base = built(keras.layers.Conv2D(4, 3), (1, 6, 6, 3))
    x = rng().normal(size=(1, 6, 6, 3)).astype("float32")
    expected = to_np(base(x))
    layer = LoRAConv2D.from_layer(base, rank=RANK)
    np.testing.assert_allclose(to_np(layer(x)), expected, atol=1e-6)


def test_call_never_forms_the_kernel_shaped_delta(monkeypatch):
    layer = adapted(built(keras.layers.Conv2D(4, 3), (2, 6, 6, 3)))
    x = rng().normal(size=(2, 6, 6, 3)).astype("float32")
    expected = merged_reference(layer, x)

    def forbidden(*args):
        raise AssertionError("call() built A·B")

    monkeypatch.setattr(layer, "_delta_kernel", forbidden)
    np.testing.assert_allclose(to_np(layer(x, training=True)), expected,
                               rtol=1e-4, atol=1e-5)


def test_merge_then_unmerge_restores_the_kernel():
    layer = adapted(built(keras.layers.Conv1D(4, 3), (2, 8, 3)))
    assert isinstance(layer, LoRAConv1D)
    x = rng().normal(size=(2, 8, 3)).astype("float32")
    before, expected = to_np(layer.kernel).copy(), to_np(layer(x))
    layer.merge()
    np.testing.assert_allclose(to_np(layer(x)), expected, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    np.testing.assert_allclose(to_np(layer.kernel), before, atol=1e-6)


# Refusals ------------------------------------------------------------------

@pytest.mark.parametrize("make, shape", [
    (lambda: keras.layers.Conv2DTranspose(4, 3), (None, 6, 6, 3)),
    (lambda: keras.layers.DepthwiseConv2D(3), (None, 6, 6, 3)),
    (lambda: keras.layers.SeparableConv2D(4, 3), (None, 6, 6, 3)),
    (lambda: keras.layers.Conv1DTranspose(4, 3), (None, 6, 3)),
])
def test_transposed_depthwise_separable_convolutions_are_refused(make, shape):
    layer = built(make(), shape)
    assert lora_class_for(layer) is None
    with pytest.raises(TypeError, match=f"does not support {type(layer).__name__}"):
        LoRAConv2D.from_layer(layer)


def test_supported_types_name_the_new_base_classes_in_dispatch_order():
    assert supported_types() == [
        "EinsumDense", "Dense", "ReversibleEmbedding", "Embedding",
        "Conv1D", "Conv2D", "Conv3D",
    ]


def test_grouped_convolution_is_refused_and_unchanged():
    layer = built(keras.layers.Conv2D(4, 3, groups=2), (None, 6, 6, 4))
    with pytest.raises(ValueError, match="groups=2"):
        LoRAConv2D.from_layer(layer)
    assert layer.trainable and layer.kernel.trainable


def cnn(head=True):
    x = keras.Input((8, 8, 3))
    y = keras.layers.Conv2D(4, 3, name="conv", activation="relu")(x)
    y = keras.layers.Conv2DTranspose(3, 3, name="deconv")(y)
    y = keras.layers.GlobalAveragePooling2D()(y)
    return keras.Model(x, keras.layers.Dense(2, name="head")(y))


def test_apply_lora_names_an_unsupported_target():
    model = cnn()
    with pytest.raises(TypeError, match="deconv.*Conv2DTranspose.*cannot adapt"):
        keras_lora.apply_lora(model, targets="deconv")
    with pytest.raises(TypeError, match="cannot adapt Conv2DTranspose"):
        keras_lora.apply_lora(model, targets=keras.layers.Conv2DTranspose)
    assert not keras_lora.lora_layers(model)


# Targets and the model-level operations -----------------------------------

def test_default_targets_leave_convolutions_alone():
    model = keras_lora.apply_lora(cnn(), rank=2)
    assert sorted(keras_lora.lora_layers(model)) == ["head"]


@pytest.mark.parametrize("targets", [keras.layers.Conv2D, "conv", "all"])
def test_convolutions_adapted_by_type_name_or_the_all_preset(targets):
    model = keras_lora.apply_lora(cnn(), rank=2, targets=targets)
    layers = keras_lora.lora_layers(model)
    assert isinstance(layers["conv"], LoRAConv2D)
    assert "deconv" not in layers
    assert ("head" in layers) == (targets == "all")


def randomize(model):
    generator = rng()
    for layer in keras_lora.lora_layers(model).values():
        layer.lora_b.assign(
            generator.normal(size=layer.lora_b.shape).astype("float32"))


def images():
    return rng().normal(size=(2, 8, 8, 3)).astype("float32")


def test_merge_lora_of_a_cnn_keeps_outputs():
    model = keras_lora.apply_lora(cnn(), rank=2, targets="all")
    randomize(model)
    expected = to_np(model(images()))
    merged = keras_lora.merge_lora(model)
    assert type(merged.get_layer("conv")) is keras.layers.Conv2D
    np.testing.assert_allclose(to_np(merged(images())), expected,
                               rtol=1e-4, atol=1e-5)


def test_merge_and_unmerge_adapters_keep_outputs():
    model = keras_lora.apply_lora(cnn(), rank=2, targets="all")
    randomize(model)
    expected = to_np(model(images()))
    keras_lora.merge_adapters(model)
    np.testing.assert_allclose(to_np(model(images())), expected, rtol=1e-4, atol=1e-5)
    keras_lora.unmerge_adapters(model)
    np.testing.assert_allclose(to_np(model(images())), expected, rtol=1e-4, atol=1e-5)


def test_adapter_file_round_trip(tmp_path):
    keras.utils.set_random_seed(5)
    model = keras_lora.apply_lora(cnn(), rank=2, targets=["conv", "head"])
    randomize(model)
    expected = to_np(model(images()))
    path = str(tmp_path / "adapter.safetensors")
    keras_lora.save_adapter(model, path)
    keras.utils.set_random_seed(5)
    fresh = cnn()
    keras_lora.load_adapter(fresh, path)
    assert isinstance(keras_lora.lora_layers(fresh)["conv"], LoRAConv2D)
    np.testing.assert_allclose(to_np(fresh(images())), expected, rtol=1e-5, atol=1e-5)


def test_one_training_step_changes_only_the_adapters():
    model = keras_lora.apply_lora(cnn(), rank=2, targets="conv")
    layer = keras_lora.lora_layers(model)["conv"]
    kernel, bias = to_np(layer.kernel).copy(), to_np(layer.bias).copy()
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    model.fit(images(), np.ones((2, 2), "float32"), epochs=1, verbose=0)
    np.testing.assert_array_equal(to_np(layer.kernel), kernel)
    np.testing.assert_array_equal(to_np(layer.bias), bias)
    assert not np.allclose(to_np(layer.lora_b), 0.0)


def test_config_round_trip():
    layer = adapted(built(keras.layers.Conv3D(4, 2), (None, 4, 4, 4, 2)))
    clone = LoRAConv3D.from_config(layer.get_config())
    assert type(clone.base_layer) is keras.layers.Conv3D and clone.rank == RANK


def test_mixed_precision_keeps_float32_adapters():
    keras.config.set_dtype_policy("mixed_bfloat16")
    layer = adapted(built(keras.layers.Conv2D(4, 3), (None, 6, 6, 3)))
    assert layer.lora_a.dtype == "float32" and layer.lora_b.dtype == "float32"
    y = layer(rng().normal(size=(1, 6, 6, 3)).astype("float32"))
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"


# PEFT ----------------------------------------------------------------------

def _peft_outputs(torch_conv, keras_layer, x_nc):
    """PEFT's output for `torch_conv` with our adapters copied in."""
    import peft
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch_conv

        def forward(self, x):
            return self.conv(x)

    model = peft.get_peft_model(Net(), peft.LoraConfig(
        r=RANK, lora_alpha=4.0, target_modules=["conv"], lora_dropout=0.0))
    conv = model.base_model.model.conv
    a, b = to_np(keras_layer.lora_a), to_np(keras_layer.lora_b)
    spatial = a.ndim - 2
    # Ours (r, *k, in) -> torch (r, in, *k); ours (r, out) -> (out, r, 1...).
    a_torch = np.moveaxis(a, -1, 1)
    b_torch = b.T.reshape(b.shape[1], RANK, *(1,) * spatial)
    conv.lora_A["default"].weight.data = torch.tensor(np.ascontiguousarray(a_torch))
    conv.lora_B["default"].weight.data = torch.tensor(np.ascontiguousarray(b_torch))
    with torch.no_grad():
        return model(torch.tensor(x_nc)).numpy()


def test_conv2d_outputs_equal_peft_on_the_same_weights():
    import torch

    layer = adapted(built(keras.layers.Conv2D(5, (3, 2), strides=(2, 1),
                                              dilation_rate=1), (2, 9, 8, 3)))
    theirs = torch.nn.Conv2d(3, 5, (3, 2), stride=(2, 1))
    theirs.weight.data = torch.tensor(
        np.ascontiguousarray(np.transpose(to_np(layer.kernel), (3, 2, 0, 1))))
    theirs.bias.data = torch.tensor(to_np(layer.bias))
    x = rng().normal(size=(2, 9, 8, 3)).astype("float32")
    expected = _peft_outputs(theirs, layer, np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(to_np(layer(x)), expected.transpose(0, 2, 3, 1),
                               rtol=1e-4, atol=1e-5)


def test_conv1d_outputs_equal_peft_on_the_same_weights():
    import torch

    # (PEFT's lora_A drops the base's dilation, so its forward pass differs
    # from its own merged kernel on dilated convs; compare without one.)
    layer = adapted(built(keras.layers.Conv1D(4, 3, padding="same"), (2, 10, 3)))
    theirs = torch.nn.Conv1d(3, 4, 3, padding=1)
    theirs.weight.data = torch.tensor(
        np.ascontiguousarray(np.transpose(to_np(layer.kernel), (2, 1, 0))))
    theirs.bias.data = torch.tensor(to_np(layer.bias))
    x = rng().normal(size=(2, 10, 3)).astype("float32")
    expected = _peft_outputs(theirs, layer, np.ascontiguousarray(x.transpose(0, 2, 1)))
    np.testing.assert_allclose(to_np(layer(x)), expected.transpose(0, 2, 1),
                               rtol=1e-4, atol=1e-5)


def mixed_model():
    ids = keras.Input((4,), dtype="int32")
    tokens = keras.layers.Embedding(11, 6, name="token_embedding")(ids)
    image = keras.Input((8, 8, 3))
    features = keras.layers.Conv2D(4, 3, name="conv")(image)
    pooled = keras.layers.Concatenate()([
        keras.layers.GlobalAveragePooling1D()(tokens),
        keras.layers.GlobalAveragePooling2D()(features),
    ])
    return keras.Model([ids, image], keras.layers.Dense(4, name="head")(pooled))


def test_clone_keras_save_and_in_place_merge_keep_outputs(tmp_path):
    base = mixed_model()
    model = keras_lora.clone_with_lora(base, rank=2, targets="all")
    assert not keras_lora.lora_layers(base)
    randomize(model)
    inputs = [np.array([[1, 2, 3, 4], [5, 6, 7, 10]]), images()]
    expected = to_np(model(inputs))
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.get_layer("conv"), LoRAConv2D)
    np.testing.assert_allclose(to_np(loaded(inputs)), expected, rtol=1e-5, atol=1e-6)
    merged = keras_lora.merge_lora(model, in_place=True)
    assert type(merged.get_layer("conv")) is keras.layers.Conv2D
    assert type(merged.get_layer("token_embedding")) is keras.layers.Embedding
    np.testing.assert_allclose(to_np(merged(inputs)), expected, rtol=1e-4, atol=1e-5)


def test_extend_layout_map_derives_table_and_conv_adapter_layouts():
    mesh = keras.distribution.DeviceMesh(
        (2, 4), ("batch", "model"), [f"cpu:{i}" for i in range(8)])
    model = keras_lora.apply_lora(mixed_model(), rank=2, targets="all")
    table_path = keras_lora.lora_layers(model)["token_embedding"].kernel.path
    conv_path = keras_lora.lora_layers(model)["conv"].kernel.path
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[table_path] = ("model", "batch")
    layout_map[conv_path] = (None, None, "batch", "model")
    keras_lora.extend_layout_map(layout_map, model)
    table_dir, conv_dir = table_path.rsplit("/", 1)[0], conv_path.rsplit("/", 1)[0]
    assert layout_map[f"{table_dir}/lora_a"].axes == (None, "model")
    assert layout_map[f"{table_dir}/lora_b"].axes == (None, "batch")
    assert layout_map[f"{conv_dir}/lora_a"].axes == (None, None, None, "batch")
    assert layout_map[f"{conv_dir}/lora_b"].axes == (None, "model")


def test_two_named_adapters_add_up_and_merge():
    model = keras_lora.apply_lora(cnn(), rank=2, targets="conv")
    keras_lora.add_adapter(model, "second", rank=3, targets="conv")
    keras_lora.set_adapter(model, ["default", "second"])
    layer = keras_lora.lora_layers(model)["conv"]
    generator = rng()
    delta = 0.0
    for adapter in layer.adapters.values():
        adapter.lora_b.assign(
            generator.normal(size=adapter.lora_b.shape).astype("float32"))
        delta = delta + adapter.scaling * np.tensordot(
            to_np(adapter.lora_a), to_np(adapter.lora_b), axes=[[0], [0]])
    x = images()
    twin = keras.layers.Conv2D(4, 3, activation="relu")
    twin.build(x.shape)
    twin.set_weights([to_np(layer.kernel) + delta, to_np(layer.bias)])
    np.testing.assert_allclose(to_np(layer(x)), to_np(twin(x)), rtol=1e-4, atol=1e-5)
    expected = to_np(model(x))
    keras_lora.merge_adapters(model)
    np.testing.assert_allclose(to_np(model(x)), expected, rtol=1e-4, atol=1e-5)
