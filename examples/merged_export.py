"""From a base model and an adapter file to artifacts that serve without keras-lora.

Serving pays nothing for LoRA: the update `scaling * A @ B` is folded into
each kernel once, and what is left is the base architecture with new
weights. This script takes a base model and an adapter (it first makes
them, as the quickstart does: a classifier of upright digits and an adapter
for rotated ones) and produces:

1. `merged.keras` with `keras_lora.merge_lora(model)`: plain `Dense` layers,
   loaded by a new Python process with plain Keras (`safe_mode=True`,
   keras-lora never imported);
2. a TensorFlow SavedModel with `keras_lora.export_merged(model, path)`,
   from any backend, loaded by a new process with only
   `tf.saved_model.load` (what TF Serving and friends consume);

and checks that both give the LoRA model's outputs. Finally it merges in
place (`merge_lora(model, in_place=True)`), the route for a model too big to
hold twice.

    python examples/merged_export.py
"""

import os
import sys

import _common
import keras
import numpy as np

import keras_lora

DEFAULT_OUTPUT_DIR = os.path.join("demo_output", "merged_export")


@_common.one_torch_thread
def main(quick=False, output_dir=DEFAULT_OUTPUT_DIR, base_path=None, adapter_path=None):
    """Merges an adapter, exports for serving and checks every artifact.

    Args:
        quick: a fast run for the test suite (fewer epochs).
        output_dir: where the files go; created if missing, overwritten.
        base_path: a base `.keras` file from the quickstart; made (with
            `adapter_path`) when not given.
        adapter_path: an adapter for `base_path`.

    Returns:
        A dict with the largest output difference of each artifact against
        the LoRA model, the layer classes of the merged model, and whether a
        fresh process imported keras-lora.
    """
    os.makedirs(output_dir, exist_ok=True)
    if base_path is None:
        print(f"Backend: {keras.backend.backend()}. Making a base model and an "
              "adapter (upright -> rotated digits, as in the quickstart) ...")
        base_path, adapter_path = _common.train_rotated_adapter(
            output_dir, epochs=5 if quick else 10
        )
    x, y = _common.pretrain_and_task_split()["test"]
    x = _common.rotated(x)
    merged_path = os.path.join(output_dir, "merged.keras")
    saved_model_path = os.path.join(output_dir, "saved_model")
    work_dir = os.path.abspath(output_dir)
    results = {}

    model = keras_lora.load_adapter(keras.saving.load_model(base_path), adapter_path)
    expected = _common.predict(model, x)
    print(f"\nLoRA model: {model.count_params():,} parameters, "
          f"accuracy {_accuracy(expected, y):.1%} on held-out rotated digits")

    merged = keras_lora.merge_lora(model)
    merged.save(merged_path)
    results["merged_classes"] = sorted({type(l).__name__ for l in merged.layers})
    outputs, imported = _common.load_with_plain_keras(merged_path, x, work_dir)
    results["merged_diff"] = _max_diff(outputs, expected)
    results["merged_imports"] = imported
    print(f"\n1. merge_lora(model).save('{merged_path}')")
    print(f"   {merged.count_params():,} parameters, the base's own layer classes: "
          f"{', '.join(results['merged_classes'])}")
    print("   new process, plain Keras: keras.saving.load_model(path, "
          f"safe_mode=True) -> max |difference| {results['merged_diff']:.1e} "
          f"({imported})")

    keras_lora.export_merged(model, saved_model_path)
    outputs, imported = _common.serve_with_plain_tensorflow(saved_model_path, x, work_dir)
    results["served_diff"] = _max_diff(outputs, expected)
    results["served_imports"] = imported
    print(f"\n2. export_merged(model, '{saved_model_path}')  "
          f"[{_common.human_size(_common.size_of(saved_model_path))}]")
    print("   new process, only TensorFlow: tf.saved_model.load(path).serve(x) "
          f"-> max |difference| {results['served_diff']:.1e}, accuracy "
          f"{_accuracy(outputs, y):.1%} ({imported})")

    same_object = keras_lora.merge_lora(model, in_place=True)
    results["in_place_diff"] = _max_diff(_common.predict(same_object, x), expected)
    results["in_place_lora_layers"] = len(keras_lora.lora_layers(same_object))
    print(f"\n3. merge_lora(model, in_place=True): same object "
          f"({same_object is model}), {results['in_place_lora_layers']} LoRA "
          f"layers left, no weight copied -> max |difference| "
          f"{results['in_place_diff']:.1e}")
    print("\nServe it:\n"
          "    import tensorflow as tf\n"
          f"    served = tf.saved_model.load('{saved_model_path}')\n"
          "    logits = served.serve(pixels)   # float32 (batch, 64) -> (batch, 10)")
    return results


def _accuracy(logits, y):
    return float(np.mean(np.argmax(logits, axis=-1) == y))


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:])
