"""keras-lora quickstart (`make demo`): adapt a pretrained model to new data.

1. Pretrains a small classifier on upright handwritten digits
   (scikit-learn's bundled `load_digits`, no download). It stands in for
   "your pretrained model".
2. The new task: the same ten digits, scanned rotated by 90 degrees, which
   the base model gets mostly wrong. `keras_lora.apply_lora(model, rank=8)`
   gives every `Dense` layer a rank-8 adapter and freezes every original
   weight.
3. Trains with `model.fit` and compares held-out accuracy with two
   baselines: training only the output layer (frozen backbone) and a full
   fine-tune.
4. Saves the adapter (kilobytes) next to the full model file; reloads it onto
   a fresh copy of the base and checks it reproduces the trained model.
5. Merges the adapter into the weights, exports a TensorFlow SavedModel,
   reloads it with plain TensorFlow in another process and checks the
   outputs match.

Runs on every Keras backend (`KERAS_BACKEND=jax|tensorflow|torch`), in about
a minute on a 2-core CPU. Files go to `./demo_output/quickstart/`,
overwritten on every run.

    python examples/quickstart.py
"""

import os
import sys
import time

import _common
import keras
import numpy as np

import keras_lora

DEFAULT_OUTPUT_DIR = os.path.join("demo_output", "quickstart")
# Adapters and a lone head train well with a larger step than a full model.
LEARNING_RATE = {"lora": 1e-2, "head_only": 1e-2, "full": 3e-3}

USER_CODE = """\
import keras, keras_lora

model = keras.saving.load_model("base_digits.keras")           # your pretrained model
keras_lora.apply_lora(model, rank=8)                            # adapters on every Dense layer
model.compile(keras.optimizers.Adam(1e-2),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.fit(x_rotated, y, epochs=10)                              # trains only the adapters
keras_lora.save_adapter(model, "rotated_digits.safetensors")    # the new task, in kilobytes

base = keras.saving.load_model("base_digits.keras")             # later, anywhere, any backend
model = keras_lora.load_adapter(base, "rotated_digits.safetensors")
keras_lora.export_merged(model, "rotated_digits_savedmodel")    # plain SavedModel to serve"""


@_common.one_torch_thread
def main(quick=False, output_dir=DEFAULT_OUTPUT_DIR):
    """Runs the demo, prints its report and returns its numbers.

    Args:
        quick: a fast run for the test suite (5 epochs instead of 10).
        output_dir: where the files go; created if missing, overwritten.

    Returns:
        A dict of accuracies, parameter counts, file sizes and the largest
        output differences of the reloaded, merged and served models.
    """
    clock = _Clock()
    epochs = 5 if quick else 10
    os.makedirs(output_dir, exist_ok=True)
    paths = {
        "base": os.path.join(output_dir, "base_digits.keras"),
        "adapter": os.path.join(output_dir, "rotated_digits.safetensors"),
        "full": os.path.join(output_dir, "full_finetune_rotated_digits.keras"),
        "merged": os.path.join(output_dir, "merged_rotated_digits.keras"),
        "saved_model": os.path.join(output_dir, "rotated_digits_savedmodel"),
    }
    results = {}

    clock.title(
        f"keras-lora quickstart: Keras {keras.__version__}, backend "
        f"'{keras.backend.backend()}'" + (" (quick mode)" if quick else "")
    )
    data = _common.pretrain_and_task_split()
    x_pre, y_pre = data["pretrain"]
    x_task, y_task = data["task"]
    x_test, y_test = data["test"]
    x_task, x_test_rotated = _common.rotated(x_task), _common.rotated(x_test)
    print(
        "Data:  scikit-learn's load_digits: 8x8 images of handwritten digits "
        "0-9 (bundled, no download)\n"
        f"       pretraining: {len(x_pre)} upright digits\n"
        f"       new task:    {len(x_task)} other digits, rotated by 90 "
        "degrees (same ten labels)\n"
        f"       held out:    {len(x_test)} digits neither phase trains on\n"
        "Model: MLP, 64 pixels -> Dense 256 -> Dense 256 -> Dense 128 -> "
        "Dense 10 (logits)"
    )

    clock.title("1. Pretrain the base model on upright digits "
                "(it stands in for your pretrained model)")
    base = _common.pretrain_base(paths["base"], x_pre, y_pre, epochs=epochs)
    print(f"base model: {base.count_params():,} parameters; held-out accuracy: "
          f"{_common.accuracy(base, x_test, y_test):.1%} on upright digits, "
          f"{_common.accuracy(base, x_test_rotated, y_test):.1%} on rotated ones")

    clock.title("2. apply_lora(model, rank=8)")
    model = keras.saving.load_model(paths["base"])
    results["before"] = _common.accuracy(model, x_test_rotated, y_test)
    keras_lora.apply_lora(model, rank=8)
    for path, layer in keras_lora.lora_layers(model).items():
        print(f"  {path:9s} {type(layer).__name__}, rank {layer.rank}: "
              f"lora_a {tuple(layer.lora_a.shape)}, "
              f"lora_b {tuple(layer.lora_b.shape)}")
    keras_lora.print_trainable_parameters(model)
    results["lora_trainable"] = _common.count_params(model.trainable_weights)

    clock.title("3. model.fit on rotated digits (only the adapters train)")
    _common.fit_classifier(model, x_task, y_task, epochs, LEARNING_RATE["lora"],
                           verbose=2 if quick else 1)
    results["lora"] = _common.accuracy(model, x_test_rotated, y_test)

    clock.title("4. Held-out accuracy on rotated digits, with two baselines")
    baselines = {}
    for kind in ("head_only", "full"):
        baselines[kind] = _baseline(paths["base"], kind, x_task, y_task, epochs)
        results[f"{kind}_trainable"] = _common.count_params(
            baselines[kind].trainable_weights)
        results[kind] = _common.accuracy(baselines[kind], x_test_rotated, y_test)
    _common.save_weights_and_architecture(baselines["full"], paths["full"])
    print(f"  {'':36s}{'trainable params':>17s}{'learning rate':>15s}{'accuracy':>10s}")
    for label, key in (
        ("pretrained model, before training", "before"),
        ("output layer only (frozen backbone)", "head_only"),
        ("LoRA rank 8 (apply_lora)", "lora"),
        ("full fine-tune", "full"),
    ):
        trainable = f"{results[key + '_trainable']:,}" if key != "before" else "-"
        rate = f"{LEARNING_RATE[key]:g}" if key != "before" else "-"
        print(f"  {label:36s}{trainable:>17s}{rate:>15s}{results[key]:>10.1%}")

    clock.title("5. save_adapter: the task without the base")
    keras_lora.save_adapter(model, paths["adapter"])
    results["adapter_bytes"] = _common.size_of(paths["adapter"])
    results["full_bytes"] = _common.size_of(paths["full"])
    print(f"  {_common.human_size(results['adapter_bytes']):>9s}  adapter "
          f"(safetensors)           {paths['adapter']}")
    print(f"  {_common.human_size(results['full_bytes']):>9s}  full fine-tuned "
          f"model (.keras)   {paths['full']}")
    print(f"  The adapter is {results['full_bytes'] / results['adapter_bytes']:.0f}x "
          "smaller, and one base serves every task's adapter. The ratio grows\n"
          "  with layer width: a d x d kernel against 2 x d x rank adapter "
          "numbers (256x for d=4096, rank 8).")
    reloaded = keras_lora.load_adapter(
        keras.saving.load_model(paths["base"]), paths["adapter"]
    )
    results["reload_diff"] = _max_diff(model, reloaded, x_test_rotated)
    print("  load_adapter(fresh base, file) reproduces the trained model: "
          f"max |difference| {results['reload_diff']:.1e}")

    clock.title("6. merge_lora and export_merged for serving")
    merged = keras_lora.merge_lora(model)
    merged.save(paths["merged"])
    results["merged_diff"] = _max_diff(model, merged, x_test_rotated)
    classes = sorted({type(layer).__name__ for layer in merged.layers})
    print(f"  merge_lora(model): plain Keras layers ({', '.join(classes)}), "
          f"{merged.count_params():,} parameters, max |difference| "
          f"{results['merged_diff']:.1e}")
    keras_lora.export_merged(model, paths["saved_model"])
    served, import_report = _common.serve_with_plain_tensorflow(
        paths["saved_model"], x_test_rotated, os.path.abspath(output_dir)
    )
    expected = _common.predict(model, x_test_rotated)
    results["served_diff"] = float(np.max(np.abs(served - expected)))
    results["served_accuracy"] = float(np.mean(np.argmax(served, -1) == y_test))
    verdict = "outputs match" if results["served_diff"] < 1e-4 else "OUTPUTS DIFFER"
    print(f"  export_merged(model, '{paths['saved_model']}')")
    print("  reloaded in a new process with only TensorFlow: "
          "tf.saved_model.load(path).serve(x)")
    print(f"  -> {verdict}: max |difference| {results['served_diff']:.1e}, "
          f"accuracy {results['served_accuracy']:.1%} ({import_report})")

    clock.title(f"Files in {output_dir}{os.sep}")
    for key in ("base", "adapter", "full", "merged", "saved_model"):
        size = _common.human_size(_common.size_of(paths[key]))
        print(f"  {size:>9s}  {os.path.basename(paths[key])}")
    clock.title("The code you would write")
    print(USER_CODE)
    print(f"\nDone in {clock.elapsed():.0f} s. Next: docs/getting_started.md")
    return results


def _baseline(base_path, kind, x, y, epochs):
    """A fresh copy of the base, trained without LoRA."""
    model = keras.saving.load_model(base_path)
    if kind == "head_only":
        for layer in model.layers:
            layer.trainable = layer.name == "head"
    return _common.fit_classifier(model, x, y, epochs, LEARNING_RATE[kind])


def _max_diff(model_a, model_b, x):
    return float(np.max(np.abs(_common.predict(model_a, x) - _common.predict(model_b, x))))


class _Clock:
    """Seconds since the start, printed with each section title."""

    def __init__(self):
        self.started = time.time()

    def elapsed(self):
        return time.time() - self.started

    def title(self, text):
        print(f"\n== {text}  [{self.elapsed():.0f} s]", flush=True)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:])
