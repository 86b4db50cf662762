"""Adapter initialization: `"default"`, `"gaussian"`, PiSSA and OLoRA.

`apply_lora(..., init=...)` and `add_adapter(..., init=...)` follow PEFT's
`init_lora_weights` definitions (`peft/tuners/lora/layer.py`) on the kernel
seen as a `d_in × d_out` matrix `W` (contracted axes × free axes, in kernel
order). Our `lora_a` `(r, d_in)` is PEFT's `lora_A.weight`, our `lora_b`
`(r, d_out)` is PEFT's `lora_B.weight` transposed, and the update is
`s · Aᵀ·B` with `s` the adapter's scaling.

- `"default"`: the layer's initializers (He-uniform `A`, zero `B`).
- `"gaussian"`: `A ~ N(0, (1/r)²)` (PEFT's `std=1/r`), `B = 0`.
- `"pissa"`: with `Wᵀ = V·S·Uᴴ` (PEFT's `(out, in)` weight), the top `r`
  triplets, `S_r / s`: `A = diag(√S_r)·Uᴴ_r`, `B = diag(√S_r)·V_rᵀ`.
- `"pissa_niter_N"`: the same from a randomized SVD (Halko et al., as
  `torch.svd_lowrank(Wᵀ, r, niter=N)`).
- `"olora"`: `Wᵀ = Q·R`: `A = R[:r]`, `B = Q[:, :r]ᵀ` (no `1/s`, as PEFT).

PiSSA and OLoRA then replace the base kernel by the residual `W − s·Aᵀ·B`,
so the adapted model computes what the base did. The initial factors
`(A₀, B₀)` are kept on the adapter (host copies, `initial_factors`) so that
`save_adapter` can write PEFT's conversion to a plain LoRA of rank `2r`
(`A' = [A; A₀]`, `B' = [B; −B₀]`, alpha doubled, scaling unchanged) that
applies to the untouched original base.
"""

import math
import re

import keras
import numpy as np
from keras import ops

INIT_METHODS = ("default", "gaussian", "pissa", "pissa_niter_N", "olora")
_NITER = re.compile(r"pissa_niter_([0-9]+)")


def validate_init(init, where=""):
    """Returns `init` if it names an initialization method.

    Args:
        init: `"default"`, `"gaussian"`, `"pissa"`, `"pissa_niter_N"` (`N`
            a non-negative integer) or `"olora"`.
        where: a prefix for the error message.

    Returns:
        `init`.

    Raises:
        ValueError: for anything else.

    Example:

    >>> validate_init("pissa_niter_4")
    'pissa_niter_4'
    """
    if isinstance(init, str) and (
        init in ("default", "gaussian", "pissa", "olora") or _NITER.fullmatch(init)
    ):
        return init
    raise ValueError(
        f"{where}`init` must be one of {list(INIT_METHODS)} (N a non-negative "
        f"integer, e.g. 'pissa_niter_4'). Received: init={init!r}"
    )


def modifies_base(init):
    """Whether `init` replaces the base kernel by a residual (PiSSA, OLoRA)."""
    return init == "olora" or init.startswith("pissa")


def check_layer(lora_class, base_layer, rank, init, use_dora, where=""):
    """Raises a `ValueError` unless `init` can initialize this layer.

    Checked while planning, before anything changes: PiSSA / OLoRA need a
    Dense or EinsumDense kernel whose smaller side is at least `rank`, and
    no DoRA (whose frozen norm would be of the wrong kernel).
    """
    if not modifies_base(init):
        return
    from keras_lora.layers import quantized

    quantized.check_init(base_layer, init, where)
    if use_dora:
        raise ValueError(
            f"{where}init={init!r} replaces the base kernel by a residual, "
            "which DoRA's magnitude (computed from the kernel) does not "
            "support here. Use init='default' or 'gaussian' with "
            f"use_dora=True. Received: init={init!r}, use_dora=True"
        )
    from keras_lora.layers import LoRADense
    from keras_lora.layers import LoRAEinsumDense

    if not issubclass(lora_class, (LoRADense, LoRAEinsumDense)):
        raise ValueError(
            f"{where}init={init!r} initializes Dense and EinsumDense layers "
            f"(as PEFT's Linear), not {type(base_layer).__name__}. Exclude "
            f"this layer or use init='default'. Received: init={init!r}"
        )
    contracted, free = lora_class._kernel_split(base_layer)
    d_in, d_out = math.prod(contracted), math.prod(free)
    if rank > min(d_in, d_out):
        raise ValueError(
            f"{where}init={init!r} takes the top `rank` components of the "
            f"{d_in}x{d_out} kernel, which has at most {min(d_in, d_out)}; "
            f"lower the rank (rank_pattern) or exclude the layer. Received: "
            f"rank={rank}"
        )


def check_beside(layer, init, use_dora, where=""):
    """Raises a `ValueError` if a new adapter cannot sit beside `layer`'s.

    DoRA adapters normalize by the kernel, which PiSSA / OLoRA replace (and
    `delete_adapter` restores): the two do not share a layer.
    """
    dora = [a.name for a in layer.adapters.values() if a.use_dora]
    residual = [
        a.name for a in layer.adapters.values()
        if getattr(a, "initial_factors", None) is not None
    ]
    if modifies_base(init) and dora:
        raise ValueError(
            f"{where}init={init!r} would replace the kernel that the DoRA "
            f"adapter(s) {dora} of this layer normalize by. Received: "
            f"init={init!r}"
        )
    if use_dora and residual:
        raise ValueError(
            f"{where}this layer's kernel is the residual of PiSSA / OLoRA "
            f"adapter(s) {residual}, which a DoRA adapter cannot normalize "
            "by. Received: use_dora=True"
        )


def layer_options(options, lora_class, rank, init):
    """The LoRA layer arguments for one layer: `options`, with `"gaussian"`'s
    `lora_a_initializer` (`std = 1/rank`, rank per layer)."""
    from keras_lora.layers import LoRAEmbedding

    if init != "gaussian" or issubclass(lora_class, LoRAEmbedding):
        # PEFT's gaussian leaves embedding adapters at their defaults.
        return options
    return dict(
        options, lora_a_initializer=keras.initializers.RandomNormal(stddev=1.0 / rank)
    )


def check_initializers(init, lora_a_initializer, lora_b_initializer, where=""):
    """`init` other than `"default"` chooses the initial values itself."""
    if init == "default":
        return
    if lora_a_initializer != "he_uniform" or lora_b_initializer != "zeros":
        raise ValueError(
            f"{where}pass either `init` or `lora_a_initializer` / "
            f"`lora_b_initializer`, not both. Received: init={init!r}, "
            f"lora_a_initializer={lora_a_initializer!r}, "
            f"lora_b_initializer={lora_b_initializer!r}"
        )


def initialize(layer, adapter_name, init, change):
    """Applies `init` to one adapter of a built LoRA layer.

    For PiSSA / OLoRA, assigns `A`, `B` and the residual kernel through
    `change` (a `Transaction`, which undoes them on error) and keeps the
    initial factors on the adapter. Also records `init` in the adapter's
    spec (so the layer's config carries it).

    Args:
        layer: a LoRA layer holding `adapter_name`.
        adapter_name: the adapter to initialize.
        init: a validated `init` string.
        change: the open `Transaction`.
    """
    adapter = layer.adapters[adapter_name]
    _record_init(layer, adapter, init)
    if not modifies_base(init):
        return
    kernel = layer.kernel
    matrix, unview = kernel_matrix(layer)
    lora_a, lora_b = initial_factors(matrix, adapter.rank, adapter.scaling, init)
    residual = matrix - adapter.scaling * (lora_a.T @ lora_b)
    contracted, free = layer._kernel_split(layer.base_layer)
    change.assign(adapter.lora_a, lora_a.reshape((adapter.rank,) + tuple(contracted)))
    change.assign(adapter.lora_b, lora_b.reshape((adapter.rank,) + tuple(free)))
    change.assign(kernel, ops.cast(unview(residual), kernel.dtype))
    adapter.initial_factors = (
        np.array(ops.convert_to_numpy(adapter.lora_a.value), "float32"),
        np.array(ops.convert_to_numpy(adapter.lora_b.value), "float32"),
    )


def kernel_matrix(layer):
    """`(W as a float32 d_in × d_out matrix, function mapping such a matrix
    back to the kernel's layout)`."""
    kernel = np.asarray(ops.convert_to_numpy(layer.kernel.value), "float32")
    contracted_axes, free_axes = layer._kernel_axes(layer.base_layer)
    order = tuple(contracted_axes) + tuple(free_axes)
    moved = np.transpose(kernel, order)
    d_in = math.prod(moved.shape[: len(contracted_axes)])
    inverse = np.argsort(order)

    def unview(matrix):
        return np.ascontiguousarray(
            np.transpose(np.reshape(matrix, moved.shape), inverse)
        )

    return moved.reshape(d_in, -1), unview


def initial_factors(matrix, rank, scaling, init):
    """PEFT's `(lora_A.weight, lora_B.weightᵀ)` for a `d_in × d_out` matrix.

    Args:
        matrix: float32 numpy `W`, `(d_in, d_out)`.
        rank: the adapter rank (at most `min(d_in, d_out)`).
        scaling: the adapter's scaling `s`.
        init: `"pissa"`, `"pissa_niter_N"` or `"olora"`.

    Returns:
        `(A, B)`, float32 numpy `(rank, d_in)` and `(rank, d_out)`.
    """
    weight = np.asarray(matrix, "float32").T  # PEFT's (out, in)
    if init == "olora":
        q, r = np.linalg.qr(weight)
        return r[:rank].astype("float32"), q[:, :rank].T.astype("float32")
    niter = _NITER.fullmatch(init)
    if niter is None:
        v, s, uh = np.linalg.svd(weight, full_matrices=False)
        v, s, uh = v[:, :rank], s[:rank], uh[:rank]
    else:
        v, s, u = randomized_svd(weight, rank, int(niter.group(1)))
        uh = u.T
    root = np.sqrt(s / scaling)
    return (root[:, None] * uh).astype("float32"), (root[:, None] * v.T).astype("float32")


def randomized_svd(matrix, rank, niter):
    """`(U, S, V)` with `matrix ≈ U·diag(S)·Vᵀ`, as `torch.svd_lowrank`.

    A Gaussian sketch of `rank` columns refined by `niter` subspace
    iterations (Halko, Martinsson, Tropp 2009); the sketch is drawn with
    `keras.random` (`keras.utils.set_random_seed` makes it repeatable).
    """
    matrix = np.asarray(matrix, "float32")
    transposed = matrix.shape[0] < matrix.shape[1]
    if transposed:
        matrix = matrix.T
    sketch = np.asarray(
        ops.convert_to_numpy(keras.random.normal((matrix.shape[1], rank))), "float32"
    )
    q = np.linalg.qr(matrix @ sketch)[0]
    for _ in range(niter):
        q = np.linalg.qr(matrix.T @ q)[0]
        q = np.linalg.qr(matrix @ q)[0]
    u, s, vh = np.linalg.svd(q.T @ matrix, full_matrices=False)
    u, v = q @ u, vh.T
    return (v, s, u) if transposed else (u, s, v)


def has_initial_factors(layer, adapter_name):
    """Whether `adapter_name` of `layer` was initialized by PiSSA / OLoRA
    (and its initial factors are known)."""
    adapter = layer.adapters.get(adapter_name)
    return getattr(adapter, "initial_factors", None) is not None


def converted_factors(adapter):
    """PEFT's conversion to plain LoRA: `(A', B', alpha')` of rank `2r`.

    `s·A'ᵀ·B' = s·(AᵀB − A₀ᵀB₀)`: on the original kernel `W` this is what
    the residual `W − s·A₀ᵀB₀` plus the trained `s·AᵀB` computes. Alpha is
    doubled (`×√2` with rsLoRA) so the scaling at rank `2r` is unchanged.
    """
    initial_a, initial_b = adapter.initial_factors
    lora_a = np.asarray(ops.convert_to_numpy(adapter.lora_a.value), "float32")
    lora_b = np.asarray(ops.convert_to_numpy(adapter.lora_b.value), "float32")
    alpha = adapter.alpha * (math.sqrt(2.0) if adapter.use_rslora else 2.0)
    return (
        np.ascontiguousarray(np.concatenate([lora_a, initial_a], axis=0)),
        np.ascontiguousarray(np.concatenate([lora_b, -initial_b], axis=0)),
        alpha,
    )


def restore_base_kernel(layer, adapter_names, change):
    """Adds `s·A₀ᵀB₀` of each named PiSSA / OLoRA adapter back to the kernel
    (through `change`), for when those adapters leave the layer."""
    names = [n for n in adapter_names if has_initial_factors(layer, n)]
    if not names:
        return
    kernel = layer.kernel
    value = np.asarray(ops.convert_to_numpy(kernel.value), "float32")
    for name in names:
        adapter = layer.adapters[name]
        initial_a, initial_b = adapter.initial_factors
        value = value + adapter.scaling * np.asarray(ops.convert_to_numpy(
            layer._delta_kernel(ops.convert_to_tensor(initial_a),
                                ops.convert_to_tensor(initial_b))
        ))
    change.assign(kernel, ops.cast(value, kernel.dtype))


def copy_initial_factors(source, target):
    """Carries `initial_factors` from one `Adapter` to its copy."""
    factors = getattr(source, "initial_factors", None)
    if factors is not None:
        target.initial_factors = factors


def _record_init(layer, adapter, init):
    # The layer takes its first adapter's spec from its own arguments,
    # which do not include `init`: record it on the spec afterwards.
    import dataclasses

    if adapter.spec.init == init:
        return
    spec = dataclasses.replace(adapter.spec, init=init)
    layer._specs[[s.name for s in layer._specs].index(spec.name)] = spec
    adapter.spec = spec
