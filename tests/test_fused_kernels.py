"""The fused base-plus-update kernel (`keras_lora/layers/fused_kernels.py`).

A layer with one plain adapter computes `x·W + b + s·(x·Aᵀ)·B` as one
kernel on torch and JAX. Pinned here: it is taken exactly when it may be,
and its outputs and gradients (input, A, B, bias, an unfrozen kernel) are
those of the separate kernels, on every backend (TensorFlow has no fused
path, so there both sides are the separate kernels).
"""

import keras
import numpy as np
import pytest

import keras_lora
from keras_lora.layers import LoRADense
from keras_lora.layers import LoRAEinsumDense
from keras_lora.layers import fused_kernels

BACKEND = keras.backend.backend()
FUSES = fused_kernels.ENABLED


def unfused(layer_class):
    """`layer_class` without the fused path."""

    class Unfused(layer_class):
        def _fused_layout(self):
            return None

    return Unfused


def make_layer(kind, layer_class=None, train_bias=False, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "dense":
        base = keras.layers.Dense(6, activation="relu")
        base.build((None, 3, 5))
        cls = layer_class or LoRADense
    else:
        equation, out_shape, bias_axes, in_shape = KINDS[kind]
        base = keras.layers.EinsumDense(
            equation, out_shape, bias_axes=bias_axes
        )
        base.build(in_shape)
        cls = layer_class or LoRAEinsumDense
    for variable in base.weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    layer = cls.from_layer(base, rank=2, alpha=3.0, train_bias=train_bias)
    for variable in (layer.lora_a, layer.lora_b):
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    return layer


# equation, output shape, bias axes, input shape
KINDS = {
    "query": ("abc,cde->abde", (None, 2, 4), "de", (2, 3, 5)),
    "attention_output": ("abcd,cde->abe", (None, 5), "e", (2, 3, 2, 4)),
    "gemma_query": ("btd,ndh->btnh", (None, 2, 4), None, (2, 3, 5)),
    "partial_bias": ("abc,cde->abde", (None, 2, 4), "e", (2, 3, 5)),
}


def input_shape(kind):
    return (2, 3, 5) if kind == "dense" else KINDS[kind][3]


def values_and_gradients(layer, x, g):
    """`layer(x)` and the gradients of `sum(layer(x) · g)` with respect to
    `x` and each trainable variable, as numpy."""
    variables = layer.trainable_variables
    if BACKEND == "tensorflow":
        import tensorflow as tf

        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * g)
        grads = tape.gradient(loss, [x] + variables)
    elif BACKEND == "torch":
        import torch

        x = torch.tensor(x, requires_grad=True)
        y = layer(x)
        loss = (y * torch.tensor(g)).sum()
        grads = torch.autograd.grad(loss, [x] + [v.value for v in variables])
    else:
        import jax

        trainable = [v.value for v in variables]
        frozen = [v.value for v in layer.non_trainable_variables]

        def loss(x, trainable):
            y, _ = layer.stateless_call(trainable, frozen, x)
            return (y * g).sum(), y

        (grad_x, grad_vars), y = jax.grad(
            loss, argnums=(0, 1), has_aux=True
        )(x, trainable)
        grads = [grad_x] + list(grad_vars)
    names = ["inputs"] + [v.name for v in variables]
    return keras.ops.convert_to_numpy(y), {
        n: keras.ops.convert_to_numpy(d) for n, d in zip(names, grads)
    }


def assert_same_as_unfused(kind, train_bias=False, unfreeze_kernel=False):
    x = np.random.default_rng(1).normal(size=input_shape(kind))
    x = x.astype("float32")
    results = []
    for layer_class in (None, unfused(LoRADense if kind == "dense"
                                      else LoRAEinsumDense)):
        layer = make_layer(kind, layer_class, train_bias)
        if unfreeze_kernel:
            layer.base_layer.kernel.trainable = True
        shape = tuple(layer(x).shape)
        g = np.random.default_rng(2).normal(size=shape).astype("float32")
        results.append(values_and_gradients(layer, x, g))
    (fused_y, fused_grads), (plain_y, plain_grads) = results
    np.testing.assert_allclose(fused_y, plain_y, rtol=1e-5, atol=1e-5)
    assert sorted(fused_grads) == sorted(plain_grads)
    for name, grad in plain_grads.items():
        np.testing.assert_allclose(
            fused_grads[name], grad, rtol=1e-4, atol=1e-4, err_msg=name
        )
    return fused_grads


@pytest.mark.parametrize("kind", ["dense", "query", "attention_output"])
def test_fused_outputs_and_gradients_equal_the_separate_kernels(kind):
    grads = assert_same_as_unfused(kind)
    assert len(grads) == 3  # inputs, lora_a, lora_b
    grads = assert_same_as_unfused(kind, train_bias=True)
    assert any(name.endswith("bias") for name in grads)


def test_an_unfrozen_kernel_gets_its_gradient_through_the_fused_kernel():
    grads = assert_same_as_unfused("dense", unfreeze_kernel=True)
    assert any(name.endswith("kernel") for name in grads)


class Spy:
    """Counts the calls of `fused_kernels.dense_with_update` that fused."""

    def __init__(self, monkeypatch):
        self.fused = 0
        original = fused_kernels.dense_with_update

        def spy(*args):
            result = original(*args)
            self.fused += result is not None
            return result

        monkeypatch.setattr(fused_kernels, "dense_with_update", spy)


@pytest.mark.parametrize("kind", ["dense", "query", "attention_output"])
def test_fused_where_one_plain_adapter_applies(monkeypatch, kind):
    spy = Spy(monkeypatch)
    layer = make_layer(kind)
    layer(np.ones(input_shape(kind), "float32"))
    assert spy.fused == (1 if FUSES else 0)


@pytest.mark.parametrize("kind", ["gemma_query", "partial_bias"])
def test_kernels_without_a_2d_view_keep_the_separate_kernels(monkeypatch, kind):
    # Gemma's kernel `ndh` has its contracted axis in the middle; a bias
    # on some free axes only is not a `(d_out,)` vector.
    spy = Spy(monkeypatch)
    layer = make_layer(kind)
    assert layer._fused_layout() is None
    layer(np.ones(input_shape(kind), "float32"))
    assert spy.fused == 0


def test_not_fused_with_dropout_two_adapters_dora_or_disabled(monkeypatch):
    spy = Spy(monkeypatch)
    x = np.ones((2, 3, 5), "float32")
    model = keras.Sequential([keras.Input((3, 5)), keras.layers.Dense(6)])
    keras_lora.apply_lora(model, rank=2, dropout=0.5)
    layer = model.layers[0]
    layer(x, training=True)  # dropout active: the update's input differs
    assert spy.fused == 0
    layer(x, training=False)  # dropout off at inference
    assert spy.fused == (1 if FUSES else 0)

    spy.fused = 0
    keras_lora.add_adapter(model, "dora", rank=2, use_dora=True)
    keras_lora.set_adapter(model, "dora")
    layer = model.layers[0]
    assert list(layer.adapters) == ["default", "dora"]
    layer(x)
    keras_lora.set_adapter(model, ["default", "dora"])
    layer(x)
    with keras_lora.disable_adapters(model):
        layer(x)
    assert spy.fused == 0


def test_compiled_models_fuse(monkeypatch):
    # JAX inlines the fused function under `jit`, torch.compile traces the
    # autograd.Function, TF's graph (with XLA or not) takes the fused ops.
    spy = Spy(monkeypatch)
    model = keras.Sequential([keras.Input((3, 5)), keras.layers.Dense(6)])
    keras_lora.apply_lora(model, rank=2)
    for jit_compile in (True, False):
        spy.fused = 0
        model.compile(loss="mse", jit_compile=jit_compile)
        model.predict(np.ones((2, 3, 5), "float32"), verbose=0)
        assert spy.fused >= 1
