"""What every LoRA layer shares: adapters, scaling, dropout, merge, config."""

import math
import keras
from keras import initializers
from keras import ops

from keras_lora import config as lora_config
from keras_lora.distribution import adapter_layout_scope
from keras_lora.layers import batch_routing
from keras_lora.layers import fused_kernels
from keras_lora.layers import quantized
from keras_lora.layers.adapter import DEFAULT_ADAPTER
from keras_lora.layers.adapter import Adapter
from keras_lora.layers.adapter import AdapterSet
from keras_lora.layers.adapter import AdapterSpec
from keras_lora.layers.adapter import validate_adapter_name
from keras_lora.layers.owners import _reset_owner_functions
from keras_lora.layers.initializers import NullScope
from keras_lora.layers.initializers import RankFirst
from keras_lora.layers.initializers import is_float


class LoRALayer(keras.layers.Layer):
    """Base class of LoRA layers: a frozen base layer plus named low-rank updates.

    A LoRA layer holds a built (or buildable) base layer and any number of
    named adapters (`layer.adapters`, each an `Adapter` with its own
    `lora_a`, `lora_b`, rank, alpha, scaling and dropout), of which the
    active ones (`layer.active_adapters`) are applied:

    `activation(base_preactivation(x) + Σ_active scaling · (dropout(x)·A)·B)`

    without ever forming `W + A·B`: each update is applied in factored form,
    so a training step needs no gradient with respect to the full kernel.
    Subclasses describe the kernel's geometry (which axes are contracted and
    which are free) and how the base and the low-rank path are computed.

    The base layer's variables are used as they are (never copied) and are
    frozen; only the active adapters (and, with `train_bias=True`, the bias)
    are trainable. Adapters are float32 under every dtype policy. `lora_a`
    is stored rank-first, `(rank,) + contracted axes` (PEFT's
    `lora_A.weight` layout); `lora_b` is `(rank,) + free axes`. The first
    adapter's variables read `.../<layer>/lora_a`; any other adapter's
    `.../<adapter name>/<layer>/lora_a` (Keras opens the layer's own name
    scope innermost). `layer.lora_a`, `layer.rank` and the
    other single-adapter attributes mean the adapter named `"default"` (or
    the first one).

    Args:
        base_layer: the layer to adapt, an instance of `base_layer_class`.
        rank: positive int, the rank `r` of the first adapter.
        alpha: positive float, its LoRA alpha; defaults to `rank`.
        dropout: float in [0, 1), dropout on its LoRA path's input.
        use_rslora: use `alpha / sqrt(rank)` as scaling (rank-stabilized
            LoRA) instead of `alpha / rank`.
        lora_a_initializer: initializer of `lora_a`, He-uniform by default.
        lora_b_initializer: initializer of `lora_b`, zeros by default, so
            a fresh adapter leaves the base output unchanged.
        train_bias: whether the base layer's bias stays trainable.
        adapter_name: the first adapter's name (`"default"`).
        extra_adapters: configs (`AdapterSpec.get_config()`) of further
            adapters, created after the first (used by `from_config`).
        use_dora: bool, the first adapter is a DoRA adapter (see
            `keras_lora/layers/dora.py`).
        init: how the first adapter was initialized (see
            `keras_lora.init_methods`; recorded for serialization, the
            initialization itself is done by `apply_lora`).
        active_adapters: names of the adapters to apply (default: the
            first). Names this layer lacks are allowed and contribute
            nothing (an adapter may cover a subset of a model's layers).
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`).
    """

    base_layer_class = None
    # Layer types that adapt int8 / int4 bases of Keras's `model.quantize`.
    supports_quantized_base = False
    # Layer types whose factored forward DoRA's per-unit factor fits.
    supports_dora = False

    def __init__(
        self,
        base_layer,
        rank=8,
        alpha=None,
        dropout=0.0,
        use_rslora=False,
        lora_a_initializer="he_uniform",
        lora_b_initializer="zeros",
        train_bias=False,
        adapter_enabled=True,
        merged=False,
        adapter_name=DEFAULT_ADAPTER,
        extra_adapters=None,
        active_adapters=None,
        use_dora=False,
        init="default",
        **kwargs,
    ):
        # Validate everything before touching `base_layer`.
        where = f"{type(self).__name__}: "
        self._check_base_layer(base_layer)
        where = f"{type(self).__name__} for layer '{base_layer.name}': "
        specs = [AdapterSpec.validated(
            adapter_name, rank, alpha, use_rslora, dropout,
            lora_a_initializer, lora_b_initializer, use_dora=use_dora,
            init=init, where=where,
        )]
        for config in extra_adapters or ():
            if isinstance(config, AdapterSpec):
                specs.append(config)
            else:
                specs.append(AdapterSpec.validated(**config, where=where))
        for variant in {spec.variant for spec in specs}:
            variant.check(type(self), base_layer, where)
        quantized.check_specs(base_layer, specs, merged, where)
        names = [spec.name for spec in specs]
        duplicate = sorted({n for n in names if names.count(n) > 1})
        if duplicate:
            raise ValueError(
                f"{where}adapter names must be unique. Received: "
                f"{duplicate[0]!r} twice"
            )
        for flag, value in (("train_bias", train_bias),
                            ("adapter_enabled", adapter_enabled),
                            ("merged", merged)):
            lora_config.validate_bool(value, flag, where)
        active = tuple(names[:1] if active_adapters is None else active_adapters)
        for name in active:
            validate_adapter_name(name, where)
        kwargs.setdefault("name", base_layer.name)
        # A quantized base's float source policy: the LoRA layer itself is
        # not quantized (Keras would route its call to a quantized forward).
        kwargs.setdefault("dtype", quantized.wrapper_dtype(base_layer))
        super().__init__(**kwargs)
        self.base_layer = base_layer
        self._specs = specs
        self._adapters = AdapterSet()
        self.active_adapters = active
        self.train_bias = bool(train_bias)
        self.adapter_enabled = bool(adapter_enabled)
        self.merged = bool(merged)
        # The adapters a merge folded in, to take the same ones out again.
        self._merged_names = self._present(active) if merged else ()
        self.seed_generator = (
            keras.random.SeedGenerator()
            if any(spec.dropout > 0 for spec in specs) else None
        )
        self._freeze_base()
        if base_layer.built:
            self._create_adapters()
            self._check_initial_values()
            self.built = True

    @classmethod
    def from_layer(cls, layer, rank=8, **kwargs):
        """Adapts a built base layer, sharing its variables (no copy).

        Args:
            layer: a built instance of `base_layer_class`.
            rank: positive int, the adapter rank.
            **kwargs: the other LoRA arguments (`alpha`, `dropout`, ...).

        Returns:
            A LoRA layer that computes exactly what `layer` does while
            `lora_b` is zero.
        """
        cls._check_base_layer(layer)
        if not layer.built:
            raise ValueError(
                f"{cls.__name__}.from_layer() needs a built layer, but layer "
                f"'{layer.name}' is not built. Call it on data or call "
                "`layer.build(input_shape)` first."
            )
        return cls(base_layer=layer, rank=rank, **kwargs)

    # Geometry, supplied by subclasses ------------------------------------

    @classmethod
    def base_kernel(cls, base_layer):
        """The base layer's frozen weight that the adapters update.

        `kernel` for Dense, EinsumDense and convolutions; a subclass for a
        layer keeping it elsewhere (an `Embedding`'s `embeddings`)
        overrides this, and everything else (merge, adapter files, layouts,
        checks) follows. For an int8 / int4 base (see
        `keras_lora/layers/quantized.py`) it is the stored quantized kernel
        variable (int8; int4 values packed two to a byte).
        """
        if quantized.mode_of(base_layer) is not None:
            return quantized.stored_kernel(base_layer)
        return base_layer.kernel

    @classmethod
    def kernel_shape(cls, base_layer):
        """The base kernel's logical shape (an int4 kernel is stored packed)."""
        if quantized.mode_of(base_layer) is not None:
            return quantized.kernel_shape(base_layer)
        return tuple(cls.base_kernel(base_layer).shape)

    @classmethod
    def _kernel_split(cls, base_layer):
        """Returns `(contracted_shape, free_shape)` of the base kernel."""
        raise NotImplementedError

    @classmethod
    def _kernel_axes(cls, base_layer):
        """Returns `(contracted_axes, free_axes)`: kernel axis indices.

        The default suits kernels whose contracted axes come first (Dense).
        """
        contracted, free = cls._kernel_split(base_layer)
        n_contracted = len(contracted)
        return (
            tuple(range(n_contracted)),
            tuple(range(n_contracted, n_contracted + len(free))),
        )

    @classmethod
    def extra_factor_kernels(cls, base_layer):
        """Further kernels that each adapter updates with its own pair.

        Returns `{prefix: (kernel, contracted_axes, free_axes)}`; each
        adapter then also holds `<prefix>lora_a` `(rank,) + contracted` and
        `<prefix>lora_b` `(rank,) + free` (in `Adapter.extra_factors`),
        created, laid out, trained, saved and loaded like `lora_a` /
        `lora_b`. The layer type applies and merges them. Default: none.
        """
        return {}

    @classmethod
    def extra_factor_shapes(cls, base_layer, rank):
        """`{name: shape}` of each adapter's `extra_factors` at `rank`."""
        shapes = {}
        for prefix, (kernel, contracted, free) in (
            cls.extra_factor_kernels(base_layer).items()
        ):
            shape = tuple(kernel.shape)
            shapes[prefix + "lora_a"] = (rank,) + tuple(shape[i] for i in contracted)
            shapes[prefix + "lora_b"] = (rank,) + tuple(shape[i] for i in free)
        return shapes

    def _base_preactivation(self, inputs):
        raise NotImplementedError

    def _add_lora_output(self, outputs, inputs, lora_a, lora_b, scaling):
        """Returns `outputs + scaling · (inputs · A) · B`, factored.

        `scaling` is a Python float (one adapter's); `lora_a` / `lora_b`
        are tensors in the inputs' compute dtype.
        """
        raise NotImplementedError

    def _delta_kernel(self, lora_a, lora_b):
        """Returns `A·B` laid out like the base kernel."""
        raise NotImplementedError

    # Checks ---------------------------------------------------------------

    @classmethod
    def _check_base_layer(cls, layer):
        if not isinstance(layer, cls.base_layer_class):
            raise TypeError(
                f"{cls.__name__} adapts `{cls.base_layer_class.__name__}` "
                f"layers. Received: layer '{getattr(layer, 'name', layer)}' "
                f"of type {type(layer).__name__}"
            )
        if getattr(layer, "lora_enabled", False):
            raise ValueError(
                f"Layer '{layer.name}' already has Keras's built-in LoRA "
                "enabled (`enable_lora`). Use a layer without it."
            )
        quantized.check_base(cls, layer)

    @classmethod
    def _check_dora(cls, base_layer, where=""):
        """Raises unless DoRA can adapt this base layer."""
        if not cls.supports_dora:
            raise ValueError(
                f"{where}DoRA (use_dora=True) is supported for Dense and "
                f"EinsumDense layers, not by {cls.__name__}. Received: "
                "use_dora=True"
            )

    @classmethod
    def width_below_rank(cls, base_layer, rank):
        """`(d_in, d_out)` if `rank` exceeds the kernel's smaller side.

        Such a rank is accepted (as by PEFT and Keras's `enable_lora`): the
        update is simply full-rank there. `apply_lora` warns about it.

        Args:
            base_layer: a built instance of `base_layer_class`.
            rank: the requested rank.

        Returns:
            `(contracted size, free size)` when `rank > min(...)`, else
            `None`.
        """
        contracted, free = cls._kernel_split(base_layer)
        d_in, d_out = math.prod(contracted), math.prod(free)
        return (d_in, d_out) if rank > min(d_in, d_out) else None

    # Adapters ---------------------------------------------------------------

    @property
    def adapters(self):
        """`{name: Adapter}` of this layer, in creation order."""
        return self._adapters

    @property
    def adapter_specs(self):
        """The `AdapterSpec` of every adapter, in creation order."""
        return list(self._specs)

    def _primary_spec(self):
        names = [spec.name for spec in self._specs]
        index = names.index(DEFAULT_ADAPTER) if DEFAULT_ADAPTER in names else 0
        return self._specs[index]

    def _primary(self):
        return self._adapters.get(self._primary_spec().name)

    lora_a = property(
        lambda self: getattr(self._primary(), "lora_a", None),
        doc="`lora_a` of the adapter named \"default\" (or the first one).",
    )
    lora_b = property(
        lambda self: getattr(self._primary(), "lora_b", None),
        doc="`lora_b` of the adapter named \"default\" (or the first one).",
    )
    rank = property(lambda self: self._primary_spec().rank)
    use_dora = property(lambda self: self._primary_spec().use_dora)
    alpha = property(lambda self: self._primary_spec().alpha)
    dropout = property(lambda self: self._primary_spec().dropout)
    use_rslora = property(lambda self: self._primary_spec().use_rslora)
    lora_a_initializer = property(
        lambda self: self._primary_spec().lora_a_initializer
    )
    lora_b_initializer = property(
        lambda self: self._primary_spec().lora_b_initializer
    )

    @property
    def scaling(self):
        """The factor applied to `A·B` of the first adapter."""
        return self._primary_spec().scaling

    def _present(self, names):
        known = {spec.name for spec in self._specs}
        return tuple(name for name in names if name in known)

    def set_active_adapters(self, names):
        """Applies the adapters `names` (those this layer has) from now on.

        Only the active adapters are trainable. The traced functions of the
        models this layer was adapted in are reset (see `disable_adapter`).

        Args:
            names: a list of adapter names.

        Raises:
            ValueError: while merged (unmerge first).
        """
        names = tuple(names)
        for name in names:
            validate_adapter_name(name, f"layer '{self.name}': ")
        if self.merged and self._present(names) != self._merged_names:
            raise ValueError(
                f"Layer '{self.name}' has adapters {list(self._merged_names)} "
                "merged into its kernel; call `unmerge()` before switching "
                f"adapters. Received: {list(names)}"
            )
        self.active_adapters = names
        self._set_adapter_flags()
        _reset_owner_functions(self)

    # State ----------------------------------------------------------------

    def _freeze_base(self):
        self.base_layer.trainable = False
        # On TensorFlow, setting `trainable` to the value it already has
        # leaves the variables' own flags as they are: set them explicitly.
        for variable in self.base_layer.weights:
            variable.trainable = False
        bias = getattr(self.base_layer, "bias", None)
        if self.train_bias and self._trainable and bias is not None:
            bias.trainable = True

    def _set_adapter_flags(self):
        active = set(self.active_adapters)
        for adapter in self._adapters.values():
            for variable in adapter.variables:
                variable.trainable = self._trainable and adapter.name in active

    @property
    def trainable(self):
        """Whether the active adapters (and a `train_bias` bias) train.

        Setting it never unfreezes the base kernel: Keras's own setter would
        cascade to the base layer, so `model.trainable = True` after freezing
        a backbone would silently turn LoRA into full fine-tuning.
        """
        return self._trainable

    @trainable.setter
    def trainable(self, value):
        self._trainable = bool(value)
        # Keras may set `trainable` before `__init__` has stored anything.
        if getattr(self, "_adapters", None) is not None:
            self._set_adapter_flags()
        if getattr(self, "base_layer", None) is not None:
            self._freeze_base()

    def _create_adapters(self):
        for spec in self._specs:
            if spec.name not in self._adapters:
                self._create_adapter(spec, first=spec is self._specs[0])
        self._set_adapter_flags()

    def _create_adapter(self, spec, first):
        contracted, free = self._kernel_split(self.base_layer)
        # Create the adapters beside the base kernel so their paths read
        # ".../<layer>/lora_a" (".../<name>/<layer>/lora_a" for any other
        # adapter: `add_weight` opens the layer's scope innermost) and a LayoutMap sees where they belong.
        kernel_path = self.kernel.path
        parts = kernel_path.split("/")[:-2]
        scope = (
            keras.name_scope(parts[-1], override_parent="/".join(parts[:-1]))
            if parts
            else NullScope()
        )
        inner = NullScope() if first else keras.name_scope(spec.name)
        # Under a keras.distribution, A and B take layouts derived from the
        # kernel's, whatever a LayoutMap written for the base would say.
        layouts = adapter_layout_scope(
            self.kernel, *self._kernel_axes(self.base_layer)
        )
        with scope, inner, layouts:
            lora_a = self.add_weight(
                name="lora_a",
                shape=(spec.rank,) + tuple(contracted),
                initializer=RankFirst(spec.lora_a_initializer),
                dtype="float32",
                trainable=True,
            )
            lora_b = self.add_weight(
                name="lora_b",
                shape=(spec.rank,) + tuple(free),
                initializer=spec.lora_b_initializer,
                dtype="float32",
                trainable=True,
            )
            variables = spec.variant.create_variables(
                self, spec, lora_a, lora_b
            )
            extra_factors = self._create_extra_factors(spec)
        self._adapters.add(Adapter(
            spec, lora_a, lora_b, extra_factors=extra_factors, **variables
        ))

    def _create_extra_factors(self, spec):
        """The pairs of `extra_factor_kernels`, in the adapter's name scope."""
        factors = {}
        for prefix, (kernel, contracted, free) in (
            self.extra_factor_kernels(self.base_layer).items()
        ):
            shapes = self.extra_factor_shapes(self.base_layer, spec.rank)
            names = (prefix + "lora_a", prefix + "lora_b")
            initial = (RankFirst(spec.lora_a_initializer), spec.lora_b_initializer)
            with adapter_layout_scope(kernel, contracted, free, names=names):
                for name, initializer in zip(names, initial):
                    factors[name] = self.add_weight(
                        name=name, shape=shapes[name], initializer=initializer,
                        dtype="float32", trainable=True,
                    )
        return factors

    def _check_initial_values(self):
        """Refuses an initializer that drew NaN or infinite adapters (run
        eagerly, where the layer adopts a built base: a drop-in layer may be
        built inside a symbolic trace, where values cannot be read)."""
        for adapter in self._adapters.values():
            for variable, initializer in (
                (adapter.lora_a, adapter.spec.lora_a_initializer),
                (adapter.lora_b, adapter.spec.lora_b_initializer),
            ) + tuple(adapter.variant.initial_variables(adapter)):
                if not bool(ops.convert_to_numpy(ops.all(ops.isfinite(variable)))):
                    raise ValueError(
                        f"{type(self).__name__} for layer '{self.name}': the "
                        f"initial {variable.name} of adapter '{adapter.name}' "
                        "holds NaN or infinite values. Received: "
                        f"{variable.name}_initializer="
                        f"{initializers.serialize(initializer)!r}"
                    )

    def build(self, input_shape):
        if not self.base_layer.built:
            # Build the base beside the wrapper, not inside its name scope,
            # so its kernel is "<parent>/dense/kernel" as for a plain Dense
            # (not ".../dense/dense/kernel"), whether the layer was made
            # drop-in, from a config or loaded from a `.keras` file.
            if self.base_layer._parent_path is None:
                self.base_layer._parent_path = self._parent_path
            self.base_layer.build(input_shape)
        self._freeze_base()
        self._create_adapters()

    def get_build_config(self):
        return self.base_layer.get_build_config()

    def build_from_config(self, config):
        if config and not self.built:
            self.build(config["input_shape"])

    # Compute --------------------------------------------------------------

    @property
    def kernel(self):
        """The base layer's (frozen) kernel variable (see `base_kernel`)."""
        return self.base_kernel(self.base_layer)

    @property
    def bias(self):
        """The base layer's bias variable, or `None`."""
        return getattr(self.base_layer, "bias", None)

    def call(self, inputs, training=None):
        outputs = self._preactivation(inputs, training)
        activation = getattr(self.base_layer, "activation", None)
        if activation is not None:
            outputs = activation(outputs)
        return outputs

    def _preactivation(self, inputs, training):
        router = batch_routing.current()
        if router is not None and self.adapter_enabled and not self.merged:
            # A mixed batch: each example takes its own adapter.
            base = self._base_preactivation(inputs)
            return router.apply(self, base, inputs, training)
        applied = self._applied_adapters()
        fused = self._fused_output(inputs, training, applied)
        if fused is not None:
            # One plain adapter on the layer's own input: base and update
            # as one kernel (`keras_lora/layers/fused_kernels.py`).
            return fused
        # Each active adapter's variant adds its own term (see
        # `keras_lora/layers/variants.py`).
        base = self._base_preactivation(inputs)
        outputs = base
        for adapter in applied:
            outputs = adapter.variant.add_output(
                self, outputs, base, inputs, training, adapter
            )
        return outputs

    def _fused_output(self, inputs, training, applied):
        """The pre-activation as one fused kernel, or `None`.

        Fused when the backend has the kernel, exactly one adapter
        applies (`applied`, from `_applied_adapters`), its variant adds a plain update
        (`variant.fuses_with_base`), its dropout is off in this call, the
        base is a float layer and its kernel has a 2-D view
        (`_fused_layout`).
        """
        if not fused_kernels.ENABLED or len(applied) != 1:
            return None
        adapter = applied[0]
        if not adapter.variant.fuses_with_base:
            return None
        if training and adapter.dropout > 0:
            return None
        if self.base_layer.quantization_mode is not None:
            return None
        layout = self.__dict__.get("_fused_layout_value")
        if layout is None:
            # Static once built: computed on the first call, kept outside
            # Keras's attribute tracking.
            layout = self._fused_layout() or ()
            object.__setattr__(self, "_fused_layout_value", layout)
        if not layout:
            return None
        matrix_shape, contracted_ndim, free_shape = layout
        bias = self.base_layer.bias
        return fused_kernels.dense_with_update(
            inputs,
            self.base_layer.kernel.value,
            None if bias is None else bias.value,
            adapter.lora_a.value,
            adapter.lora_b.value,
            adapter.scaling,
            matrix_shape,
            len(inputs.shape) - contracted_ndim,
            free_shape,
        )

    def _fused_layout(self):
        """`(kernel matrix shape or None, number of contracted axes, free
        shape)` for `_fused_output` (the kernel seen as `(d_in, d_out)`, a
        bias as `(d_out,)`), or `None` where this layer has no fused path."""
        return None

    def _applied_adapters(self):
        """The adapters `call` applies: the active ones this layer has
        (none while adapters are disabled or merged)."""
        if not self.adapter_enabled or self.merged:
            return []
        return [self._adapters[n] for n in self._present(self.active_adapters)]

    def _factors_for(self, inputs, training, adapter):
        """`(lora input, A, B)` of one adapter: the (dropped-out) input, and
        `A`, `B` in its compute dtype."""
        x = self._lora_input(inputs, training, adapter.dropout)
        reference = x if is_float(x) else None
        return (
            x,
            self._in_compute_dtype(adapter.lora_a, reference),
            self._in_compute_dtype(adapter.lora_b, reference),
        )

    def _lora_terms(self, inputs, training):
        """`(lora input, A, B, scaling)` of each applied adapter, for layer
        types that apply plain LoRA updates themselves (a tied embedding's
        reverse projection)."""
        return [
            self._factors_for(inputs, training, adapter) + (adapter.scaling,)
            for adapter in self._applied_adapters()
        ]

    def _lora_input(self, inputs, training, dropout):
        """The LoRA path's input: `inputs` with dropout while training."""
        if training and dropout > 0:
            return keras.random.dropout(inputs, dropout, seed=self.seed_generator)
        return inputs

    def _in_compute_dtype(self, variable, x):
        """`variable` as a tensor in `x`'s dtype (the layer's compute dtype
        when `x` is `None` or not a float tensor)."""
        value = ops.convert_to_tensor(variable)
        dtype = (
            keras.backend.standardize_dtype(x.dtype) if x is not None
            else self.compute_dtype
        )
        if keras.backend.standardize_dtype(value.dtype) != dtype:
            value = ops.cast(value, dtype)
        return value

    def compute_output_shape(self, input_shape):
        return self.base_layer.compute_output_shape(input_shape)

    # Merging --------------------------------------------------------------

    def delta_kernel(self, adapter_names=None):
        """Returns `Σ scaling · A·B` in the base kernel's shape, as float32.

        Args:
            adapter_names: the adapters to sum; default: the active ones
                this layer has.
        """
        names = self._present(
            self.active_adapters if adapter_names is None else adapter_names
        )
        delta = None
        for name in names:
            adapter = self._adapters[name]
            term = adapter.variant.kernel_delta(self, adapter)
            delta = term if delta is None else ops.add(delta, term)
        if delta is None:
            return ops.zeros(self.kernel_shape(self.base_layer), "float32")
        return delta

    def _scaled_delta_kernel(self, adapter):
        """`scaling · A·B` of one adapter, laid out like the kernel, float32."""
        return ops.multiply(
            self._delta_kernel(
                ops.convert_to_tensor(adapter.lora_a.value),
                ops.convert_to_tensor(adapter.lora_b.value),
            ),
            adapter.scaling,
        )

    def merged_kernel(self):
        """Returns `W + Σ_active scaling · A·B` in the kernel's dtype.

        For an int8 / int4 base: `W_deq + Σ scaling · A·B` as float32, with
        `W_deq` the dequantized kernel (`merge_lora` quantizes it again).

        Raises:
            ValueError: if the update, or the merged kernel in the kernel's
                dtype (a float16 kernel overflows past 65504), holds a NaN
                or an infinity.
        """
        delta = self._finite_delta()
        if quantized.mode_of(self.base_layer) is not None:
            return ops.add(quantized.dequantized_kernel(self.base_layer), delta)
        kernel = ops.convert_to_tensor(self.kernel.value)
        merged = ops.cast(ops.add(ops.cast(kernel, "float32"), delta), kernel.dtype)
        if not bool(ops.convert_to_numpy(ops.all(ops.isfinite(merged)))):
            raise ValueError(
                f"Layer '{self.name}': the merged kernel W + scaling·A·B "
                f"overflows its dtype {keras.backend.standardize_dtype(kernel.dtype)} "
                "(NaN or infinite entries); refusing to merge. Nothing was "
                "changed."
            )
        return merged

    def merged_weights(self):
        """`[(variable, merged value)]` of every base weight a merge changes.

        The kernel and `merged_kernel()` (checked as it does); on an int8 /
        int4 base, its quantized variables holding `W_deq + s·A·B`
        quantized again with the base's mode and config (see
        `keras_lora/layers/quantized.py`); a layer type with
        `extra_factor_kernels` adds those kernels.
        """
        if quantized.mode_of(self.base_layer) is not None:
            return quantized.merged_weights(self)
        return [(self.kernel, self.merged_kernel())]

    def _finite_delta(self):
        delta = self.delta_kernel()
        if not bool(ops.convert_to_numpy(ops.all(ops.isfinite(delta)))):
            raise ValueError(
                f"Layer '{self.name}': the LoRA update holds NaN or infinite "
                "values; refusing to merge it into the kernel."
            )
        return delta

    def merge(self):
        """Folds the active adapters' `scaling · A·B` into the kernel in place.

        While merged, `call` skips the low-rank path, so inference costs what
        the base layer costs. The kernel is shared with the base model, which
        sees the merged kernel too. `unmerge()` subtracts the same updates
        again, which restores the kernel up to float rounding (a few ulps).
        """
        if self.merged:
            return
        if quantized.mode_of(self.base_layer) is not None:
            raise quantized.merge_refused(self)
        if not self.adapter_enabled:
            raise ValueError(
                f"Layer '{self.name}': its adapter is disabled, so merging it "
                "would change what the layer computes; call "
                "`enable_adapter()` first."
            )
        names = self._present(self.active_adapters)
        # What each variant needs to undo its merge (DoRA: its factors).
        self._merge_records = {
            name: self._adapters[name].variant.merge_record(
                self, self._adapters[name]
            )
            for name in names
        }
        self.kernel.assign(self.merged_kernel())
        self._merged_names = names
        self.merged = True

    def unmerge(self):
        """Subtracts the merged updates from the kernel, undoing `merge()`."""
        if not self.merged:
            return
        kernel = self.kernel
        value = ops.convert_to_tensor(kernel.value)
        # The merged kernel is `W·(1 + Σc) + Σu` over the merged adapters.
        records = getattr(self, "_merge_records", None) or {}
        rest, scale = ops.cast(value, "float32"), None
        for name in self._merged_names:
            adapter = self._adapters[name]
            c, u = adapter.variant.unmerge_parts(self, adapter, records.get(name))
            rest = ops.subtract(rest, u)
            if c is not None:
                scale = ops.add(1.0, c) if scale is None else ops.add(scale, c)
        restored = rest if scale is None else ops.divide(rest, scale)
        kernel.assign(ops.cast(restored, value.dtype))
        self.merged = False
        self._merged_names = ()
        self._merge_records = {}

    def enable_adapter(self):
        """Turns the low-rank path on (the default); see `disable_adapter`."""
        self.adapter_enabled = True
        _reset_owner_functions(self)

    def disable_adapter(self):
        """Turns the low-rank path off: the layer computes the base output.

        A traced `predict` / `fit` (JAX, TensorFlow) has the flag baked in,
        so the traced functions of the models this layer was adapted in
        (by `apply_lora` / `load_adapter`) are reset and re-trace on their
        next call. For a LoRA layer placed in a model by hand, call
        `keras_lora.disable_adapters(model)` instead, which resets that
        model's functions.
        """
        self.adapter_enabled = False
        _reset_owner_functions(self)

    # Serialization --------------------------------------------------------

    def get_config(self):
        config = super().get_config()
        primary = self._specs[0].get_config()
        config.update(
            {
                "base_layer": keras.saving.serialize_keras_object(
                    self.base_layer
                ),
                "rank": primary["rank"],
                "alpha": primary["alpha"],
                "dropout": primary["dropout"],
                "use_rslora": primary["use_rslora"],
                "lora_a_initializer": primary["lora_a_initializer"],
                "lora_b_initializer": primary["lora_b_initializer"],
                "use_dora": primary["use_dora"],
                "init": primary["init"],
                "train_bias": self.train_bias,
                "adapter_enabled": self.adapter_enabled,
                "merged": self.merged,
            }
        )
        if len(self._specs) > 1 or primary["name"] != DEFAULT_ADAPTER or (
            self.active_adapters != (primary["name"],)
        ):
            config["adapter_name"] = primary["name"]
            config["extra_adapters"] = [s.get_config() for s in self._specs[1:]]
            config["active_adapters"] = list(self.active_adapters)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["base_layer"] = keras.saving.deserialize_keras_object(
            config["base_layer"]
        )
        return cls(**config)
