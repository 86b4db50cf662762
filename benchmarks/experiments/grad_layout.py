"""The two layouts of dA: tall `xᵀ·g` (d_in, r) against wide `gᵀ·x` (r, d_in).

Autodiff of `x·A` produces `dA` in `A`'s layout. With `A` stored
`(d_in, r)` that is the tall product; stored `(r, d_in)` (keras-lora since
FINDINGS section 1, and PEFT) it is the wide one. XLA rewrites every
spelling of the tall product (`x @ A`, `x @ (A.T).T`, `dot_general`,
`einsum`) into the same dot, so only the stored layout decides.

Usage: OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/experiments/grad_layout.py
"""

import statistics
import time

import numpy as np

N, D, R, REPEATS = 1024, 1024, 8, 30


def main():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, D), "float32")
    g = rng.standard_normal((N, R), "float32")
    forms = {}

    import jax
    import jax.numpy as jnp

    jx, jg = jnp.asarray(x), jnp.asarray(g)
    tall = jax.jit(lambda a, b: a.T @ b)
    wide = jax.jit(lambda a, b: b.T @ a)
    forms["jax jit, tall"] = lambda: tall(jx, jg).block_until_ready()
    forms["jax jit, wide"] = lambda: wide(jx, jg).block_until_ready()

    import tensorflow as tf

    tx, tg = tf.constant(x), tf.constant(g)
    forms["tf, tall"] = lambda: tf.matmul(tx, tg, transpose_a=True).numpy()
    forms["tf, wide"] = lambda: tf.matmul(tg, tx, transpose_a=True).numpy()

    import torch

    torch.set_num_threads(1)
    px, pg = torch.from_numpy(x), torch.from_numpy(g)
    forms["torch, tall"] = lambda: px.t() @ pg
    forms["torch, wide"] = lambda: pg.t() @ px

    for form in forms.values():
        form()
    times = {name: [] for name in forms}
    for _ in range(REPEATS):
        for name, form in forms.items():
            start = time.perf_counter()
            form()
            times[name].append(time.perf_counter() - start)
    for name, samples in times.items():
        print(f"{name:15s} {statistics.median(samples) * 1e3:7.3f} ms")


if __name__ == "__main__":
    main()
