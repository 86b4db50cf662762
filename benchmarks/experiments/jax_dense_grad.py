"""Where does a LoRA Dense step go on jax? Pure-JAX micro-benchmark.

One Dense layer's forward + backward (gradient w.r.t. the input and the
trainable weights), jitted, interleaved; 2-D vs 3-D inputs and several
ways of writing the low-rank path.
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

B, T, D_IN, D_OUT, R = 8, 128, 512, 2048, 8
rng = np.random.default_rng(0)
x3 = jnp.asarray(rng.standard_normal((B, T, D_IN), dtype="float32"))
x2 = x3.reshape(B * T, D_IN)
w = jnp.asarray(rng.standard_normal((D_IN, D_OUT), dtype="float32") * 0.02)
bias = jnp.zeros((D_OUT,))
a = jnp.asarray(rng.standard_normal((D_IN, R), dtype="float32") * 0.02)
b = jnp.asarray(rng.standard_normal((R, D_OUT), dtype="float32") * 0.02)
g3 = jnp.asarray(rng.standard_normal((B, T, D_OUT), dtype="float32"))
g2 = g3.reshape(B * T, D_OUT)


def full(x, w, g):
    return jnp.sum((jnp.matmul(x, w) + bias) * g)


def frozen(x, g):
    return jnp.sum((jnp.matmul(x, w) + bias) * g)


def lora(x, a, b, g):
    y = jnp.matmul(x, w) + bias
    y = y + jnp.matmul(jnp.matmul(x, a) * 1.0, b)
    return jnp.sum(y * g)


def lora_flat(x, a, b, g):
    # The low-rank path on a 2-D view of the input.
    y = jnp.matmul(x, w) + bias
    x2d = x.reshape(-1, x.shape[-1])
    low = jnp.matmul(jnp.matmul(x2d, a), b).reshape(y.shape)
    return jnp.sum((y + low) * g)


def lora_einsum(x, a, b, g):
    y = jnp.einsum("btc,cd->btd", x, w) + bias
    low = jnp.einsum("btz,zd->btd", jnp.einsum("btc,cz->btz", x, a), b)
    return jnp.sum((y + low) * g)


fns = {}
for tag, x, g in (("2d", x2, g2), ("3d", x3, g3)):
    fns[f"full_{tag}"] = (jax.jit(jax.grad(full, argnums=(0, 1))), (x, w, g))
    fns[f"frozen_{tag}"] = (jax.jit(jax.grad(frozen, argnums=0)), (x, g))
    fns[f"lora_{tag}"] = (jax.jit(jax.grad(lora, argnums=(0, 1, 2))), (x, a, b, g))
    if tag == "3d":
        fns["lora_flat_3d"] = (
            jax.jit(jax.grad(lora_flat, argnums=(0, 1, 2))), (x, a, b, g))
        fns["lora_einsum_3d"] = (
            jax.jit(jax.grad(lora_einsum, argnums=(0, 1, 2))), (x, a, b, g))

for name, (fn, args) in fns.items():
    jax.block_until_ready(fn(*args))
times = {n: [] for n in fns}
for _ in range(30):
    for name, (fn, args) in fns.items():
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times[name].append(time.perf_counter() - t)
for tag in ("2d", "3d"):
    ref = times[f"full_{tag}"]
    for name in times:
        if name.endswith(tag):
            ratio = statistics.median(x / y for x, y in zip(times[name], ref))
            print(f"{name:16s} {1000*statistics.median(times[name]):7.2f} ms  "
                  f"/full_{tag} = {ratio:.2f}")
