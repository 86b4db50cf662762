"""Two tasks on one frozen base, trained one at a time, served by one SavedModel.

A digit classifier is pretrained on upright handwritten digits
(scikit-learn's bundled `load_digits`, no download). Two tasks use the
same labels on differently drawn inputs: rotated and mirrored digits. Both
adapters live on ONE model: `add_adapter` creates the second, and
`set_adapter` chooses which one trains (only the active adapter's
variables change in `fit`).

Then `export_multi_adapter` writes one TensorFlow SavedModel holding the
base weights once and both adapters. Its serving signature takes the
images plus an `adapter_index` per example (0 = rotated, 1 = mirrored,
-1 = the base model), so one request can mix tasks. The script serves a
mixed batch with plain TensorFlow in a new process (keras-lora not
imported) and checks each example against the Keras model with that
adapter active.

    python examples/multi_task_serving.py
"""

import os
import subprocess
import sys
import textwrap

import _common
import keras
import numpy as np

import keras_lora

DEFAULT_OUTPUT_DIR = os.path.join("demo_output", "multi_task_serving")
TASKS = {"rotated": _common.rotated, "mirrored": _common.mirrored}

_SERVE = """
import sys
import numpy as np
import tensorflow as tf
served = tf.saved_model.load(sys.argv[1])
x, index = np.load(sys.argv[2]), np.load(sys.argv[3])
outputs = served.serve([tf.constant(x), tf.constant(index)])
np.save(sys.argv[4], np.asarray(outputs))
print("keras_lora imported:", "yes" if "keras_lora" in sys.modules else "no")
"""


@_common.one_torch_thread
def main(quick=False, output_dir=DEFAULT_OUTPUT_DIR):
    """Trains two adapters on one model, exports one SavedModel serving both.

    Args:
        quick: a fast run for the test suite (fewer epochs).
        output_dir: where the files go; created if missing, overwritten.

    Returns:
        A dict with per-task accuracies (Keras and served), the largest
        difference between served and Keras outputs, and the report line
        of the serving process.
    """
    epochs = 4 if quick else 10
    os.makedirs(output_dir, exist_ok=True)
    base_path = os.path.join(output_dir, "base_digits.keras")
    data = _common.pretrain_and_task_split()
    x_task, y_task = data["task"]
    x_test, y_test = data["test"]
    print(f"Backend: {keras.backend.backend()}. Pretraining the base ...")
    base = _common.pretrain_base(base_path, *data["pretrain"], epochs=epochs)

    model = keras_lora.apply_lora(base, rank=8, adapter_name="rotated")
    keras_lora.add_adapter(model, "mirrored", rank=8)
    names = list(TASKS)
    for name in names:
        keras_lora.set_adapter(model, name)  # only this adapter trains
        print(f"Training adapter '{name}' ...")
        _common.fit_classifier(model, TASKS[name](x_task), y_task, epochs,
                               learning_rate=1e-2)

    # Keras reference: each task with its adapter active.
    expected, accuracy = {}, {}
    for name, transform in TASKS.items():
        keras_lora.set_adapter(model, name)
        expected[name] = _common.predict(model, transform(x_test))
        accuracy[name] = float(np.mean(np.argmax(expected[name], -1) == y_test))

    served_dir = os.path.join(output_dir, "served")
    keras_lora.export_multi_adapter(model, served_dir, names, overwrite=True)

    # One mixed request: every test digit under both tasks, interleaved.
    x_mixed = np.concatenate([TASKS[n](x_test) for n in names]).astype("float32")
    index = np.repeat(np.arange(len(names), dtype="int32"), len(x_test))
    order = np.random.default_rng(0).permutation(len(index))
    served, report = _serve(served_dir, x_mixed[order], index[order], output_dir)
    restored = np.empty_like(served)
    restored[order] = served
    served_accuracy, difference = {}, 0.0
    for i, name in enumerate(names):
        part = restored[i * len(x_test):(i + 1) * len(x_test)]
        difference = max(difference, float(np.max(np.abs(part - expected[name]))))
        served_accuracy[name] = float(np.mean(np.argmax(part, -1) == y_test))

    print(f"\nHeld-out accuracy ({len(y_test)} digits per task):")
    for name in names:
        print(f"  {name:9s} Keras {accuracy[name]:.1%}   served {served_accuracy[name]:.1%}")
    print(f"One SavedModel ({_common.human_size(_common.size_of(served_dir))}) "
          f"served a mixed batch of {len(index)}; largest |served - Keras| = "
          f"{difference:.1e}. {report}")
    return {
        "accuracy": accuracy,
        "served_accuracy": served_accuracy,
        "max_difference": difference,
        "report": report,
    }


def _serve(saved_model_dir, x, index, work_dir):
    paths = [os.path.abspath(os.path.join(work_dir, f"{n}.npy")) for n in ("x", "index", "out")]
    np.save(paths[0], x)
    np.save(paths[1], index)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("KERAS_BACKEND", None)
    result = subprocess.run(
        [sys.executable, "-c", _SERVE, os.path.abspath(saved_model_dir), *paths],
        capture_output=True, text=True, env=env, cwd=work_dir,
    )
    if result.returncode != 0:
        raise RuntimeError("Serving failed:\n" + textwrap.indent(result.stderr[-3000:], "  "))
    outputs = np.load(paths[2])
    for path in paths:
        os.remove(path)
    return outputs, result.stdout.strip().splitlines()[-1]


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:])
