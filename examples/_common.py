"""What the digits examples share: data, the pretrained base, small helpers.

The examples pretrain a small MLP on scikit-learn's bundled handwritten
digits (8x8 images, 1,797 samples, no download) and adapt it with LoRA to
digits drawn differently (rotated, mirrored). A small model keeps
`make demo` at about a minute on a 2-core CPU on every backend; the same
calls adapt a keras-hub transformer (see
`examples/minilm_text_classifier.py`).
"""

import functools
import os
import subprocess
import sys
import textwrap

import numpy as np

try:
    import keras_lora  # noqa: F401
except ImportError:
    # Running from a checkout without `make install`: use the repository.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402


BATCH_SIZE = 64


def one_torch_thread(function):
    """Runs `function` with PyTorch on one CPU thread, then restores it.

    The examples' models are tiny. On the PyTorch backend, splitting each
    small matmul over several threads costs more than it saves, and on a
    CPU shared with other processes it made training about 60x slower
    (measured on 2 busy cores: 0.3 s per step with 2 threads, 5 ms with 1).
    Other backends are left alone.
    """

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        if keras.backend.backend() != "torch":
            return function(*args, **kwargs)
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return function(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


def load_digits_split(seed=0, test_fraction=0.3):
    """All 1,797 digits, pixels scaled to [0, 1], split into train and test.

    Returns:
        `(x_train, y_train, x_test, y_test)`; `x` float32 `(n, 64)`, `y` the
        digit 0-9 as int32.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_test = int(round(test_fraction * len(x)))
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def pretrain_and_task_split():
    """Disjoint digits for pretraining and for the new task, and a test set.

    The training digits are halved: the base model learns from the first
    half, adapters from the second (transformed), and everything is scored
    on held-out digits neither has seen.

    Returns:
        `{"pretrain": (x, y), "task": (x, y), "test": (x, y)}`.
    """
    x_train, y_train, x_test, y_test = load_digits_split()
    half = len(x_train) // 2
    return {
        "pretrain": (x_train[:half], y_train[:half]),
        "task": (x_train[half:], y_train[half:]),
        "test": (x_test, y_test),
    }


def rotated(x):
    """Each 8x8 digit turned by 90 degrees counter-clockwise."""
    return np.rot90(x.reshape(-1, 8, 8), axes=(1, 2)).reshape(-1, 64).copy()


def mirrored(x):
    """Each 8x8 digit flipped left to right."""
    return x.reshape(-1, 8, 8)[:, :, ::-1].reshape(-1, 64).copy()


def build_base(num_classes=10, width=256, name="digits_mlp"):
    """The base architecture: three ReLU `Dense` layers and a linear head."""
    inputs = keras.Input((64,), name="pixels")
    h = inputs
    for i, units in enumerate((width, width, width // 2), start=1):
        h = keras.layers.Dense(units, activation="relu", name=f"hidden_{i}")(h)
    outputs = keras.layers.Dense(num_classes, name="head")(h)
    return keras.Model(inputs, outputs, name=name)


def compile_classifier(model, learning_rate):
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def fit_classifier(model, x, y, epochs, learning_rate, verbose=0):
    """Compiles and fits; the same seed gives every variant the same batches."""
    compile_classifier(model, learning_rate)
    keras.utils.set_random_seed(2)
    model.fit(x, y, epochs=epochs, batch_size=BATCH_SIZE, verbose=verbose)
    return model


def pretrain_base(path, x, y, epochs):
    """Trains the base classifier on `(x, y)`, saves it to `path`, returns it."""
    keras.utils.set_random_seed(0)
    base = fit_classifier(build_base(), x, y, epochs, learning_rate=3e-3)
    save_weights_and_architecture(base, path)
    return base


def save_weights_and_architecture(model, path):
    """Saves `model` to a `.keras` file without its optimizer state.

    `model.save` on a compiled, trained model also stores the optimizer's
    moments (twice the weights for Adam); a model to share or compare sizes
    with is its architecture and weights only.
    """
    copy = keras.Model.from_config(model.get_config())  # not compiled
    copy.set_weights(model.get_weights())
    copy.save(path)


def predict(model, x):
    """`model(x)` as numpy. The data sets here are small enough for one call,
    and a direct call does not trace a new `predict` function per model."""
    return keras.ops.convert_to_numpy(model(x, training=False))


def accuracy(model, x, y):
    return float(np.mean(np.argmax(predict(model, x), axis=-1) == y))


def count_params(variables):
    return int(sum(np.prod(v.shape) for v in variables))


def size_of(path):
    """Bytes in a file, or in every file under a directory."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(
        os.path.getsize(os.path.join(root, f))
        for root, _, files in os.walk(path)
        for f in files
    )


def human_size(num_bytes):
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1024 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024


_SERVE_WITH_TENSORFLOW = """
import sys
import numpy as np
import tensorflow as tf
served = tf.saved_model.load(sys.argv[1])
x = np.load(sys.argv[2])
np.save(sys.argv[3], served.serve(tf.constant(x)).numpy())
print("keras_lora imported:", "yes" if "keras_lora" in sys.modules else "no")
"""

_LOAD_WITH_KERAS = """
import sys
import keras
import numpy as np
model = keras.saving.load_model(sys.argv[1], safe_mode=True)
x = np.load(sys.argv[2])
np.save(sys.argv[3], keras.ops.convert_to_numpy(model(x)))
print("keras_lora imported:", "yes" if "keras_lora" in sys.modules else "no")
"""


def serve_with_plain_tensorflow(saved_model_dir, x, work_dir):
    """Runs `x` through a SavedModel's `serve` endpoint in a new process.

    The process uses only TensorFlow, as a serving system would, and
    reports whether `keras_lora` got imported.

    Returns:
        `(outputs, report_line)`.
    """
    return _run_fresh_python(
        _SERVE_WITH_TENSORFLOW, saved_model_dir, x, work_dir, backend=None
    )


def load_with_plain_keras(keras_file, x, work_dir):
    """Loads a `.keras` file with plain Keras in a new process, runs `x`.

    Same backend as this process; `safe_mode=True`; no keras-lora import.

    Returns:
        `(outputs, report_line)`.
    """
    return _run_fresh_python(
        _LOAD_WITH_KERAS, keras_file, x, work_dir, backend=keras.backend.backend()
    )


def _run_fresh_python(script, artifact, x, work_dir, backend):
    inputs = os.path.join(work_dir, "fresh_inputs.npy")
    outputs = os.path.join(work_dir, "fresh_outputs.npy")
    np.save(inputs, x)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("KERAS_BACKEND", None)
    if backend:
        env["KERAS_BACKEND"] = backend
    result = subprocess.run(
        [sys.executable, "-c", script, os.path.abspath(artifact), inputs, outputs],
        capture_output=True,
        text=True,
        env=env,
        cwd=work_dir,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"Loading '{artifact}' in a new Python process failed:\n"
            + textwrap.indent(result.stderr[-3000:], "  ")
        )
    values = np.load(outputs)
    os.remove(inputs)
    os.remove(outputs)
    return values, result.stdout.strip().splitlines()[-1]


def train_rotated_adapter(output_dir, epochs, rank=8):
    """The quickstart's artifacts, made quietly: a base and an adapter.

    Pretrains the base on upright digits and trains a rank-`rank` LoRA
    adapter for rotated digits.

    Returns:
        `(base_path, adapter_path)`.
    """
    import keras_lora

    data = pretrain_and_task_split()
    base_path = os.path.join(output_dir, "base_digits.keras")
    adapter_path = os.path.join(output_dir, "rotated_digits.safetensors")
    pretrain_base(base_path, *data["pretrain"], epochs=epochs)
    model = keras_lora.apply_lora(keras.saving.load_model(base_path), rank=rank)
    x, y = data["task"]
    fit_classifier(model, rotated(x), y, epochs, learning_rate=1e-2)
    keras_lora.save_adapter(model, adapter_path)
    return base_path, adapter_path
