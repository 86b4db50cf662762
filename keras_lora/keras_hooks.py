"""Keras's own save / load / quantize / preset calls, made safe for LoRA models.

Keras re-creates a layer's sub-layers from the layer's own code when a
`.keras` file loads, so a model whose LoRA layers sit inside another layer
(a `MultiHeadAttention`, a list or dict of a subclassed model, any
keras-hub task) would be written by `model.save` as a file nobody can load.
Keras offers no public hook for `model.save` / `keras.saving.load_model`,
so `install()` (run by `import keras_lora`) wraps the functions that every
public entry point reaches by attribute lookup:

- `keras.src.saving.saving_lib.save_model` (`Model.save`,
  `keras.saving.save_model`, `ModelCheckpoint`): a model holding LoRA
  layers that Keras cannot re-create (any held by something other than a
  plain functional or `Sequential` model) is written as
  `keras_lora.save_model` writes it, the base model plus its adapter
  (`model_io`); any other model is passed through (LoRA layers that are
  nodes of a functional graph serialize themselves).
- `saving_lib.load_model` (`keras.saving.load_model`,
  `keras.models.load_model`): a file holding an adapter comes back adapted;
  any other file is passed through.
- `legacy_h5_format.save_model_to_hdf5` (`model.save("m.h5")`): refused
  for such models.
- `saving_lib.load_weights_only` (`Model.load_weights`): LoRA weights onto
  a model without those LoRA layers (and the reverse) are refused before
  anything is assigned, saying what to do.
- `keras.Model.quantize`: refused on a model holding LoRA layers (Keras
  would quantize the base layers under the adapters one by one); the
  message says to quantize the base before `apply_lora` instead.
- keras-hub's `Task.save_to_preset` / `Backbone.save_to_preset`: refused
  on a model holding LoRA layers, pointing to `merge_lora` and
  `save_adapter` (a preset loads through keras-hub's own code, which
  re-creates plain layers).

Wrapping is idempotent. Modules imported later (Keras itself, when
`keras_lora` is imported first; keras-hub) are wrapped as soon as they
are imported, so `import keras_lora` alone imports no backend.
"""

import functools
import importlib.abc
import importlib.util
import sys

_MARK = "_keras_lora_original"


def install():
    """Wraps Keras's (and keras-hub's) entry points; idempotent.

    Returns:
        None.
    """
    for module_name, patch in _PATCHES.items():
        module = sys.modules.get(module_name)
        if module is not None and getattr(module, "__spec__", None):
            patch(module)
    if not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


def original(function):
    """The unwrapped Keras function behind one of this module's wrappers."""
    return getattr(function, _MARK, function)


def _wrap(owner, name, make_wrapper):
    current = getattr(owner, name)
    if hasattr(current, _MARK):
        return
    wrapper = functools.wraps(current)(make_wrapper(current))
    setattr(wrapper, _MARK, current)
    setattr(owner, name, wrapper)


def _lora_paths(model):
    from keras_lora.surgery import lora_entries

    return [entry.path for entry in lora_entries(model)]


# saving_lib ---------------------------------------------------------------


def _patch_saving(saving_lib):
    _wrap(saving_lib, "save_model", _save_model_wrapper)
    _wrap(saving_lib, "load_model", _load_model_wrapper)
    _wrap(saving_lib, "load_weights_only", _load_weights_wrapper)


def _save_model_wrapper(keras_save_model):
    def save_model(model, filepath, weights_format="h5", zipped=True):
        from keras_lora import model_io

        if not model_io.needs_base_view(model):
            return keras_save_model(
                model, filepath, weights_format=weights_format, zipped=zipped
            )
        return model_io.write_model(
            model, filepath, weights_format=weights_format, zipped=zipped
        )

    return save_model


def _load_model_wrapper(keras_load_model):
    def load_model(filepath, custom_objects=None, compile=True, safe_mode=True):
        # Importing these registers keras-lora's serializable classes (LoRA
        # layers, the LoRA+ optimizer) for files that name them.
        from keras_lora import loraplus  # noqa: F401
        from keras_lora import model_io

        if not model_io.holds_adapter(filepath):
            return keras_load_model(filepath, custom_objects, compile, safe_mode)
        return model_io.read_model(filepath, custom_objects, compile, safe_mode)

    return load_model


def _load_weights_wrapper(keras_load_weights):
    def load_weights_only(model, filepath, skip_mismatch=False,
                          objects_to_skip=None):
        _check_weights_fit(model, filepath, _lora_paths(model))
        return keras_load_weights(
            model, filepath, skip_mismatch=skip_mismatch,
            objects_to_skip=objects_to_skip,
        )

    return load_weights_only


def _patch_legacy_h5(legacy_h5_format):
    _wrap(legacy_h5_format, "save_model_to_hdf5", _legacy_h5_wrapper)


def _legacy_h5_wrapper(keras_save_to_hdf5):
    def save_model_to_hdf5(model, filepath, *args, **kwargs):
        from keras_lora import model_io

        if model_io.needs_base_view(model):
            raise ValueError(
                f"Saving model '{model.name}', which holds LoRA layers inside "
                "other layers, to a legacy `.h5` file would lose them. Save "
                "to a `.keras` file instead (`model.save('model.keras')`). "
                f"Received: filepath={str(filepath)!r}"
            )
        return keras_save_to_hdf5(model, filepath, *args, **kwargs)

    return save_model_to_hdf5


def _check_weights_fit(model, filepath, model_lora_paths):
    """Refuses `load_weights` between LoRA and non-LoRA models up front.

    Raises:
        ValueError: if `filepath` holds LoRA weights and `model` has no LoRA
            layers, or the reverse; nothing is assigned.
    """
    from keras_lora.model_io import holds_adapter

    text = str(filepath)
    if text.endswith(".keras") and holds_adapter(filepath):
        raise ValueError(
            f"load_weights: '{text}' is a keras-lora model file (the base "
            "model plus an adapter). Load it with `keras.saving.load_model` "
            "(keras-lora imported), or save the adapter with `save_adapter` "
            f"and load it onto model '{model.name}' with `load_adapter`. "
            "Nothing was changed."
        )
    file_lora = _lora_groups(text) if text.endswith(".weights.h5") else None
    if file_lora is None:
        return
    if file_lora and not model_lora_paths:
        raise ValueError(
            f"load_weights: '{text}' holds the weights of a model with "
            f"{len(file_lora)} LoRA layers (e.g. '{file_lora[0]}'), but model "
            f"'{model.name}' has none. Apply the same LoRA first "
            "(`apply_lora(model, ...)` with the same arguments) and then "
            "load the weights, or use `save_adapter` / `load_adapter`, "
            "which apply it for you. Nothing was changed."
        )
    if model_lora_paths and not file_lora:
        raise ValueError(
            f"load_weights: '{text}' holds the weights of a model without "
            f"LoRA layers, but model '{model.name}' has "
            f"{len(model_lora_paths)} (e.g. '{model_lora_paths[0]}'). Load "
            "the base weights before `apply_lora`. Nothing was changed."
        )


def _lora_groups(path):
    """The LoRA layers' group paths in a `.weights.h5` file (or None)."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            names = []
            handle.visit(names.append)
    except OSError:
        return None  # Keras reports unreadable files itself.
    suffix = "/base_layer"
    return [n[: -len(suffix)] for n in names if n.endswith(suffix)]


# Model.quantize -----------------------------------------------------------


def _patch_model(model_module):
    _wrap(model_module.Model, "quantize", _quantize_wrapper)


def _quantize_wrapper(keras_quantize):
    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        paths = _lora_paths(self)
        if paths:
            raise ValueError(
                f"quantize: model '{self.name}' holds LoRA layers "
                f"({_sample(paths)}). Keras would quantize their base layers "
                "one by one under the adapters, which breaks the outputs. "
                "For LoRA on a quantized base (QLoRA-style), quantize the "
                "base first, then adapt it: `model.quantize(mode)` before "
                "`keras_lora.apply_lora(model)`. To quantize a trained LoRA "
                "model, merge it and quantize the merged model: "
                "`keras_lora.merge_lora(model).quantize(mode)`. Nothing was "
                f"changed. Received: mode={mode!r}"
            )
        return keras_quantize(self, mode, config=config, filters=filters,
                              **kwargs)

    return quantize


# keras-hub presets --------------------------------------------------------


def _patch_hub_class(class_name):
    def patch(module):
        _wrap(getattr(module, class_name), "save_to_preset",
              _save_to_preset_wrapper)

    return patch


def _save_to_preset_wrapper(hub_save_to_preset):
    def save_to_preset(self, preset_dir, *args, **kwargs):
        paths = _lora_paths(self)
        if paths:
            raise ValueError(
                f"save_to_preset: '{self.name}' holds LoRA layers "
                f"({_sample(paths)}), which keras-hub's `from_preset` would "
                "re-create as plain layers. Save the merged model as a "
                "preset, `keras_lora.merge_lora(model).save_to_preset(dir)`, "
                "and/or the adapter alone, `keras_lora.save_adapter(model, "
                "'adapter.safetensors')` (load it onto `from_preset(base)` "
                "with `load_adapter`). Nothing was written. Received: "
                f"preset_dir={preset_dir!r}"
            )
        return hub_save_to_preset(self, preset_dir, *args, **kwargs)

    return save_to_preset


def _sample(paths, limit=4):
    shown = ", ".join(f"'{p}'" for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit
                    else "")


_PATCHES = {
    "keras.src.saving.saving_lib": _patch_saving,
    "keras.src.legacy.saving.legacy_h5_format": _patch_legacy_h5,
    "keras.src.models.model": _patch_model,
    "keras_hub.src.models.task": _patch_hub_class("Task"),
    "keras_hub.src.models.backbone": _patch_hub_class("Backbone"),
}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Wraps a module's functions right after the module is executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _PatchingLoader(spec.loader, _PATCHES[fullname])
        return spec


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader, patch):
        self._loader = loader
        self._patch = patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._patch(module)

    def __getattr__(self, name):
        # `get_code`, `get_source`, ... for tools that introspect loaders.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._loader, name)
