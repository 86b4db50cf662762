"""Named adapters: one low-rank update's numbers and variables.

A LoRA layer holds a frozen base layer and any number of named adapters;
each is an `Adapter` (its `AdapterSpec` plus its `lora_a` / `lora_b`
variables). Switching, combining and saving then work on names, and a
layer type never needs to know how many adapters exist.
"""

import collections.abc
import dataclasses
import keyword

from keras import initializers

from keras_lora import config as lora_config
from keras_lora import init_methods

DEFAULT_ADAPTER = "default"


def validate_adapter_name(name, where=""):
    """Returns `name` if it is a valid adapter name (a Python identifier).

    Args:
        name: the adapter name to check.
        where: a prefix for the error message.

    Returns:
        `name`.

    Raises:
        ValueError: if `name` is not a non-keyword identifier.

    Example:

    >>> validate_adapter_name("task_b")
    'task_b'
    """
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise ValueError(
            f"{where}an adapter name must be a Python identifier (letters, "
            f"digits, underscores; not a keyword). Received: adapter_name={name!r}"
        )
    return name


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """What defines one adapter before its variables exist."""

    name: str
    rank: int
    alpha: float
    use_rslora: bool = False
    dropout: float = 0.0
    lora_a_initializer: object = "he_uniform"
    lora_b_initializer: object = "zeros"
    use_dora: bool = False
    # How the adapter was initialized (see `keras_lora.init_methods`).
    init: str = "default"

    @classmethod
    def validated(cls, name, rank, alpha=None, use_rslora=False, dropout=0.0,
                  lora_a_initializer="he_uniform", lora_b_initializer="zeros",
                  use_dora=False, init="default", where=""):
        """An `AdapterSpec` from raw arguments, every value checked."""
        validate_adapter_name(name, where)
        rank = lora_config.validate_rank(rank, where)
        alpha = lora_config.validate_alpha(alpha, rank, where)
        dropout = lora_config.validate_dropout(dropout, where)
        use_rslora = lora_config.validate_bool(use_rslora, "use_rslora", where)
        lora_config.validate_scaling(rank, alpha, use_rslora, where)
        use_dora = lora_config.validate_bool(use_dora, "use_dora", where)
        init = init_methods.validate_init(init, where)
        return cls(
            name, rank, alpha, use_rslora, dropout,
            initializers.get(lora_a_initializer),
            initializers.get(lora_b_initializer),
            use_dora, init,
        )

    @property
    def scaling(self):
        return lora_config.scaling_for(self.rank, self.alpha, self.use_rslora)

    @property
    def variant(self):
        """The strategy applying this adapter (`keras_lora.layers.variants`)."""
        from keras_lora.layers import variants

        return variants.of_spec(self)

    def get_config(self):
        """A JSON-able dict that `from_config` turns back into this spec."""
        return {
            "name": self.name,
            "rank": self.rank,
            "alpha": self.alpha,
            "use_rslora": self.use_rslora,
            "dropout": self.dropout,
            "lora_a_initializer": initializers.serialize(self.lora_a_initializer),
            "lora_b_initializer": initializers.serialize(self.lora_b_initializer),
            "use_dora": self.use_dora,
            "init": self.init,
        }

    @classmethod
    def from_config(cls, config):
        return cls.validated(**config)


class Adapter:
    """One named adapter of a LoRA layer: its spec and its two variables.

    Attributes:
        name, rank, alpha, use_rslora, dropout, scaling, use_dora: from the
            spec.
        lora_a: variable `(rank,) + contracted axes` (float32).
        lora_b: variable `(rank,) + free axes` (float32).
        lora_magnitude: DoRA's trainable magnitude, shaped like the free
            axes (float32), or `None`.
        kernel_norm_sq: DoRA's `‖W_j‖²` per output unit, a non-trainable
            variable computed once from the frozen kernel, or `None`.
        initial_factors: `(A₀, B₀)` host copies for a PiSSA / OLoRA adapter
            (see `keras_lora.init_methods`), else `None`.
        extra_factors: `{name: variable}` of the further low-rank pairs a
            layer type gives each adapter, one pair per further kernel it
            updates (an untied `ReversibleEmbedding`'s `reverse_lora_a` /
            `reverse_lora_b`; see `LoRALayer.extra_factor_kernels`), float32
            and trainable, saved in adapter files as `"<layer path>/<name>"`;
            `{}` for most layer types.
    """

    def __init__(self, spec, lora_a, lora_b, lora_magnitude=None,
                 kernel_norm_sq=None, extra_factors=None):
        self.spec = spec
        self.lora_a = lora_a
        self.lora_b = lora_b
        self.lora_magnitude = lora_magnitude
        self.kernel_norm_sq = kernel_norm_sq
        self.extra_factors = dict(extra_factors or {})
        self.initial_factors = None

    name = property(lambda self: self.spec.name)
    rank = property(lambda self: self.spec.rank)
    alpha = property(lambda self: self.spec.alpha)
    use_rslora = property(lambda self: self.spec.use_rslora)
    dropout = property(lambda self: self.spec.dropout)
    scaling = property(lambda self: self.spec.scaling)
    use_dora = property(lambda self: self.spec.use_dora)
    variant = property(lambda self: self.spec.variant)
    init = property(lambda self: self.spec.init)

    @property
    def variables(self):
        """The trainable variables: `lora_a`, `lora_b` (and DoRA's magnitude),
        then the `extra_factors`."""
        extra = [self.lora_magnitude] if self.lora_magnitude is not None else []
        return [self.lora_a, self.lora_b] + extra + list(self.extra_factors.values())

    def __repr__(self):
        return f"<Adapter {self.name!r} rank={self.rank} alpha={self.alpha:g}>"


class AdapterSet(collections.abc.Mapping):
    """`{name: Adapter}` in creation order.

    Not a `dict`: Keras would wrap a dict attribute into its tracking
    structures.
    """

    def __init__(self):
        self._items = {}

    def __getitem__(self, name):
        return self._items[name]

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)

    def add(self, adapter):
        self._items[adapter.name] = adapter

    def __repr__(self):
        return f"AdapterSet({list(self._items)})"
