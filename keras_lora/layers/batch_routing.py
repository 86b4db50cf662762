"""Which adapter each example of a batch uses, while a mixed batch runs.

`keras_lora.mixed_batch_model` runs one forward pass over a batch whose
examples use different adapters. The per-example adapter indices cannot be
threaded through the model's own call signatures (an attention block calls
its projections itself), so the mixed-batch model opens a `routed(router)`
block around its call; every LoRA layer called inside it (also while being
traced by `jit` / `tf.function`) hands its update to `router.apply(layer,
outputs, inputs, training)` instead of adding its active adapters.
"""

import contextlib

_ROUTERS = []


def current():
    """The router of the innermost open `routed` block, or `None`."""
    return _ROUTERS[-1] if _ROUTERS else None


@contextlib.contextmanager
def routed(router):
    """Routes every LoRA layer called in the block through `router`."""
    _ROUTERS.append(router)
    try:
        yield router
    finally:
        _ROUTERS.pop()
