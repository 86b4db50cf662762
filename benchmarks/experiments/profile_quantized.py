"""Where the int8-base LoRA step's time goes: ms per op group, int8 vs float.

    KERAS_BACKEND=torch|tensorflow taskset -c 1 env OMP_NUM_THREADS=1 \\
      TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 PYTHONPATH=. \\
      python benchmarks/experiments/profile_quantized.py

Times, at the full MLP's layer shape (batch 1024, 1024 -> 1024; the harness's
`benchmarks/quantized.py` MLP has 4 such layers), each op group of one base
layer's forward + input-gradient, as the float-base and the int8-base LoRA
step run them (TensorFlow: inside `tf.function`, as `jit_compile=False`
runs a step; torch: eager):

- float: forward matmul; backward input-gradient matmul;
- int8: input abs-max quantization (Keras's `AbsMaxQuantizer`); the int8 x
  int8 contraction, Keras's `ops.matmul` (the path before the fix) and
  keras-lora's exact one (`quantized_kernels.int8_matmul`); de-scaling;
  the backward's kernel dequantization (`cast(q) / scale`, Keras's custom
  gradient) and its input-gradient matmul.

Medians of interleaved repeats, ms. Prints JSON.

    ... profile_quantized.py --steps [--jit]

instead times whole `train_on_batch` steps of `benchmarks/quantized.py`'s
full MLP and BERT, float-base LoRA vs int8-base LoRA with Keras's own int8
contraction (`quantized_kernels.ENABLED = False`, "before") and with
keras-lora's ("after"), interleaved, and prints the paired ratios.
"""

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))

BATCH, K, N = 1024, 1024, 1024
REPEATS = 7


def main():
    import keras
    import numpy as np
    from keras import ops

    from benchmarks import threads
    from keras_lora.layers import quantized_kernels

    threads.limit_from_environment()
    backend = keras.backend.backend()
    rng = np.random.default_rng(0)
    x = ops.convert_to_tensor(rng.normal(size=(BATCH, K)).astype("float32"))
    up = ops.convert_to_tensor(rng.normal(size=(BATCH, N)).astype("float32"))
    w = ops.convert_to_tensor(rng.normal(size=(K, N)).astype("float32"))
    layer = keras.layers.Dense(N)
    layer.build((None, K))
    layer.quantize("int8")
    kernel = ops.convert_to_tensor(layer._kernel)
    scale = ops.convert_to_tensor(layer.kernel_scale)
    q, s = layer.inputs_quantizer(x, axis=-1)

    def fast_matmul(a, b):
        quantized_kernels.ENABLED = True
        return quantized_kernels.int8_matmul(a, b, "float32")

    ops_ = {
        "float: forward matmul": lambda: ops.matmul(x, w),
        "float: backward input-gradient matmul": lambda: ops.matmul(up, ops.transpose(w)),
        "int8: input abs-max quantization": lambda: layer.inputs_quantizer(x, axis=-1)[0],
        "int8: int8 x int8 matmul, Keras's ops.matmul (before)": lambda: ops.cast(ops.matmul(q, kernel), "float32"),
        "int8: int8 x int8 matmul, keras-lora exact (after)": lambda: fast_matmul(q, kernel),
        "int8: de-scale outputs": lambda: ops.divide(up, ops.multiply(scale, s)),
        "int8: backward kernel dequantization cast(q)/scale": lambda: ops.divide(ops.cast(kernel, "float32"), scale),
        "int8: backward input-gradient matmul": lambda: ops.matmul(up, ops.transpose(ops.divide(ops.cast(kernel, "float32"), scale))),
    }
    if backend == "tensorflow":
        import tensorflow as tf

        ops_ = {k: tf.function(f, autograph=False) for k, f in ops_.items()}

    def run(f):
        out = f()
        ops.convert_to_numpy(ops.sum(ops.cast(out, "float32")))

    for f in ops_.values():
        run(f)
    times = {k: [] for k in ops_}
    for _ in range(REPEATS):
        for k, f in ops_.items():
            start = time.perf_counter()
            run(f)
            times[k].append((time.perf_counter() - start) * 1000)
    result = {
        "backend": backend,
        "shape": f"({BATCH}, {K}) x ({K}, {N})",
        "median_ms": {k: round(statistics.median(v), 2) for k, v in times.items()},
    }
    print(json.dumps(result, indent=2))


def steps(jit):
    from benchmarks import quantized as bench
    from benchmarks import sizes as sizes_module
    from benchmarks import threads
    from benchmarks import timing
    from benchmarks import training
    from benchmarks import workloads
    from keras_lora.layers import quantized_kernels

    threads.limit_from_environment()
    sizes = sizes_module.sizes_for(False)
    out = {}
    for workload in (workloads.MLP, workloads.TRANSFORMER):
        x, y = training.batch_for(workload, sizes)

        def make(base, fast):
            model = training.compiled(bench.build(workload, sizes, base), jit)
            step = training.train_step_fn(model, x, y)

            def run():
                quantized_kernels.ENABLED = fast
                return step()

            return run

        fns = {"float32": make("float32", True),
               "int8_before": make("int8", False),
               "int8_after": make("int8", True)}
        t = timing.interleave(fns, sizes.warmup + 1, sizes.repeats)
        out[workload] = {
            "median_ms": {k: timing.median_ms(v) for k, v in t.items()},
            "before int8/float32": timing.paired_ratio(t["int8_before"], t["float32"]),
            "after int8/float32": timing.paired_ratio(t["int8_after"], t["float32"]),
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    if "--steps" in sys.argv:
        steps("--jit" in sys.argv)
    else:
        main()
