"""LoRA+: train the adapters' B matrices at a higher learning rate.

LoRA+ (Hayou et al., 2024) trains every `lora_b` at `lr_ratio` times the
learning rate of everything else. Keras optimizers have no parameter
groups, and Adam is invariant to the scale of a gradient, so scaling B's
gradients would change nothing. `LoRAPlusOptimizer` instead keeps one
wrapped optimizer (one set of slots, one `iterations`, one global clip
norm) and hands its update rule the two learning rates: the ordinary one
for most variables, `lr_ratio` times it for B, read at each step so
schedules and `optimizer.learning_rate = ...` (callbacks) carry over.
"""

import math

import keras
from keras import ops

_B_NAME = "lora_b"


def is_lora_b(variable):
    """Whether `variable` is an adapter's B matrix (named `lora_b`).

    Dense, EinsumDense, Conv and Embedding LoRA layers all name their B
    variables `lora_b`, and so does every named adapter beside the first,
    so the name identifies them on every backend and after a reload; an
    untied `ReversibleEmbedding`'s second pair names its B `reverse_lora_b`.

    Args:
        variable: a Keras (or backend) variable.

    Returns:
        bool.

    Example:

    >>> import keras
    >>> from keras_lora.loraplus import is_lora_b
    >>> is_lora_b(keras.Variable(0.0, name="lora_b"))
    True
    """
    name = getattr(variable, "name", None) or ""
    # A backend variable may read "scope/lora_b:0".
    short = name.split("/")[-1].split(":")[0]
    # An extra pair's B (an untied ReversibleEmbedding's `reverse_lora_b`).
    return short == _B_NAME or short.endswith("_" + _B_NAME)


def _check_lr_ratio(lr_ratio):
    if (
        isinstance(lr_ratio, bool)
        or not isinstance(lr_ratio, (int, float))
        or not math.isfinite(lr_ratio)
        or lr_ratio <= 0
    ):
        raise ValueError(
            "`lr_ratio` must be a positive finite number (LoRA+ trains B at "
            "`lr_ratio` times the learning rate; the paper uses 16). "
            f"Received: lr_ratio={lr_ratio!r}"
        )
    return float(lr_ratio)


def _get_optimizer(optimizer):
    if isinstance(optimizer, str):
        try:
            optimizer = keras.optimizers.get(optimizer)
        except ValueError:
            raise ValueError(
                "`optimizer` must be a `keras.optimizers.Optimizer` or the "
                "name of one, such as 'adam'. "
                f"Received: optimizer={optimizer!r}"
            ) from None
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise ValueError(
            "`optimizer` must be a `keras.optimizers.Optimizer` or the name "
            f"of one, such as 'adam'. Received: optimizer={optimizer!r}"
        )
    if isinstance(
        optimizer, (LoRAPlusOptimizer, keras.optimizers.LossScaleOptimizer)
    ) or hasattr(optimizer, "_loraplus_ratio"):
        raise ValueError(
            "`optimizer` must be a plain optimizer, not one already wrapped "
            "by LoRA+ or a `LossScaleOptimizer` (wrap the plain optimizer "
            "first; `compile` adds loss scaling around LoRA+ itself). "
            f"Received: optimizer={optimizer!r}"
        )
    return optimizer


def _split(grads, variables):
    """Splits aligned (grads, variables) into (others, B) pairs of lists."""
    others, b = ([], []), ([], [])
    for grad, variable in zip(grads, variables):
        group = b if is_lora_b(variable) else others
        group[0].append(grad)
        group[1].append(variable)
    return others, b


def _install_two_rates(optimizer, lr_ratio):
    """Makes `optimizer` update B variables at `lr_ratio` x its rate.

    Every backend's optimizer routes a step through
    `_backend_update_step(grads, variables, learning_rate)` (torch's fused
    Adam and TF's distributed step included) and decoupled weight decay
    through `_apply_weight_decay(variables)`; splitting the variables there
    keeps the rest of `apply` (clipping, accumulation, EMA, iterations)
    shared by both groups.
    """
    update_step = optimizer._backend_update_step
    apply_weight_decay = optimizer._apply_weight_decay

    def _backend_update_step(grads, trainable_variables, learning_rate):
        (grads_rest, rest), (grads_b, b) = _split(grads, trainable_variables)
        if rest:
            update_step(grads_rest, rest, learning_rate)
        if b:
            update_step(grads_b, b, ops.multiply(learning_rate, lr_ratio))

    def _apply_weight_decay(variables):
        (_, rest), (_, b) = _split(variables, variables)
        apply_weight_decay(rest)
        if optimizer.weight_decay is None:
            return
        for variable in b:
            if optimizer._use_weight_decay(variable):
                lr = ops.cast(optimizer.learning_rate, variable.dtype)
                wd = ops.cast(optimizer.weight_decay, variable.dtype)
                variable.assign(variable - variable * wd * lr * lr_ratio)

    optimizer._backend_update_step = _backend_update_step
    optimizer._apply_weight_decay = _apply_weight_decay
    optimizer._loraplus_ratio = lr_ratio


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRAPlusOptimizer(keras.optimizers.Optimizer):
    """An optimizer that trains `lora_b` at `lr_ratio` x the learning rate.

    Build it with `keras_lora.loraplus_optimizer`. It applies the wrapped
    optimizer's update rule, slots and settings (clipping, weight decay,
    EMA, gradient accumulation) to every variable, with the learning rate
    multiplied by `lr_ratio` for adapters' B matrices (variables named
    `lora_b`). `learning_rate`, `iterations` and `variables` are the
    wrapped optimizer's.

    Args:
        optimizer: the `keras.optimizers.Optimizer` to wrap (taken over:
            use it only through this wrapper), or its name ("adam").
        lr_ratio: positive float, B's learning rate over everyone else's.
        name: optional name of the wrapper.
    """

    def __init__(self, optimizer, lr_ratio=16.0, name=None, **kwargs):
        if kwargs:
            raise ValueError(
                "LoRA+ takes the optimizer's settings from the optimizer it "
                "wraps; set them there. Received: "
                + ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
            )
        lr_ratio = _check_lr_ratio(lr_ratio)
        optimizer = _get_optimizer(optimizer)
        super().__init__(learning_rate=0.0, name=name or "loraplus")
        self.inner_optimizer = optimizer
        self.lr_ratio = lr_ratio
        _install_two_rates(optimizer, lr_ratio)

    def build(self, var_list):
        if not self.inner_optimizer.built:
            self.inner_optimizer.build(var_list)
        super().build(var_list)

    @property
    def variables(self):
        return self.inner_optimizer.variables

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            self.build(trainable_variables)
        self.inner_optimizer.apply(grads, trainable_variables)

    def apply_gradients(self, grads_and_vars):
        grads, trainable_variables = zip(*grads_and_vars)
        self.apply(list(grads), list(trainable_variables))
        return self.iterations

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        return self.inner_optimizer.stateless_apply(
            optimizer_variables, grads, trainable_variables
        )

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self):
        return {
            "name": self.name,
            "optimizer": keras.optimizers.serialize(self.inner_optimizer),
            "lr_ratio": self.lr_ratio,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        optimizer = keras.optimizers.deserialize(
            config.pop("optimizer"), custom_objects=custom_objects
        )
        return cls(optimizer, **config)


def loraplus_optimizer(optimizer, lr_ratio=16.0):
    """Wraps an optimizer so adapters' B matrices train `lr_ratio` x faster.

    LoRA+ (Hayou et al., 2024): with B at a higher learning rate than A,
    LoRA fine-tuning converges faster; the paper recommends 16 for most
    tasks. Every variable named `lora_b` (Dense, EinsumDense, Conv and
    Embedding adapters, every named adapter) uses the wrapped optimizer's
    rule at `lr_ratio` x its learning rate (schedules included); every
    other trainable variable uses it unchanged. Unlike PEFT's
    `create_loraplus_optimizer`, biases and DoRA magnitudes keep the base
    rate, and embedding adapters' B gets the ratio too.

    Args:
        optimizer: a `keras.optimizers.Optimizer` (with its learning rate
            or schedule, weight decay, clipping ...), or its name ("adam").
            The wrapper takes it over: do not also use it on its own.
        lr_ratio: positive finite float, B's learning rate over A's.

    Returns:
        A `keras.optimizers.Optimizer` to pass to `model.compile`; it is
        saved with the model's compile config.

    Example:

    >>> import keras, keras_lora
    >>> optimizer = keras_lora.loraplus_optimizer(
    ...     keras.optimizers.Adam(1e-3), lr_ratio=16.0)
    >>> optimizer.lr_ratio
    16.0
    >>> round(float(optimizer.learning_rate), 6)  # A's; B's is 16x
    0.001
    """
    return LoRAPlusOptimizer(optimizer, lr_ratio=lr_ratio)
