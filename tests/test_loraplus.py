"""LoRA+: `lora_b` trains at `lr_ratio` x the learning rate of the rest."""

import math

import keras
import numpy as np
import pytest

import keras_lora
from keras_lora.loraplus import LoRAPlusOptimizer, is_lora_b

LR, RATIO = 1e-3, 16.0


def to_np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def rng(seed=0):
    return np.random.default_rng(seed)


def random_b():
    # B = 0 (the default) gives A a zero gradient on the first step.
    return keras.initializers.RandomNormal(stddev=0.5, seed=3)


def adapted_model():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(6, activation="tanh", name="hidden")(inputs)
    outputs = keras.layers.Dense(2, name="out")(hidden)
    model = keras.Model(inputs, outputs)
    model(np.zeros((1, 4), "float32"))
    return keras_lora.apply_lora(
        model, rank=2, targets=["hidden", "out"], lora_b_initializer=random_b()
    )


def data(n=16):
    x = rng(1).normal(size=(n, 4)).astype("float32")
    y = rng(2).normal(size=(n, 2)).astype("float32")
    return x, y


def variables_and_grads():
    """An A, a B, and a variable no adapter owns, with fixed gradients."""
    variables = [
        keras.Variable(rng(3).normal(size=(2, 3)), name="lora_a"),
        keras.Variable(rng(4).normal(size=(2, 3)), name="lora_b"),
        keras.Variable(rng(5).normal(size=(3,)), name="bias"),
    ]
    grads = [rng(6 + i).normal(size=v.shape).astype("float32") for i, v in
             enumerate(variables)]
    return variables, grads


def apply(optimizer, grads, variables):
    # torch's fused update rules take tensors, not numpy arrays.
    optimizer.apply([keras.ops.convert_to_tensor(g) for g in grads], variables)


def adam_steps(value, grads, lr, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    """Keras's Adam rule in float64 numpy, one step per gradient."""
    value = value.astype("float64")
    m = np.zeros_like(value)
    v = np.zeros_like(value)
    for step, grad in enumerate(grads, start=1):
        m = beta_1 * m + (1 - beta_1) * grad
        v = beta_2 * v + (1 - beta_2) * grad**2
        alpha = lr * math.sqrt(1 - beta_2**step) / (1 - beta_1**step)
        value = value - alpha * m / (np.sqrt(v) + epsilon)
    return value


def test_is_lora_b_reads_the_variable_name():
    assert is_lora_b(keras.Variable(0.0, name="lora_b"))
    assert not is_lora_b(keras.Variable(0.0, name="lora_a"))
    assert not is_lora_b(keras.Variable(0.0, name="lora_b_extra"))


def test_every_adapter_b_of_an_adapted_model_is_found():
    model = adapted_model()
    names = sorted(v.path for v in model.trainable_variables if is_lora_b(v))
    assert names == ["hidden/lora_b", "out/lora_b"]


def test_b_of_every_named_adapter_is_found():
    model = adapted_model()
    keras_lora.add_adapter(model, "second", rank=2)
    keras_lora.set_adapter(model, "second")
    b = [v for v in model.trainable_variables if is_lora_b(v)]
    assert len(b) == 2
    assert all(v.path.endswith("lora_b") and "second" in v.path for v in b)


def test_apply_gradients_returns_the_step_count():
    variables, grads = variables_and_grads()
    optimizer = keras_lora.loraplus_optimizer(keras.optimizers.SGD(0.1))
    grads = [keras.ops.convert_to_tensor(g) for g in grads]
    optimizer.apply_gradients(zip(grads, variables))
    step = optimizer.apply_gradients(zip(grads, variables))
    assert int(to_np(step)) == 2


def test_adam_b_step_is_ratio_times_a_step_each_equal_to_plain_adam():
    variables, grads = variables_and_grads()
    before = [to_np(v).copy() for v in variables]
    optimizer = keras_lora.loraplus_optimizer(
        keras.optimizers.Adam(LR), lr_ratio=RATIO
    )
    apply(optimizer, grads, variables)
    a, b, bias = (to_np(v) - start for v, start in zip(variables, before))
    np.testing.assert_allclose(
        b, adam_steps(before[1], [grads[1]], LR * RATIO) - before[1],
        rtol=1e-4, atol=1e-7,
    )
    np.testing.assert_allclose(
        a, adam_steps(before[0], [grads[0]], LR) - before[0],
        rtol=1e-4, atol=1e-7,
    )
    np.testing.assert_allclose(
        bias, adam_steps(before[2], [grads[2]], LR) - before[2],
        rtol=1e-4, atol=1e-7,
    )
    # Adam's first step is ~lr * sign(g): B moves ~16x as far as A.
    np.testing.assert_allclose(np.abs(b), LR * RATIO, rtol=1e-2)
    np.testing.assert_allclose(np.abs(a), LR, rtol=1e-2)


def test_adam_slots_and_iterations_carry_over_steps():
    variables, grads = variables_and_grads()
    before = [to_np(v).copy() for v in variables]
    second = [g * -0.5 + 0.1 for g in grads]
    optimizer = keras_lora.loraplus_optimizer(keras.optimizers.Adam(LR))
    apply(optimizer, grads, variables)
    apply(optimizer, second, variables)
    assert int(to_np(optimizer.iterations)) == 2
    for i, lr in [(0, LR), (1, LR * RATIO), (2, LR)]:
        np.testing.assert_allclose(
            to_np(variables[i]),
            adam_steps(before[i], [grads[i], second[i]], lr),
            rtol=1e-4, atol=1e-6,
        )


def test_sgd_b_step_is_exactly_ratio_times_a_step():
    variables, grads = variables_and_grads()
    before = [to_np(v).copy() for v in variables]
    optimizer = keras_lora.loraplus_optimizer(
        keras.optimizers.SGD(0.1), lr_ratio=4.0
    )
    apply(optimizer, grads, variables)
    for i, lr in [(0, 0.1), (1, 0.4), (2, 0.1)]:
        np.testing.assert_allclose(
            to_np(variables[i]), before[i] - lr * grads[i], rtol=1e-6
        )


def test_learning_rate_setter_moves_both_rates():
    variables, grads = variables_and_grads()
    before = [to_np(v).copy() for v in variables]
    optimizer = keras_lora.loraplus_optimizer(
        keras.optimizers.SGD(0.1), lr_ratio=4.0
    )
    optimizer.learning_rate = 0.01  # what LR callbacks do
    assert math.isclose(float(to_np(optimizer.learning_rate)), 0.01,
                        rel_tol=1e-6)
    apply(optimizer, grads, variables)
    np.testing.assert_allclose(
        to_np(variables[1]), before[1] - 0.04 * grads[1], rtol=1e-5
    )
    np.testing.assert_allclose(
        to_np(variables[0]), before[0] - 0.01 * grads[0], rtol=1e-5
    )


def test_schedule_is_scaled_for_b_at_every_step():
    schedule = keras.optimizers.schedules.ExponentialDecay(
        0.1, decay_steps=1, decay_rate=0.5
    )
    variables, grads = variables_and_grads()
    expected = [to_np(v).astype("float64") for v in variables]
    optimizer = keras_lora.loraplus_optimizer(
        keras.optimizers.SGD(schedule), lr_ratio=RATIO
    )
    for step in range(3):
        apply(optimizer, grads, variables)
        lr = 0.1 * 0.5**step
        for i, scale in [(0, 1.0), (1, RATIO), (2, 1.0)]:
            expected[i] = expected[i] - lr * scale * grads[i]
    for i in range(3):
        np.testing.assert_allclose(to_np(variables[i]), expected[i],
                                   rtol=1e-5, atol=1e-6)


def test_decoupled_weight_decay_uses_each_group_rate():
    variables, grads = variables_and_grads()
    before = [to_np(v).copy() for v in variables]
    optimizer = keras_lora.loraplus_optimizer(
        keras.optimizers.SGD(0.1, weight_decay=0.5), lr_ratio=2.0
    )
    apply(optimizer, grads, variables)
    for i, lr in [(0, 0.1), (1, 0.2), (2, 0.1)]:
        decayed = before[i] - before[i] * 0.5 * lr
        np.testing.assert_allclose(
            to_np(variables[i]), decayed - lr * grads[i], rtol=1e-5
        )


def test_fit_first_step_moves_b_ratio_times_as_far_as_a():
    model = adapted_model()
    model.compile(
        optimizer=keras_lora.loraplus_optimizer(keras.optimizers.Adam(LR)),
        loss="mse",
    )
    before = {v.path: to_np(v).copy() for v in model.trainable_variables}
    x, y = data()
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    for variable in model.trainable_variables:
        step = np.abs(to_np(variable) - before[variable.path])
        expected = LR * RATIO if is_lora_b(variable) else LR
        np.testing.assert_allclose(step, expected, rtol=0.05,
                                   err_msg=variable.path)


def test_fit_decreases_the_loss():
    model = adapted_model()
    model.compile(
        optimizer=keras_lora.loraplus_optimizer(
            keras.optimizers.Adam(1e-2), lr_ratio=RATIO
        ),
        loss="mse",
    )
    x, y = data()
    history = model.fit(x, y, batch_size=8, epochs=15, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.9 * losses[0]
    assert int(to_np(model.optimizer.iterations)) == 30


def test_fit_under_mixed_float16_wraps_it_in_loss_scaling():
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = adapted_model()
    model.compile(
        optimizer=keras_lora.loraplus_optimizer(keras.optimizers.Adam(1e-2)),
        loss="mse",
    )
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert isinstance(model.optimizer.inner_optimizer, LoRAPlusOptimizer)
    x, y = data()
    history = model.fit(x, y, batch_size=8, epochs=10, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0]


def test_fit_with_ema_on_the_wrapped_optimizer():
    model = adapted_model()
    model.compile(
        optimizer=keras_lora.loraplus_optimizer(
            keras.optimizers.Adam(1e-2, use_ema=True)
        ),
        loss="mse",
    )
    x, y = data()
    history = model.fit(x, y, batch_size=8, epochs=10, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0]


def test_config_round_trip():
    schedule = keras.optimizers.schedules.ExponentialDecay(
        1e-3, decay_steps=10, decay_rate=0.9
    )
    optimizer = keras_lora.loraplus_optimizer(
        keras.optimizers.AdamW(schedule, weight_decay=0.01), lr_ratio=8.0
    )
    restored = LoRAPlusOptimizer.from_config(optimizer.get_config())
    assert restored.lr_ratio == 8.0
    inner = restored.inner_optimizer
    assert isinstance(inner, keras.optimizers.AdamW)
    assert inner.weight_decay == 0.01
    assert isinstance(inner._learning_rate,
                      keras.optimizers.schedules.ExponentialDecay)


def test_compile_config_round_trip():
    model = adapted_model()
    model.compile(
        optimizer=keras_lora.loraplus_optimizer(
            keras.optimizers.Adam(LR), lr_ratio=4.0
        ),
        loss="mse",
    )
    config = model.get_compile_config()
    optimizer = keras.saving.deserialize_keras_object(config["optimizer"])
    assert isinstance(optimizer, LoRAPlusOptimizer)
    assert optimizer.lr_ratio == 4.0
    assert math.isclose(float(to_np(optimizer.learning_rate)), LR,
                        rel_tol=1e-6)
    other = adapted_model()
    other.compile_from_config(config)
    assert isinstance(other.optimizer, LoRAPlusOptimizer)
    assert other.optimizer.lr_ratio == 4.0


def test_saved_model_reloads_with_its_optimizer_and_state(tmp_path):
    model = adapted_model()
    model.compile(
        optimizer=keras_lora.loraplus_optimizer(
            keras.optimizers.Adam(LR), lr_ratio=4.0
        ),
        loss="mse",
    )
    x, y = data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.optimizer, LoRAPlusOptimizer)
    assert loaded.optimizer.lr_ratio == 4.0
    assert int(to_np(loaded.optimizer.iterations)) == 2
    saved = [to_np(v) for v in model.optimizer.variables]
    restored = [to_np(v) for v in loaded.optimizer.variables]
    assert len(saved) == len(restored)
    for a, b in zip(saved, restored):
        np.testing.assert_allclose(a, b)
    loaded.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert int(to_np(loaded.optimizer.iterations)) == 4


def test_optimizer_name_is_accepted():
    optimizer = keras_lora.loraplus_optimizer("sgd", lr_ratio=2)
    assert isinstance(optimizer.inner_optimizer, keras.optimizers.SGD)
    assert optimizer.lr_ratio == 2.0


@pytest.mark.parametrize(
    "lr_ratio", [0, -1.0, float("nan"), float("inf"), "16", None, True]
)
def test_bad_lr_ratio_is_refused_and_the_optimizer_untouched(lr_ratio):
    adam = keras.optimizers.Adam(LR)
    with pytest.raises(ValueError, match=r"Received: lr_ratio="):
        keras_lora.loraplus_optimizer(adam, lr_ratio=lr_ratio)
    assert not hasattr(adam, "_loraplus_ratio")
    keras_lora.loraplus_optimizer(adam)  # still wrappable


@pytest.mark.parametrize("optimizer", [3, None, "no_such_optimizer", {}])
def test_bad_optimizer_is_refused(optimizer):
    with pytest.raises(ValueError, match=r"Received: optimizer="):
        keras_lora.loraplus_optimizer(optimizer)


def test_wrapped_optimizers_are_refused():
    adam = keras.optimizers.Adam(LR)
    wrapped = keras_lora.loraplus_optimizer(adam)
    for optimizer in [
        wrapped,
        adam,
        keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(LR)),
    ]:
        with pytest.raises(ValueError, match=r"Received: optimizer="):
            keras_lora.loraplus_optimizer(optimizer)


def test_unknown_keyword_is_refused():
    with pytest.raises(ValueError, match=r"Received: clipnorm=1.0"):
        LoRAPlusOptimizer(keras.optimizers.Adam(LR), clipnorm=1.0)
