"""Whole-model `.keras` files that keep their adapters, wherever they sit.

Keras re-creates a layer's sub-layers from the layer's own code when it
loads a `.keras` file, so a LoRA layer swapped *inside* another layer (an
attention block, a keras-hub transformer layer, a custom block) would come
back as the plain layer it replaced, and the file's weights would no longer
fit. A keras-lora model file is therefore the *base view* of the model
(every LoRA layer swapped back to its base layer for the duration of the
save) plus the adapter, as a safetensors file inside the same zip archive
(`keras_lora/adapter.safetensors`). Loading it with keras-lora re-applies
the adapter; plain Keras, without keras-lora imported, reads the same file
as the base model.

The optimizer state is dropped: it belongs to the LoRA variables, which
the base view does not have. The base view is saved uncompiled (plain
Keras loads an uncompiled base model, without warnings); the compile
settings travel as `keras_lora/compile_config.json`, and a keras-lora load
compiles the adapted model with them and a fresh optimizer.

`save_model` / `load_model` are the explicit entry points; with keras-lora
imported, `model.save`, `keras.saving.load_model`, `ModelCheckpoint` and
`model.load_weights` reach this code or are checked against it (see
`keras_lora.keras_hooks`).
"""

import contextlib
import io
import json
import os
import shutil
import tempfile
import zipfile

import keras

from keras_lora import adapters
from keras_lora import file_swap
from keras_lora import keras_hooks
from keras_lora import layer_swap
from keras_lora import multi
from keras_lora.surgery import lora_entries

ADAPTER_MEMBER = "keras_lora/adapter.safetensors"
# A model with several adapters: the first in ADAPTER_MEMBER, the others as
# keras_lora/adapters/<name>.safetensors; names and active ones in JSON.
ADAPTERS_DIRECTORY = "keras_lora/adapters"
ADAPTER_NAMES_MEMBER = "keras_lora/adapter_names.json"
COMPILE_MEMBER = "keras_lora/compile_config.json"
# Temporary directories beside the target: `.<name>.keras_lora-<pid>-<random>`.
_STAGING_TAG = ".keras_lora-"


def save_model(model, path):
    """Saves an adapted model to a `.keras` file, adapters included.

    The archive is the base model as Keras writes it (so any Keras can load
    it as the base) plus the adapter under `keras_lora/adapter.safetensors`.
    The write is atomic: the archive is written in a temporary directory
    beside `path` and renamed over it, so an interrupted save leaves the
    previous file or none. A killed save can leave that directory behind,
    `.<file name>.keras_lora-<pid>-<random>`; the next successful save to
    the same path removes such leftovers of dead processes. Merged adapters
    (`merge_adapters`) are taken out of the kernels for the save and put
    back afterwards, so the file holds the true base. The optimizer state
    is not stored (see the module docstring). `model.save(path)` does the
    same when keras-lora is imported.

    Args:
        model: a Keras model with LoRA layers.
        path: the `.keras` file to write; its directory must exist.

    Returns:
        The absolute path written.

    Example:

    >>> model = apply_lora(model, rank=8)  # doctest: +SKIP
    >>> save_model(model, "checkpoint.keras")  # doctest: +SKIP
    >>> restored = load_model("checkpoint.keras")  # doctest: +SKIP
    """
    target = _check_target(path, "save_model")
    entries = lora_entries(model)
    if not entries:
        raise ValueError(
            f"save_model: model '{model.name}' has no LoRA layers; use "
            "`model.save(path)`."
        )
    _write_archive(model, entries, target, weights_format="h5")
    return target


def needs_base_view(model):
    """Whether Keras's own `.keras` file would lose some of `model`'s adapters.

    LoRA layers that are nodes of plain functional or `Sequential` models
    serialize themselves (registered classes): Keras rebuilds those graphs
    from the layers' configs. A LoRA layer held by anything else (a custom
    layer, `MultiHeadAttention`, a subclassed model, a keras-hub backbone,
    which rebuilds itself from its constructor arguments) comes back as its
    base layer, so such models need the base view plus the adapter.
    """
    from keras.src.models.functional import Functional

    plain_graphs = (Functional, keras.Sequential)
    return any(
        type(parent) not in plain_graphs
        for entry in lora_entries(model)
        for parent in entry.parents
    )


def write_model(model, filepath, weights_format="h5", zipped=True):
    """`keras.src.saving.saving_lib.save_model` for a model with LoRA layers.

    Writes what `save_model` writes, to a `.keras` path or a binary file
    object. Keras's unzipped directories and `hf://` paths are refused
    (their loaders do not read the adapter member).
    """
    entries = lora_entries(model)
    if isinstance(filepath, io.IOBase):
        with tempfile.TemporaryDirectory() as tmp:
            archive = os.path.join(tmp, "model.keras")
            _write_archive(model, entries, archive, weights_format)
            with open(archive, "rb") as handle:
                shutil.copyfileobj(handle, filepath)
        return None
    text = str(filepath)
    if not zipped or text.startswith(("hf://", "gs://", "s3://")):
        raise ValueError(
            f"Saving model '{model.name}', which holds LoRA layers, works to a "
            "local `.keras` file only: the base model plus its adapter. Save "
            "the merged model, `keras_lora.merge_lora(model).save(...)`, or "
            "the adapter, `keras_lora.save_adapter(model, path)`. Received: "
            f"filepath={text!r}, zipped={zipped}"
        )
    target = _check_target(filepath, "model.save")
    _write_archive(model, entries, target, weights_format)
    return None


def _check_target(path, caller):
    target = os.path.abspath(os.fspath(path))
    if not target.endswith(".keras"):
        raise ValueError(
            f"{caller} writes `.keras` files. Received: path={path!r}"
        )
    if not os.path.isdir(os.path.dirname(target)):
        raise FileNotFoundError(
            f"{caller}: the directory of '{path}' does not exist. "
            "Create it first."
        )
    if os.path.isdir(target):
        raise IsADirectoryError(
            f"{caller}: '{target}' is a directory; a `.keras` model file "
            f"cannot replace it. Remove it or choose another path. Received: "
            f"path={path!r}"
        )
    return target


def _write_archive(model, entries, target, weights_format):
    directory, name = os.path.split(target)
    prefix = f".{name}{_STAGING_TAG}{os.getpid()}-"
    staging = tempfile.mkdtemp(dir=directory, prefix=prefix)
    try:
        names = multi.list_adapters(model)
        adapter_file = adapters.save_adapter(
            model, os.path.join(staging, "adapter.safetensors"),
            adapter_name=names[0],
        )
        others = {
            name: adapters.save_adapter(
                model, os.path.join(staging, f"{name}.safetensors"),
                adapter_name=name,
            )
            for name in names[1:]
        }
        archive = os.path.join(staging, "model.keras")
        compile_config = (
            model.get_compile_config() if getattr(model, "compiled", False)
            else None
        )
        with _base_view(model, entries):
            keras_hooks.original(_saving_lib().save_model)(
                model, archive, weights_format=weights_format
            )
        with zipfile.ZipFile(archive, "a") as handle:
            handle.write(adapter_file, ADAPTER_MEMBER)
            for name, other in others.items():
                handle.write(other, f"{ADAPTERS_DIRECTORY}/{name}.safetensors")
            handle.writestr(ADAPTER_NAMES_MEMBER, json.dumps({
                "adapters": names, "active": multi.active_adapters(model),
            }))
            if compile_config:
                handle.writestr(COMPILE_MEMBER, json.dumps(compile_config))
        os.replace(archive, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    file_swap.remove_stale(directory, f".{name}{_STAGING_TAG}")


def load_model(path, custom_objects=None, compile=True, safe_mode=True):
    """Loads a `.keras` file; re-applies its keras-lora adapter if it has one.

    `keras.saving.load_model(path)` does the same when keras-lora is
    imported.

    Args:
        path: a `.keras` file (from `save_model`, or any Keras model file).
        custom_objects: as for `keras.saving.load_model`.
        compile: as for `keras.saving.load_model`.
        safe_mode: as for `keras.saving.load_model`.

    Returns:
        The model, adapted exactly as it was saved, with its adapter
        weights, and compiled with the saved settings (a fresh optimizer:
        optimizer state is not restored).

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: if `path` is not a readable `.keras` archive (a
            directory, a truncated or foreign file); the message names it.
    """
    path = os.fspath(path)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"load_model: no such file: '{path}'.")
    if os.path.isdir(path) or not zipfile.is_zipfile(path):
        raise ValueError(
            f"load_model: '{path}' is not a `.keras` archive (a zip file "
            f"written by `model.save` or `keras_lora.save_model`)."
        )
    try:
        with zipfile.ZipFile(path) as handle:
            handle.getinfo("config.json")
    except (zipfile.BadZipFile, KeyError, OSError) as error:
        raise ValueError(
            f"load_model: '{path}' is not a readable `.keras` archive "
            f"({type(error).__name__}: {error})."
        ) from error
    if not holds_adapter(path):
        return keras_hooks.original(_saving_lib().load_model)(
            path, custom_objects, compile, safe_mode
        )
    return read_model(path, custom_objects, compile, safe_mode)


def holds_adapter(filepath):
    """Whether `filepath` (a path or binary file object) holds an adapter."""
    return _adapter_bytes(filepath, probe=True) is not None


def read_model(filepath, custom_objects=None, compile=True, safe_mode=True):
    """`saving_lib.load_model` for a file that holds a keras-lora adapter."""
    adapter_bytes = _adapter_bytes(filepath)
    if isinstance(filepath, io.IOBase):
        filepath.seek(0)
        compile_config = _compile_config(filepath)
        filepath.seek(0)
    else:
        compile_config = _compile_config(filepath)
    # The base view comes back first; the adapter, then compile (the saved
    # optimizer belongs to the base view).
    model = keras_hooks.original(_saving_lib().load_model)(
        filepath, custom_objects, False, safe_mode
    )
    with tempfile.TemporaryDirectory() as tmp:
        adapter_file = os.path.join(tmp, "adapter.safetensors")
        with open(adapter_file, "wb") as handle:
            handle.write(adapter_bytes)
        names = _adapter_names(filepath)
        try:
            adapters.load_adapter(
                model, adapter_file,
                adapter_name=names["adapters"][0] if names else None,
            )
            for name in (names or {}).get("adapters", [])[1:]:
                member = f"{ADAPTERS_DIRECTORY}/{name}.safetensors"
                other = os.path.join(tmp, f"{name}.safetensors")
                with open(other, "wb") as handle:
                    handle.write(_member_bytes(filepath, member))
                adapters.load_adapter(model, other, adapter_name=name)
            if names:
                multi.set_adapter(model, names["active"])
        except ValueError as error:
            raise ValueError(
                f"Loading '{_describe(filepath)}': its adapter "
                f"({ADAPTER_MEMBER}) does not load onto the model it holds. "
                f"{str(error).replace(adapter_file, ADAPTER_MEMBER)}"
            ) from error
    if compile and compile_config:
        with keras.saving.custom_object_scope(custom_objects or {}):
            model.compile(**keras.saving.deserialize_keras_object(compile_config))
    return model


def _adapter_bytes(source, probe=False):
    if isinstance(source, io.IOBase):
        if not (source.readable() and source.seekable()):
            return None
        position = source.tell()
        try:
            if not zipfile.is_zipfile(source):
                return None
            source.seek(position)
            with zipfile.ZipFile(source) as handle:
                if ADAPTER_MEMBER not in handle.namelist():
                    return None
                return b"" if probe else handle.read(ADAPTER_MEMBER)
        finally:
            source.seek(position)
    path = os.fspath(source) if isinstance(source, os.PathLike) else source
    if not isinstance(path, str) or not os.path.isfile(path):
        return None
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as handle:
        if ADAPTER_MEMBER not in handle.namelist():
            return None
        return b"" if probe else handle.read(ADAPTER_MEMBER)


def _member_bytes(source, member):
    if isinstance(source, io.IOBase):
        position = source.tell()
        try:
            source.seek(0)
            with zipfile.ZipFile(source) as handle:
                return handle.read(member)
        finally:
            source.seek(position)
    with zipfile.ZipFile(source) as handle:
        return handle.read(member)


def _adapter_names(source):
    """`{"adapters": [...], "active": [...]}`, or `None` for files written
    before models held several adapters (one adapter, "default")."""
    try:
        return json.loads(_member_bytes(source, ADAPTER_NAMES_MEMBER))
    except KeyError:
        return None


def _describe(source):
    return getattr(source, "name", None) or str(source)


def _compile_config(source):
    with zipfile.ZipFile(source) as handle:
        if COMPILE_MEMBER in handle.namelist():
            return json.loads(handle.read(COMPILE_MEMBER))
        # Files of earlier versions kept it in the base view's config.
        return json.loads(handle.read("config.json")).get("compile_config")


def _saving_lib():
    from keras.src.saving import saving_lib

    return saving_lib


@contextlib.contextmanager
def _base_view(model, entries):
    with _unmerged(entries), _base_layers_swapped_in(entries):
        with _uncompiled(model):
            yield


@contextlib.contextmanager
def _base_layers_swapped_in(entries):
    swapped = []
    try:
        for entry in entries:
            for parent in entry.parents:
                layer_swap.replace_layer(parent, entry.layer, entry.layer.base_layer)
                swapped.append((parent, entry.layer))
        yield
    finally:
        for parent, lora_layer in reversed(swapped):
            layer_swap.replace_layer(parent, lora_layer.base_layer, lora_layer)


@contextlib.contextmanager
def _uncompiled(model):
    """Hides the compile state (optimizer included) for the base view's save.

    The trained optimizer's slots are shaped like the LoRA variables, and
    which base variables a plain-Keras load would make trainable is decided
    by layer flags that need not match the LoRA model's: no optimizer state
    fits the base view exactly, so it carries none.
    """
    if not getattr(model, "compiled", False):
        yield
        return
    optimizer = model.optimizer
    model.compiled = False
    # An unbuilt copy: the step counter and learning rate only, what an
    # uncompiled load ignores and a keras-hub task (compiled by its own
    # constructor) expects.
    model.optimizer = type(optimizer).from_config(optimizer.get_config())
    try:
        yield
    finally:
        model.optimizer = optimizer
        model.compiled = True


@contextlib.contextmanager
def _unmerged(entries):
    merged = [e.layer for e in entries if e.layer.merged]
    for layer in merged:
        layer.unmerge()
    try:
        yield
    finally:
        for layer in merged:
            layer.merge()
