"""Which way of writing a LoRA Dense is fast under XLA (jax, CPU)?

A BERT feed-forward block (Dense d->4d with GELU, Dense 4d->d), both
adapted, forward + backward (input gradient and trainable weights), jitted,
interleaved. Formulations:

  full        every kernel trainable (the reference, 1.00)
  frozen      no adapters, input gradient only (the floor)
  factored    y = xW + s(xA)B, plain autodiff (keras-lora today)
  dx_merged   forward factored; custom VJP whose input gradient is
              g (W + sAB)^T: one GEMM, no rank-r rebuild of an N x d tensor
  fwd_merged  forward x(W + sAB) with the same custom VJP (A, B gradients
              from the factored formulas, never x^T g)
  keras_style forward x(W + sAB), plain autodiff (Keras enable_lora)
"""

import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

N = int(os.environ.get("TOKENS", 1024))
D, H, R, S = 512, 2048, 8, 1.0
rng = np.random.default_rng(0)


def arr(*shape, scale=0.02):
    return jnp.asarray(rng.standard_normal(shape, dtype="float32") * scale)


x = arr(N, D, scale=1.0)
g_out = arr(N, D, scale=1.0)
w1, b1, w2, b2 = arr(D, H), jnp.zeros(H), arr(H, D), jnp.zeros(D)
a1, bb1, a2, bb2 = arr(D, R), arr(R, H), arr(H, R), arr(R, D)


def factored(x, w, a, b):
    return x @ w + ((x @ a) * S) @ b


@jax.custom_vjp
def dx_merged(x, w, a, b):
    return factored(x, w, a, b)


def _dx_merged_fwd(x, w, a, b):
    low = (x @ a) * S
    return x @ w + low @ b, (x, w, a, b, low)


def _dx_merged_bwd(res, g):
    x, w, a, b, low = res
    w_eff = w + S * (a @ b)
    g_low = (g @ b.T) * S
    return g @ w_eff.T, jnp.zeros_like(w), x.T @ g_low, low.T @ g


dx_merged.defvjp(_dx_merged_fwd, _dx_merged_bwd)


@jax.custom_vjp
def fwd_merged(x, w, a, b):
    return x @ (w + S * (a @ b))


def _fwd_merged_fwd(x, w, a, b):
    w_eff = w + S * (a @ b)
    return x @ w_eff, (x, w_eff, a, b)


def _fwd_merged_bwd(res, g):
    x, w_eff, a, b = res
    g_low = (g @ b.T) * S
    low = (x @ a) * S
    return g @ w_eff.T, jnp.zeros_like(w_eff), x.T @ g_low, low.T @ g


fwd_merged.defvjp(_fwd_merged_fwd, _fwd_merged_bwd)


def keras_style(x, w, a, b):
    return x @ (w + S * (a @ b))


# Frozen weights are passed as arguments (never closed over): closed-over
# arrays become XLA constants and get constant-folded.
frozen_args = (w1, b1, w2, b2, g_out)


def block(linear, x, p, f):
    w1, b1, w2, b2, _ = f
    h = jax.nn.gelu(linear(x, w1, p[0], p[1]) + b1)
    return linear(h, w2, p[2], p[3]) + b2


def loss_lora(linear, x, p, f):
    return jnp.sum(block(linear, x, p, f) * f[4])


def loss_full(x, ws, f):
    h = jax.nn.gelu(x @ ws[0] + f[1])
    return jnp.sum((h @ ws[1] + f[3]) * f[4])


def loss_frozen(x, f):
    return loss_full(x, (f[0], f[2]), f)


params = (a1, bb1, a2, bb2)
fns = {
    "full": (jax.jit(jax.grad(loss_full, argnums=(0, 1))),
             (x, (w1, w2), frozen_args)),
    "frozen": (jax.jit(jax.grad(loss_frozen)), (x, frozen_args)),
}
for name, linear in (
    ("factored", factored),
    ("dx_merged", dx_merged),
    ("fwd_merged", fwd_merged),
    ("keras_style", keras_style),
):
    fns[name] = (
        jax.jit(jax.grad(functools.partial(loss_lora, linear), argnums=(0, 1))),
        (x, params, frozen_args),
    )

reference = jax.grad(functools.partial(loss_lora, factored), argnums=(0, 1))(
    x, params, frozen_args)
for name in ("dx_merged", "fwd_merged"):
    got = fns[name][0](*fns[name][1])
    err = max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(
        jax.tree.leaves(got), jax.tree.leaves(reference)))
    print(f"{name}: max |grad - factored grad| = {err:.2e}")

for fn, args in fns.values():
    jax.block_until_ready(fn(*args))
times = {n: [] for n in fns}
for i in range(int(os.environ.get("REPEATS", 20))):
    for name, (fn, args) in fns.items():
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times[name].append(time.perf_counter() - t)
for name, t in times.items():
    ratio = statistics.median(u / v for u, v in zip(t, times["full"]))
    print(f"{name:12s} {1000 * statistics.median(t):7.1f} ms  /full = {ratio:.2f}")
