"""`add_weighted_adapter`: a new adapter from a weighted combination of others."""

import numpy as np
from keras import ops

from keras_lora import multi
from keras_lora import surgery
from keras_lora.adapter_matching import _ExactPath
from keras_lora.layers.adapter import validate_adapter_name
from keras_lora.transaction import Transaction

COMBINATION_TYPES = ("cat", "svd", "linear")


def add_weighted_adapter(model, adapters, weights, adapter_name,
                         combination_type="svd", svd_rank=None):
    """Adds an adapter combining `adapters` with `weights` (PEFT's semantics).

    Per layer, with `ΔWᵢ = scalingᵢ · AᵢᵀBᵢ` the update of adapter `i`:

    - `"cat"`: exact. `A` stacks `wᵢ·scalingᵢ·Aᵢ` and `B` stacks `Bᵢ` along
      the rank axis, so the update is `Σ wᵢ·ΔWᵢ`, of rank `Σ rᵢ` (summed
      over the adapters the layer has).
    - `"svd"`: the exact weighted sum `Σ wᵢ·ΔWᵢ`, then its best
      rank-`svd_rank` approximation by SVD (the full sum when `svd_rank` is
      at least its rank; default `svd_rank`: the largest rank). One layer's
      `d_in × d_out` sum exists at a time.
    - `"linear"`: as PEFT defines it (not the weighted sum of updates):
      `A = Σ sign·sqrt(|wᵢ·scalingᵢ|)·Aᵢ`, `B = Σ sqrt(|wᵢ·scalingᵢ|)·Bᵢ`;
      every adapter must have the same rank and cover the same layers.

    The new adapter has `alpha = rank` (scaling 1), covers the layers that
    hold any of `adapters`, and is not active until `set_adapter`.

    Args:
        model: a Keras model with LoRA layers.
        adapters: names of existing adapters.
        weights: one number per adapter.
        adapter_name: the new adapter's name.
        combination_type: `"svd"` (default), `"cat"` or `"linear"`.
        svd_rank: the rank of an `"svd"` combination.

    Returns:
        `model`.

    Raises:
        ValueError, TypeError: for unknown, duplicate or invalid names,
            weights that do not match, an unknown combination, `svd_rank`
            not a positive int, or a `"linear"` combination of adapters with
            other ranks or layers (nothing is changed).

    Example:

    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model = add_adapter(apply_lora(model, rank=2), "b", rank=2)
    >>> model = add_weighted_adapter(model, ["default", "b"], [0.5, 0.5],
    ...                              "ab", combination_type="cat")
    >>> lora_layers(model)["dense"].adapters["ab"].rank
    4
    """
    plan = _plan(model, adapters, weights, adapter_name, combination_type, svd_rank)
    with Transaction(model) as change:
        multi.add_adapter(
            model, adapter_name, rank=1,
            targets=[_ExactPath(path) for path in plan],
            rank_pattern={_ExactPath(p): r for p, (r, _) in plan.items()},
            alpha_pattern={_ExactPath(p): float(r) for p, (r, _) in plan.items()},
        )
        layers = surgery.lora_layers(model)
        for path, (rank, compute) in plan.items():
            target = layers[path].adapters[adapter_name]
            lora_a, lora_b = compute()
            change.assign(target.lora_a, lora_a)
            change.assign(target.lora_b, lora_b)
    return model


def _plan(model, adapters, weights, adapter_name, combination_type, svd_rank):
    """`{layer path: (new rank, () -> (lora_a, lora_b))}`, all validated."""
    who = "add_weighted_adapter"
    validate_adapter_name(adapter_name, f"{who}: ")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(
            f"{who}: `combination_type` must be one of {list(COMBINATION_TYPES)}. "
            f"Received: combination_type={combination_type!r}"
        )
    names = multi._as_names(adapters, who)
    multi._check_known(model, names, who)
    if adapter_name in multi.list_adapters(model):
        raise ValueError(
            f"{who}: model '{model.name}' already has an adapter named "
            f"{adapter_name!r}. Nothing was changed."
        )
    weights = list(weights) if isinstance(weights, (list, tuple)) else weights
    if not isinstance(weights, list) or len(weights) != len(names) or not all(
        isinstance(w, (int, float, np.number)) and not isinstance(w, bool)
        and np.isfinite(w) for w in weights
    ):
        raise ValueError(
            f"{who}: `weights` must be {len(names)} finite numbers, one per "
            f"adapter. Received: weights={weights!r}"
        )
    if combination_type == "svd" and svd_rank is not None and (
        not isinstance(svd_rank, (int, np.integer)) or isinstance(svd_rank, bool)
        or svd_rank < 1
    ):
        raise ValueError(
            f"{who}: `svd_rank` must be a positive integer. Received: "
            f"svd_rank={svd_rank!r}"
        )
    layers = surgery.lora_layers(model)
    if any(layer.merged for layer in layers.values()):
        raise ValueError(
            f"{who}: adapters are merged; call `unmerge_adapters(model)` "
            "first. Nothing was changed."
        )
    ranks = {}
    for layer in layers.values():
        for name in names:
            if name in layer.adapters:
                ranks.setdefault(name, set()).add(layer.adapters[name].rank)
    if combination_type == "linear":
        covered = {n: {p for p, l in layers.items() if n in l.adapters} for n in names}
        if len({frozenset(c) for c in covered.values()}) > 1:
            raise ValueError(
                f"{who}: a 'linear' combination needs adapters on the same "
                f"layers; {names} cover different ones. Use 'cat' or 'svd'."
            )
        if len({r for rs in ranks.values() for r in rs}) > 1:
            raise ValueError(
                f"{who}: a 'linear' combination needs adapters of one rank. "
                f"Received ranks: { {n: sorted(r) for n, r in ranks.items()} }"
            )
    default_svd_rank = svd_rank or max(r for rs in ranks.values() for r in rs)
    plan = {}
    for path, layer in layers.items():
        present = [(n, w) for n, w in zip(names, weights) if n in layer.adapters]
        if not present:
            continue
        if any(layer.adapters[n].extra_factors for n, _ in present):
            raise ValueError(
                f"{who}: layer '{path}' ({type(layer).__name__}) gives each "
                "adapter a further pair "
                f"{sorted(layer.adapters[present[0][0]].extra_factors)} (an "
                "untied ReversibleEmbedding's reverse table), which a weighted "
                "combination does not carry. Leave that layer out of the "
                "adapters to combine. Nothing was changed."
            )
        if combination_type == "cat":
            rank = sum(layer.adapters[n].rank for n, _ in present)
        elif combination_type == "linear":
            rank = layer.adapters[present[0][0]].rank
        else:
            rank = default_svd_rank
        plan[path] = (rank, _combiner(layer, present, combination_type, rank))
    return plan


def _combiner(layer, present, combination_type, rank):
    def values(adapter):
        return (np.asarray(ops.convert_to_numpy(adapter.lora_a.value), "float64"),
                np.asarray(ops.convert_to_numpy(adapter.lora_b.value), "float64"))

    def cat():
        parts = [values(layer.adapters[n]) for n, _ in present]
        scales = [w * layer.adapters[n].scaling for n, w in present]
        a = np.concatenate([s * a for s, (a, _) in zip(scales, parts)], axis=0)
        b = np.concatenate([b for _, b in parts], axis=0)
        return a.astype("float32"), b.astype("float32")

    def linear():
        a_sum, b_sum = 0.0, 0.0
        for name, weight in present:
            a, b = values(layer.adapters[name])
            scaled = weight * layer.adapters[name].scaling
            root = np.sqrt(abs(scaled))
            a_sum = a_sum + (root if scaled >= 0 else -root) * a
            b_sum = b_sum + root * b
        return np.float32(a_sum), np.float32(b_sum)

    def svd():
        contracted, free = layer._kernel_axes(layer.base_layer)
        delta = 0.0
        for name, weight in present:
            term = ops.convert_to_numpy(layer.delta_kernel([name]))
            delta = delta + weight * np.asarray(term, "float64")
        delta = np.transpose(delta, contracted + free)
        a_shape, b_shape = delta.shape[:len(contracted)], delta.shape[len(contracted):]
        matrix = delta.reshape(int(np.prod(a_shape)), int(np.prod(b_shape)))
        u, s, vh = np.linalg.svd(matrix, full_matrices=False)
        kept = min(rank, s.shape[0])
        a = np.zeros((rank, matrix.shape[0]))
        b = np.zeros((rank, matrix.shape[1]))
        a[:kept] = u[:, :kept].T
        b[:kept] = s[:kept, None] * vh[:kept]
        return (a.reshape((rank,) + a_shape).astype("float32"),
                b.reshape((rank,) + b_shape).astype("float32"))

    return {"cat": cat, "linear": linear, "svd": svd}[combination_type]
