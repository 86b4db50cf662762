"""Training steps of embedding and convolution LoRA: keras-lora vs the rest.

Two workloads, each in three variants trained on the same batch:

* `embedding`: a `vocab × dim` token table (32k × 512 by default) feeding a
  pooled classifier; the table is the target.
* `cnn`: a small CNN (two `Conv2D` layers, a pooled `Dense` head); the
  convolutions are the targets.

Variants: `full` (every weight trainable), `keras_lora` (`apply_lora` on
the targets) and `keras_enable_lora` (Keras's built-in `enable_lora`, which
forms the full `W + A·B` table or kernel every step). In both LoRA variants
only the adapters train. The script prints median step times, paired
ratios and the trainable / optimizer-state bytes, and can write JSON.

Memory of the step itself: each (workload, variant) also trains a few steps
in a fresh process of its own (peak RSS only grows, so variants cannot
share one), which reports its RSS after building, after training and its
peak (VmHWM), and on a GPU the backend's peak device bytes. Full sizes
measure it by default (`--no-memory` skips it); `--quick` only with
`--memory`.

    python -m benchmarks.embedding_conv            # full sizes
    python -m benchmarks.embedding_conv --quick    # tiny smoke run

Timing belongs on a quiet machine; the suite runs `--quick` only to check
the script works.
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys

import keras
import numpy as np

from benchmarks import timing
from benchmarks.memory import status_mib
from benchmarks.names import FULL
from benchmarks.names import KERAS_ENABLE_LORA
from benchmarks.names import KERAS_LORA
from benchmarks.training import memory_counts

VARIANTS = (FULL, KERAS_LORA, KERAS_ENABLE_LORA)
RATIOS = ((KERAS_LORA, FULL), (KERAS_ENABLE_LORA, FULL),
          (KERAS_LORA, KERAS_ENABLE_LORA))
_ADAPTER_NAMES = {
    KERAS_LORA: ("lora_a", "lora_b"),
    KERAS_ENABLE_LORA: ("lora_kernel_a", "lora_kernel_b",
                        "lora_embeddings_a", "lora_embeddings_b"),
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    vocab: int = 32000
    dim: int = 512
    tokens_batch: int = 32
    sequence: int = 128
    image: int = 32
    channels: int = 16
    filters: tuple = (32, 64)
    images_batch: int = 32
    rank: int = 8
    warmup: int = 3
    repeats: int = 20
    # Training steps of each fresh memory process.
    memory_steps: int = 5


QUICK = Sizes(vocab=64, dim=16, tokens_batch=4, sequence=8, image=8,
              channels=3, filters=(4, 8), images_batch=2, rank=2, warmup=1,
              repeats=2, memory_steps=2)


def embedding_model(sizes):
    ids = keras.Input((sizes.sequence,), dtype="int32")
    x = keras.layers.Embedding(sizes.vocab, sizes.dim, name="token_embedding")(ids)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(ids, keras.layers.Dense(8, name="head")(x))


def cnn_model(sizes):
    images = keras.Input((sizes.image, sizes.image, sizes.channels))
    x = images
    for index, filters in enumerate(sizes.filters):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu",
                                name=f"conv_{index}")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(images, keras.layers.Dense(10, name="head")(x))


def batch(workload, sizes):
    rng = np.random.default_rng(0)
    if workload == "embedding":
        x = rng.integers(0, sizes.vocab, (sizes.tokens_batch, sizes.sequence))
        return x.astype("int32"), np.ones((sizes.tokens_batch, 8), "float32")
    shape = (sizes.images_batch, sizes.image, sizes.image, sizes.channels)
    x = rng.normal(size=shape).astype("float32")
    return x, np.ones((sizes.images_batch, 10), "float32")


WORKLOADS = {
    "embedding": (embedding_model, keras.layers.Embedding),
    "cnn": (cnn_model, keras.layers.Conv2D),
}


def build(workload, variant, sizes):
    """One compiled variant of a workload."""
    make, target_type = WORKLOADS[workload]
    model = make(sizes)
    if variant == KERAS_LORA:
        import keras_lora

        keras_lora.apply_lora(model, rank=sizes.rank, targets=target_type)
    elif variant == KERAS_ENABLE_LORA:
        for layer in model.layers:
            if isinstance(layer, target_type):
                layer.enable_lora(sizes.rank)
    if variant in _ADAPTER_NAMES:
        _train_only(model, _ADAPTER_NAMES[variant])
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="mse")
    return model


def _train_only(model, names):
    """Only the variables named `names` train, in both LoRA variants."""
    for variable in model.weights:
        variable.trainable = variable.path.split("/")[-1] in names


def measure(workload, sizes):
    """Times the three variants of `workload`, interleaved; returns a row."""
    x, y = batch(workload, sizes)
    models = {variant: build(workload, variant, sizes) for variant in VARIANTS}
    steps = {
        name: (lambda model=model: model.train_on_batch(x, y))
        for name, model in models.items()
    }
    times = timing.interleave(steps, sizes.warmup, sizes.repeats)
    return {
        "workload": workload,
        "median_ms": {n: timing.median_ms(t) for n, t in times.items()},
        "ratios": {f"{a}/{b}": timing.paired_ratio(times[a], times[b])
                   for a, b in RATIOS},
        "memory": {n: memory_counts(m) for n, m in models.items()},
    }


# Memory: one fresh process per (workload, variant) -----------------------


def measure_memory_here(workload, variant, sizes):
    """Trains one variant `sizes.memory_steps` steps in this process.

    Returns:
        MiB figures: RSS after building and after training, the training
        growth, the process peak (VmHWM), and the backend's peak device
        bytes as `device_peak_mib` where a GPU is in use (else `None`).
    """
    x, y = batch(workload, sizes)
    model = build(workload, variant, sizes)
    built = status_mib("VmRSS")
    for _ in range(sizes.memory_steps):
        model.train_on_batch(x, y)
    trained = status_mib("VmRSS")
    return {
        "rss_after_build_mib": round(built, 1),
        "rss_after_training_mib": round(trained, 1),
        "training_growth_mib": round(trained - built, 1),
        "peak_rss_mib": round(status_mib("VmHWM"), 1),
        "device_peak_mib": _device_peak_mib(),
    }


def measure_memory(workload, sizes_flag, log=print):
    """`{variant: figures}` of `workload`, each variant in a fresh process."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend())
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    figures = {}
    for variant in VARIANTS:
        command = [sys.executable, "-m", "benchmarks.embedding_conv",
                   "--memory-child", workload, variant] + sizes_flag
        done = subprocess.run(command, capture_output=True, text=True,
                              env=env, cwd=root)
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-3:]
            figures[variant] = {"error": " | ".join(tail)}
        else:
            figures[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        log(f"  memory {workload} {variant}: {figures[variant]}")
    return figures


def _device_peak_mib():
    """The backend's peak device memory in MiB on a GPU, else `None`."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        if device.platform != "gpu":
            return None
        peak = (device.memory_stats() or {}).get("peak_bytes_in_use")
    elif backend == "torch":
        import torch

        if not torch.cuda.is_available():
            return None
        peak = torch.cuda.max_memory_allocated()
    elif backend == "tensorflow":
        import tensorflow as tf

        if not tf.config.list_physical_devices("GPU"):
            return None
        peak = tf.config.experimental.get_memory_info("GPU:0")["peak"]
    else:
        return None
    return None if peak is None else round(peak / 2**20, 1)


def table(rows):
    """The rows as a small text table."""
    lines = [f"backend: {keras.backend.backend()}",
             f"{'workload':10s} {'variant':18s} {'step ms':>9s} "
             f"{'trainable':>10s} {'opt. state MiB':>15s}"]
    for row in rows:
        for variant in VARIANTS:
            memory = row["memory"][variant]
            lines.append(
                f"{row['workload']:10s} {variant:18s} "
                f"{row['median_ms'][variant]:9.2f} "
                f"{memory['trainable_params']:10,d} "
                f"{memory['optimizer_state_bytes'] / 2**20:15.2f}"
            )
        lines.append("  ratios: " + ", ".join(
            f"{k}={v:.2f}" for k, v in row["ratios"].items()))
        for variant, figures in row.get("peak_memory", {}).items():
            lines.append(f"  memory {variant}: " + (
                figures["error"] if "error" in figures else
                f"peak RSS {figures['peak_rss_mib']:.0f} MiB, training "
                f"growth {figures['training_growth_mib']:.0f} MiB, device "
                f"peak {_mib(figures['device_peak_mib'])}"))
    return "\n".join(lines)


def _mib(value):
    return "n/a (no GPU)" if value is None else f"{value:.0f} MiB"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, one timed round each (smoke run)")
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS),
                        default=sorted(WORKLOADS))
    parser.add_argument("--json", help="also write the rows to this file")
    memory = parser.add_mutually_exclusive_group()
    memory.add_argument("--memory", action="store_true", default=None,
                        help="measure peak memory (default in full runs)")
    memory.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--memory-child", nargs=2,
                        metavar=("WORKLOAD", "VARIANT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    if args.memory_child:
        workload, variant = args.memory_child
        print(json.dumps(measure_memory_here(workload, variant, sizes)))
        return [variant]
    rows = [measure(workload, sizes) for workload in args.workloads]
    if args.memory if args.memory is not None else not args.quick:
        for row in rows:
            row["peak_memory"] = measure_memory(
                row["workload"], ["--quick"] if args.quick else [])
    print(table(rows))
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"backend": keras.backend.backend(),
                       "sizes": dataclasses.asdict(sizes), "rows": rows},
                      file, indent=1)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
