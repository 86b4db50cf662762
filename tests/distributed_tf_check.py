"""LoRA under tf.distribute.MirroredStrategy on two logical CPUs (TF).

Run in a fresh process (`tests/test_distribution.py` does): logical devices
must be configured before TensorFlow runs any op. Prints one JSON line of
measurements; the test asserts on them.

Trains a small adapted model (EinsumDense attention-style projection plus
Dense layers) for a few steps on one device and, from the same initial
weights and batches, under `MirroredStrategy` with the model created and
adapted in `strategy.scope()`.
"""

import os

os.environ["KERAS_BACKEND"] = "tensorflow"

import json  # noqa: E402

import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_lora  # noqa: E402

STEPS = 4
BATCH, LENGTH, FEATURES, CLASSES = 8, 4, 16, 5


def build_model():
    inputs = keras.Input((LENGTH, FEATURES))
    x = keras.layers.EinsumDense(
        "btd,dnh->btnh", (LENGTH, 2, 8), name="query"
    )(inputs)
    x = keras.layers.Reshape((LENGTH * 16,))(x)
    x = keras.layers.Dense(16, activation="relu", name="hidden")(x)
    outputs = keras.layers.Dense(CLASSES, name="logits")(x)
    model = keras.Model(inputs, outputs)
    keras_lora.apply_lora(model, rank=2, alpha=4)
    return model


def train(model, weights):
    for variable in model.weights:
        variable.assign(weights[variable.path])
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, LENGTH, FEATURES)).astype("float32")
    y = rng.integers(0, CLASSES, BATCH)
    history = model.fit(
        x, y, batch_size=BATCH, epochs=STEPS, shuffle=False, verbose=0
    )
    return history.history["loss"]


def adapters(model):
    return {
        variable.path: keras.ops.convert_to_numpy(variable)
        for layer in keras_lora.lora_layers(model).values()
        for variable in (layer.lora_a, layer.lora_b)
    }


def main():
    keras.utils.set_random_seed(0)
    single = build_model()
    weights = {v.path: keras.ops.convert_to_numpy(v) for v in single.weights}
    single_losses = train(single, weights)

    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    strategy = tf.distribute.MirroredStrategy(devices)
    with strategy.scope():
        mirrored = build_model()
        mirrored_losses = train(mirrored, weights)
    lora_a = keras_lora.lora_layers(mirrored)["query"].lora_a
    result = {
        "replicas": strategy.num_replicas_in_sync,
        "single_losses": single_losses,
        "mirrored_losses": mirrored_losses,
        "adapter_max_diff": float(
            max(
                np.max(np.abs(a - b))
                for a, b in zip(
                    adapters(single).values(), adapters(mirrored).values()
                )
            )
        ),
        "adapter_change": float(
            max(
                np.max(np.abs(value - weights[path]))
                for path, value in adapters(mirrored).items()
            )
        ),
        "adapter_is_mirrored": isinstance(
            lora_a.value, tf.distribute.DistributedValues
        ),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
