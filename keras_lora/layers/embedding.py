"""LoRA for embedding tables: `Embedding` and `ReversibleEmbedding`.

A table `W` of shape `(vocab, dim)` is updated by `scaling · Aᵀ·B` with
`lora_a` of shape `(rank, vocab)` (PEFT's `lora_embedding_A`) and `lora_b`
of shape `(rank, dim)` (PEFT's `lora_embedding_B`, transposed). A lookup
gathers rows of `Aᵀ` (`rank` numbers per token) and multiplies them by `B`,
so the `(vocab, dim)` update is never formed while training. An untied
`ReversibleEmbedding`'s reverse table `(dim, vocab)` gets a second pair per
adapter (`reverse_lora_a`, `reverse_lora_b`), applied the same way.

As in PEFT, the LoRA path of an embedding takes no dropout: its input is
token ids (the `dropout` argument is accepted and has no effect).
"""

import keras
from keras import ops
from keras.src.backend import set_keras_mask

from keras_lora.layers.base import LoRALayer
from keras_lora.layers.kernels import add_low_rank_update


def reversible_embedding_class():
    """Keras's `ReversibleEmbedding` class (keras-hub's subclasses it), or
    keras-hub's own on a Keras that has none, or `None`."""
    found = getattr(keras.layers, "ReversibleEmbedding", None)
    if found is not None:
        return found
    import importlib.util

    if importlib.util.find_spec("keras_hub") is None:
        return None
    import keras_hub

    return keras_hub.layers.ReversibleEmbedding


def _token_ids(inputs):
    inputs = ops.convert_to_tensor(inputs)
    if keras.backend.standardize_dtype(inputs.dtype) not in ("int32", "int64"):
        inputs = ops.cast(inputs, "int32")
    return inputs


def _like(value, reference):
    if keras.backend.standardize_dtype(value.dtype) != (
        keras.backend.standardize_dtype(reference.dtype)
    ):
        value = ops.cast(value, reference.dtype)
    return value


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRAEmbedding(LoRALayer):
    """An `Embedding` whose table is frozen and updated by `Aᵀ·B`.

    Computes `W[ids] + scaling · Aᵀ[ids] · B` with `lora_a` `(rank, vocab)`
    and `lora_b` `(rank, dim)`; the kernel-shaped `Aᵀ·B` is formed only to
    merge. Adopt a built layer with `LoRAEmbedding.from_layer(embedding)`
    or let `apply_lora` do it (embeddings are adapted only when targeted:
    by name, type, glob or the `"all"` preset).

    Args:
        base_layer: a built `keras.layers.Embedding`.
        rank: positive int, the adapter rank.
        alpha: positive float, the LoRA alpha; defaults to `rank`.
        dropout: accepted for uniformity and not applied (PEFT applies no
            dropout to an embedding's LoRA path).
        use_rslora: scale by `alpha / sqrt(rank)` instead of `alpha / rank`.
        lora_a_initializer: initializer of `lora_a` (He-uniform).
        lora_b_initializer: initializer of `lora_b` (zeros).
        **kwargs: the other `LoRALayer` arguments and `name` / `dtype`.

    Input shape:
        Integer token ids `(batch_size, ...)`.

    Returns:
        `(batch_size, ..., dim)` in the layer's compute dtype.

    Example:

    >>> table = keras.layers.Embedding(10, 4)
    >>> table.build((None,))
    >>> layer = LoRAEmbedding.from_layer(table, rank=2)
    >>> tuple(layer.lora_a.shape), tuple(layer.lora_b.shape)
    ((2, 10), (2, 4))
    """

    base_layer_class = keras.layers.Embedding

    @classmethod
    def base_kernel(cls, base_layer):
        return base_layer.embeddings

    @classmethod
    def _check_base_layer(cls, layer):
        super()._check_base_layer(layer)
        reversible = reversible_embedding_class()
        if (cls is LoRAEmbedding and reversible is not None
                and isinstance(layer, reversible)):
            raise TypeError(
                "LoRAEmbedding would lose the reverse projection of a "
                "ReversibleEmbedding; use LoRAReversibleEmbedding (apply_lora "
                f"picks it). Received: layer '{layer.name}' of type "
                f"{type(layer).__name__}"
            )

    @classmethod
    def _kernel_split(cls, base_layer):
        vocab, dim = cls.base_kernel(base_layer).shape
        return (vocab,), (dim,)

    @property
    def bias(self):
        """Embeddings have no bias: `None`."""
        return None

    @property
    def input_dim(self):
        return self.base_layer.input_dim

    @property
    def output_dim(self):
        return self.base_layer.output_dim

    def _base_preactivation(self, inputs):
        outputs = ops.take(
            self.base_layer.embeddings, _token_ids(inputs), axis=0
        )
        return ops.cast(outputs, self.compute_dtype)

    def _lora_input(self, inputs, training, dropout):
        # PEFT's Embedding never applies its dropout; neither do we.
        return inputs

    def _add_lora_output(self, outputs, inputs, lora_a, lora_b, scaling):
        lora_a = _like(lora_a, outputs)
        lora_b = _like(lora_b, outputs)
        # Rows of Aᵀ: `rank` numbers per token, never the (vocab, dim) table.
        rows = ops.take(ops.transpose(lora_a), _token_ids(inputs), axis=0)
        update = ops.matmul(ops.multiply(rows, scaling), lora_b)
        return ops.add(outputs, update)

    def _delta_kernel(self, lora_a, lora_b):
        return ops.matmul(ops.transpose(lora_a), lora_b)

    def compute_mask(self, inputs, mask=None):
        return self.base_layer.compute_mask(inputs, mask)

    def compute_output_spec(self, inputs, training=None):
        return self.base_layer.compute_output_spec(inputs)


_REVERSIBLE = reversible_embedding_class()


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRAReversibleEmbedding(LoRAEmbedding):
    """A `ReversibleEmbedding` (Keras / keras-hub) with a LoRA table update.

    The lookup computes what `LoRAEmbedding` does.

    - Tied weights (one table): the same update applies to the reverse
      (logits) projection, `x · (W + s·Aᵀ·B)ᵀ`, computed as
      `x·Wᵀ + s·(x·Bᵀ)·A`, so merging into the one tied table changes
      neither direction.
    - Untied weights: the separate reverse kernel `reverse_embeddings`
      `(dim, vocab)` is a weight of its own, and each adapter gets a second
      pair for it, `reverse_lora_a` `(rank, dim)` and `reverse_lora_b`
      `(rank, vocab)` (the Dense convention: A over the contracted `dim`),
      applied factored, `x·W_rev + s·(x·A_revᵀ)·B_rev`. Merging folds each
      pair into its own table. Both pairs share the adapter's rank, alpha
      and scaling; adapter files hold them as `".../reverse_lora_a"` /
      `".../reverse_lora_b"`.

    Args:
        base_layer: a built `ReversibleEmbedding`.
        rank, alpha, dropout, use_rslora, lora_a_initializer,
        lora_b_initializer, **kwargs: as for `LoRAEmbedding` (the
        initializers apply to both pairs; dropout to neither).

    Call arguments:
        inputs: token ids, or hidden states `(..., dim)` with `reverse=True`.
        reverse: project hidden states to `(..., vocab)` logits.

    Example:

    >>> table = keras.layers.ReversibleEmbedding(10, 4, tie_weights=False)
    >>> table.build((None,))
    >>> layer = LoRAReversibleEmbedding.from_layer(table, rank=2)
    >>> tuple(layer(np.ones((3, 4)), reverse=True).shape)
    (3, 10)
    >>> sorted(layer.adapters["default"].extra_factors)
    ['reverse_lora_a', 'reverse_lora_b']
    """

    base_layer_class = _REVERSIBLE if _REVERSIBLE is not None else type(None)

    @classmethod
    def extra_factor_kernels(cls, base_layer):
        """`{"reverse_": (reverse_embeddings, (0,), (1,))}` when untied."""
        if base_layer.tie_weights:
            return {}
        # (dim, vocab): hidden states contract `dim`, logits are `vocab`.
        return {_REVERSE: (base_layer.reverse_embeddings, (0,), (1,))}

    @property
    def reverse_kernel(self):
        """The untied reverse table `(dim, vocab)`, or `None` when tied."""
        base = self.base_layer
        return None if base.tie_weights else base.reverse_embeddings

    def call(self, inputs, reverse=False, training=None):
        if not reverse:
            outputs = super().call(inputs, training=training)
            mask = keras.layers.Embedding.compute_mask(self.base_layer, inputs)
            if mask is not None:
                set_keras_mask(outputs, mask)
            return outputs
        base = self.base_layer
        tied = base.tie_weights
        kernel = ops.transpose(base.embeddings) if tied else base.reverse_embeddings
        if base.reverse_dtype is not None:
            inputs = ops.cast(inputs, base.reverse_dtype)
            kernel = ops.cast(kernel, base.reverse_dtype)
        logits = ops.matmul(inputs, kernel)
        if tied:
            for x, lora_a, lora_b, scaling in self._lora_terms(inputs, training):
                # x·(s·AᵀB)ᵀ = s·(x·Bᵀ)·A: B is the contracted side here.
                logits = add_low_rank_update(
                    logits, x, _like(lora_b, logits), _like(lora_a, logits),
                    scaling,
                )
        else:
            for adapter in self._applied_adapters():
                factors = adapter.extra_factors
                logits = add_low_rank_update(
                    logits, inputs,
                    self._in_compute_dtype(factors[_REVERSE_A], logits),
                    self._in_compute_dtype(factors[_REVERSE_B], logits),
                    adapter.scaling,
                )
        if base.logit_soft_cap is not None:
            cap = base.logit_soft_cap
            logits = ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)
        return logits

    # Merging: an untied layer folds each pair into its own table ----------

    def reverse_delta(self, adapter_names=None):
        """`Σ scaling · A_revᵀ·B_rev` `(dim, vocab)` as float32 (untied only).

        Args:
            adapter_names: the adapters to sum; default: the active ones.
        """
        names = self._present(
            self.active_adapters if adapter_names is None else adapter_names
        )
        delta = ops.zeros(tuple(self.reverse_kernel.shape), "float32")
        for name in names:
            factors = self._adapters[name].extra_factors
            term = ops.matmul(
                ops.transpose(ops.convert_to_tensor(factors[_REVERSE_A].value)),
                ops.convert_to_tensor(factors[_REVERSE_B].value),
            )
            delta = ops.add(delta, ops.multiply(term, self._adapters[name].scaling))
        return delta

    def _merged_reverse(self):
        delta = self.reverse_delta()
        kernel = ops.convert_to_tensor(self.reverse_kernel.value)
        merged = ops.cast(ops.add(ops.cast(kernel, "float32"), delta), kernel.dtype)
        if not bool(ops.convert_to_numpy(ops.all(ops.isfinite(merged)))):
            raise ValueError(
                f"Layer '{self.name}': the merged reverse table "
                "W_rev + scaling·A_revᵀ·B_rev holds NaN or infinite entries "
                f"in its dtype {keras.backend.standardize_dtype(kernel.dtype)}; "
                "refusing to merge. Nothing was changed."
            )
        return merged

    def merged_weights(self):
        """The merged table and, when untied, the merged reverse table."""
        weights = super().merged_weights()
        if self.reverse_kernel is not None:
            weights.append((self.reverse_kernel, self._merged_reverse()))
        return weights

    def merge(self):
        """Folds the active adapters into the table (and the untied reverse
        table), as `LoRALayer.merge`; both are checked before either changes."""
        untied = self.reverse_kernel is not None
        folds = untied and not self.merged and self.adapter_enabled
        reverse = self._merged_reverse() if folds else None
        super().merge()
        if reverse is not None:
            self.reverse_kernel.assign(reverse)

    def unmerge(self):
        """Takes the merged updates out of both tables again."""
        restored = None
        if self.merged and self.reverse_kernel is not None:
            value = ops.convert_to_tensor(self.reverse_kernel.value)
            restored = ops.cast(ops.subtract(
                ops.cast(value, "float32"), self.reverse_delta(self._merged_names)
            ), value.dtype)
        super().unmerge()
        if restored is not None:
            self.reverse_kernel.assign(restored)

    def _check_initial_values(self):
        super()._check_initial_values()
        for adapter in self._adapters.values():
            for name, variable in adapter.extra_factors.items():
                if not bool(ops.convert_to_numpy(ops.all(ops.isfinite(variable)))):
                    initializer = (
                        adapter.spec.lora_a_initializer if name == _REVERSE_A
                        else adapter.spec.lora_b_initializer
                    )
                    raise ValueError(
                        f"{type(self).__name__} for layer '{self.name}': the "
                        f"initial {name} of adapter '{adapter.name}' holds NaN "
                        "or infinite values. Received: initializer="
                        f"{keras.initializers.serialize(initializer)!r}"
                    )

    def compute_mask(self, inputs, mask=None):
        # As ReversibleEmbedding: the lookup sets its mask in `call`.
        return None

    def compute_output_shape(self, input_shape, reverse=False):
        return self.base_layer.compute_output_shape(input_shape, reverse=reverse)

    def compute_output_spec(self, inputs, reverse=False, training=None):
        return self.base_layer.compute_output_spec(inputs, reverse=reverse)


_REVERSE = "reverse_"
_REVERSE_A = _REVERSE + "lora_a"
_REVERSE_B = _REVERSE + "lora_b"
