"""The adapter file format: digests, layer keys, the strict header schema,
and how files are written (atomically, with the umask's mode, no leftovers)."""

import json
import os
import re
import stat

import keras
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from keras import layers

from keras_lora import adapter_file
from keras_lora import atomic_files
from keras_lora.adapter_file import read_adapter
from keras_lora.adapter_file import write_adapter_file
from keras_lora.adapters import save_adapter
from keras_lora.surgery import apply_lora
from keras_lora.surgery import lora_layers

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def tiny_model():
    inputs = keras.Input((4,))
    x = layers.Dense(6, name="dense")(inputs)
    x = layers.EinsumDense("ab,bc->ac", (5,), bias_axes="c", name="einsum")(x)
    x = layers.Dense(3, name="head")(x)
    return keras.Model(inputs, x)


def adapted_model():
    model = apply_lora(
        tiny_model(), rank=2, alpha=4.0, targets=["dense", "einsum"],
        trainable=["head"], train_bias=True,
    )
    rng = np.random.default_rng(3)
    for layer in lora_layers(model).values():
        layer.lora_b.assign(rng.normal(size=layer.lora_b.shape))
    return model


@pytest.fixture
def adapter_path(tmp_path):
    path = str(tmp_path / "task.safetensors")
    save_adapter(adapted_model(), path)
    return path


def header_of(path):
    with safetensors.safe_open(path, framework="numpy") as handle:
        return handle.metadata()["keras_lora"]


def write_with_header(source, target, text):
    """`source`'s tensors (and so its digests) under another header text."""
    tensors = safetensors.numpy.load_file(source)
    safetensors.numpy.save_file(tensors, target, metadata={"keras_lora": text})
    return target


def rewrite(source, target, change):
    document = json.loads(header_of(source))
    change(document)
    return write_with_header(source, target, json.dumps(document))


# Digests ------------------------------------------------------------------


def test_v4_header_records_a_crc32_of_every_tensor(adapter_path):
    import zlib

    document = json.loads(header_of(adapter_path))
    tensors = safetensors.numpy.load_file(adapter_path)
    assert document["format_version"] == 4
    assert set(document["digests"]) == set(tensors)
    for key, value in tensors.items():
        assert document["digests"][key] == f"{zlib.crc32(value.tobytes()):08x}"
    adapter = read_adapter(adapter_path)
    assert adapter.verified


@pytest.mark.parametrize("tensor", ["einsum/lora_b", "head/kernel", "dense/bias"])
def test_a_flipped_byte_in_tensor_data_names_the_tensor(adapter_path, tmp_path, tensor):
    tensors = safetensors.numpy.load_file(adapter_path)
    altered = tensors[tensor].copy()
    altered.reshape(-1).view(np.uint8)[1] ^= 0x04  # still a finite float
    tensors[tensor] = altered
    path = str(tmp_path / "flipped.safetensors")
    safetensors.numpy.save_file(
        tensors, path, metadata={"keras_lora": header_of(adapter_path)}
    )
    with pytest.raises(ValueError, match=rf"'{re.escape(path)}'.*tensor '{tensor}' is corrupted"):
        read_adapter(path)


def as_version_3(document):
    del document["digests"], document["layer_keys"], document["header_digest"]
    document["format_version"] = 3


def test_version_3_file_without_digests_loads_unverified(adapter_path, tmp_path):
    path = rewrite(adapter_path, str(tmp_path / "v3.safetensors"), as_version_3)
    old, new = read_adapter(path), read_adapter(adapter_path)
    assert (old.verified, old.layer_keys) == (False, {})
    assert old.extra_tensors == new.extra_tensors
    for key, value in new.tensors.items():
        np.testing.assert_array_equal(old.tensors[key], value)


def test_version_flipped_to_3_with_digests_is_refused(adapter_path, tmp_path):
    path = rewrite(
        adapter_path, str(tmp_path / "v3.safetensors"),
        lambda d: d.update(format_version=3),
    )
    with pytest.raises(ValueError, match="unknown key 'digests'"):
        read_adapter(path)


# Layer keys ---------------------------------------------------------------


def test_layer_keys_cover_every_adapted_trainable_and_owning_layer(adapter_path):
    adapter = read_adapter(adapter_path)
    assert sorted(adapter.layer_keys) == ["dense", "einsum", "head"]
    assert len(set(adapter.layer_keys.values())) == 3


def record(rank=2, alpha=4.0, **changes):
    return {
        "class": "LoRADense", "base_class": "Dense", "rank": rank,
        "alpha": alpha, "scaling": alpha / rank, "use_rslora": False,
        "dropout": 0.0, "train_bias": False, "lora_a_shape": [rank, 4],
        "lora_b_shape": [rank, 3], "base_kernel_shape": [4, 3], **changes,
    }


def parts():
    tensors = {
        "blk/up/lora_a": np.ones((2, 4), "float32"),
        "blk/up/lora_b": np.zeros((2, 3), "float32"),
    }
    extras = {"head/kernel": np.ones((3, 2), "float32")}
    return tensors, {"blk/up": record()}, extras


def test_given_layer_keys_are_stored_for_the_named_layers_only(tmp_path):
    tensors, records, extras = parts()
    path = write_adapter_file(
        tmp_path / "a.safetensors", tensors, records, extras=extras,
        trainable_layers=["head"],
        layer_keys={"blk/up": "functional/0/dense", "head": "functional/1/dense",
                    "unused": "functional/2/dense"},
    )
    assert read_adapter(path).layer_keys == {
        "blk/up": "functional/0/dense", "head": "functional/1/dense"
    }


def test_layer_keys_default_to_the_paths(tmp_path):
    tensors, records, extras = parts()
    path = write_adapter_file(
        tmp_path / "a.safetensors", tensors, records, extras=extras,
        trainable_layers=["head"],
    )
    assert read_adapter(path).layer_keys == {"blk/up": "blk/up", "head": "head"}


def test_layer_keys_missing_a_layer_is_refused_and_nothing_written(tmp_path):
    tensors, records, extras = parts()
    path = tmp_path / "a.safetensors"
    with pytest.raises(ValueError, match="`layer_keys` has no key for layer 'head'"):
        write_adapter_file(
            path, tensors, records, extras=extras, trainable_layers=["head"],
            layer_keys={"blk/up": "k0"},
        )
    assert os.listdir(tmp_path) == []


def test_two_layers_with_one_structural_key_are_refused(tmp_path):
    tensors, records, extras = parts()
    with pytest.raises(ValueError, match=r"layer_keys\['head'\].*also the key of layer 'blk/up'"):
        write_adapter_file(
            tmp_path / "a.safetensors", tensors, records, extras=extras,
            trainable_layers=["head"], layer_keys={"blk/up": "k", "head": "k"},
        )


def test_writer_refuses_a_record_the_reader_would_refuse(tmp_path):
    path = tmp_path / "a.safetensors"
    tensors, records, _ = parts()
    write_adapter_file(path, tensors, records)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"`scaling` must equal.*Received: scaling=9.*Nothing was written"):
        write_adapter_file(path, tensors, {"blk/up": record(scaling=9.0)})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.safetensors"]


# The strict schema --------------------------------------------------------


def top(**changes):
    return lambda d: d.update(changes)


def drop(key):
    return lambda d: d.pop(key)


def in_layer(path, **changes):
    return lambda d: d["layers"][path].update(changes)


SCHEMA_CASES = [
    ("trainable_layers_missing", drop("trainable_layers"),
     r"the header lacks the key 'trainable_layers'"),
    ("extra_tensors_missing", drop("extra_tensors"),
     r"the header lacks the key 'extra_tensors'"),
    ("digests_missing", drop("digests"), r"the header lacks the key 'digests'"),
    ("layer_keys_missing", drop("layer_keys"), r"lacks the key 'layer_keys'"),
    ("unknown_top_level_key", top(trainable_layerz=[]),
     r"unknown key 'trainable_layerz'"),
    ("format_version_bool", top(format_version=True),
     r"`format_version` must be a positive integer. Received: format_version=True"),
    ("backend_not_a_string", top(backend=3), r"`backend` must be a string. Received: backend=3"),
    ("alpha_null", in_layer("dense", alpha=None),
     r"layer 'dense': `alpha` must be a positive finite number. Received: alpha=None"),
    ("alpha_string", in_layer("dense", alpha="abc"),
     r"layer 'dense': `alpha` must be a positive finite number. Received: alpha='abc'"),
    ("scaling_999", in_layer("dense", scaling=999),
     r"layer 'dense': `scaling` must equal alpha / rank = 2.0. Received: scaling=999"),
    ("scaling_nan", in_layer("dense", scaling=float("nan")),
     r"`scaling` must equal alpha / rank = 2.0. Received: scaling=nan"),
    ("scaling_string", in_layer("einsum", scaling="abc"),
     r"layer 'einsum': `scaling` must equal .* Received: scaling='abc'"),
    ("rank_bool", in_layer("dense", rank=True),
     r"`rank` must be a positive integer. Received: rank=True"),
    ("rank_float", in_layer("dense", rank=2.0),
     r"`rank` must be a positive integer. Received: rank=2.0"),
    ("use_rslora_string", in_layer("dense", use_rslora="false"),
     r"`use_rslora` must be true or false. Received: use_rslora='false'"),
    ("train_bias_int", in_layer("dense", train_bias=1),
     r"`train_bias` must be true or false. Received: train_bias=1"),
    ("dropout_bool", in_layer("dense", dropout=False),
     r"`dropout` must be a number in \[0, 1\). Received: dropout=False"),
    ("empty_lora_a_shape", in_layer("dense", lora_a_shape=[]),
     r"layer 'dense': `lora_a_shape` must be a non-empty list .* Received: lora_a_shape=\[\]"),
    ("shape_with_bool", in_layer("dense", lora_b_shape=[2, True]),
     r"`lora_b_shape` must be .* Received: lora_b_shape=\[2, True\]"),
    ("unknown_record_key", in_layer("dense", rank_pattern={}),
     r"layer 'dense': the record has an unknown key 'rank_pattern'"),
    ("record_key_missing", lambda d: d["layers"]["dense"].pop("base_class"),
     r"layer 'dense': the record lacks the key 'base_class'"),
    ("record_not_a_dict", lambda d: d["layers"].update(dense=None),
     r"layer 'dense': the layer record must be a JSON object .* Received: None"),
    ("trainable_layer_also_adapted", top(trainable_layers=["head", "dense"]),
     r"`trainable_layers` names an adapted layer.* Received: trainable_layers='dense'"),
    ("extra_is_an_adapted_kernel",
     lambda d: d["extra_tensors"].update({"dense/kernel": [4, 6]}),
     r"extra_tensors\['dense/kernel'\]` names a weight of the adapted layer 'dense'"),
    ("layer_keys_incomplete", lambda d: d["layer_keys"].pop("head"),
     r"`layer_keys` has no entry for layer path 'head'"),
    ("digest_not_hex", lambda d: d["digests"].update({"head/bias": "xyz"}),
     r"`digests\['head/bias'\]` must be a CRC-32 .* Received: digests\['head/bias'\]='xyz'"),
    ("digest_missing", lambda d: d["digests"].pop("head/bias"),
     r"`digests` has no entry for tensor 'head/bias'"),
]


@pytest.mark.parametrize(
    "change, message", [c[1:] for c in SCHEMA_CASES], ids=[c[0] for c in SCHEMA_CASES]
)
def test_header_outside_the_schema_names_file_field_and_value(
    adapter_path, tmp_path, change, message
):
    path = rewrite(adapter_path, str(tmp_path / "bad.safetensors"), change)
    with pytest.raises(ValueError, match=re.escape(f"Adapter file '{path}'")) as raised:
        read_adapter(path)
    assert re.search(message, str(raised.value)), str(raised.value)


def test_version_3_file_without_trainable_layers_is_refused(adapter_path, tmp_path):
    def change(document):
        as_version_3(document)
        del document["trainable_layers"]

    path = rewrite(adapter_path, str(tmp_path / "v3.safetensors"), change)
    with pytest.raises(ValueError, match="lacks the key 'trainable_layers'"):
        read_adapter(path)


def test_duplicate_json_keys_are_refused(adapter_path, tmp_path):
    text = header_of(adapter_path)
    assert text.startswith("{")
    path = write_with_header(
        adapter_path, str(tmp_path / "dup.safetensors"),
        '{"backend":"jax",' + text[1:],
    )
    with pytest.raises(ValueError, match=r"its header JSON repeats the key 'backend'"):
        read_adapter(path)


def test_deeply_nested_json_is_a_value_error(adapter_path, tmp_path):
    depth = 200_000
    path = write_with_header(
        adapter_path, str(tmp_path / "deep.safetensors"),
        '{"format":' + "[" * depth + "]" * depth + "}",
    )
    with pytest.raises(ValueError, match="nested too deeply"):
        read_adapter(path)


# Writing files ------------------------------------------------------------


@pytest.fixture
def umask():
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_a_new_file_gets_the_umask_mode(adapter_path, tmp_path, umask, mask, mode):
    umask(mask)
    path = str(tmp_path / "new.safetensors")
    save_adapter(adapted_model(), path)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode


def test_a_replaced_file_keeps_its_mode(adapter_path, umask):
    umask(0o077)
    os.chmod(adapter_path, 0o640)
    save_adapter(adapted_model(), adapter_path)
    assert stat.S_IMODE(os.stat(adapter_path).st_mode) == 0o640


def test_stale_leftovers_of_the_same_target_are_removed(adapter_path, tmp_path):
    directory = os.path.dirname(adapter_path)
    stale = [".task.safetensors.k3j_9x0a.tmp", ".task.safetensors.aaaaaaaa.tmp"]
    kept = [
        ".task.safetensors.k3j_9x0a.tmp.bak",  # another suffix
        ".task.safetensors.short.tmp",  # not mkstemp's 8 characters
        ".other.safetensors.k3j_9x0a.tmp",  # another target
        "task.safetensors.k3j_9x0a.tmp",  # not hidden
        ".task.safetensorsXk3j_9x0a.tmp",  # a dot is a dot, not a wildcard
    ]
    for name in stale + kept:
        with open(os.path.join(directory, name), "wb") as handle:
            handle.write(b"partial")
    os.mkdir(os.path.join(directory, ".task.safetensors.dirdirdi.tmp"))
    save_adapter(adapted_model(), adapter_path)
    assert sorted(os.listdir(directory)) == sorted(
        kept + ["task.safetensors", ".task.safetensors.dirdirdi.tmp"]
    )
    read_adapter(adapter_path)


@pytest.mark.skipif(fcntl is None, reason="flock")
def test_a_leftover_another_writer_holds_is_kept(adapter_path, tmp_path):
    busy = os.path.join(os.path.dirname(adapter_path), ".task.safetensors.busy1234.tmp")
    with open(busy, "wb") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        save_adapter(adapted_model(), adapter_path)
        assert os.path.exists(busy)
    assert atomic_files.remove_stale_temporaries(adapter_path) == [busy]


def test_the_writer_never_leaves_its_own_temporary_file(tmp_path, monkeypatch):
    tensors, records, _ = parts()
    path = tmp_path / "a.safetensors"

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_adapter_file(path, tensors, records)
    assert os.listdir(tmp_path) == []


def test_format_constants_are_reexported():
    assert adapter_file.FORMAT_VERSION == 4
    assert adapter_file.METADATA_KEY == "keras_lora"


@pytest.mark.skipif(fcntl is None, reason="flock, SIGKILL")
def test_a_writer_killed_mid_write_leaves_a_leftover_the_next_write_removes(tmp_path):
    import signal
    import subprocess
    import sys

    target = str(tmp_path / "task.safetensors")
    code = (
        "import sys, time\n"
        "from keras_lora import atomic_files\n"
        f"with atomic_files.temporary_beside({target!r}) as (handle, _):\n"
        "    handle.write(b'half a file'); handle.flush()\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    writer = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=root
    )
    try:
        assert writer.stdout.readline() == b"writing\n"
        (leftover,) = os.listdir(tmp_path)
        assert re.fullmatch(r"\.task\.safetensors\.[a-z0-9_]{8}\.tmp", leftover)
        # While the writer lives, its file is not taken for a leftover.
        assert atomic_files.remove_stale_temporaries(target) == []
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert os.listdir(tmp_path) == [leftover]
    atomic_files.write_atomically(b"complete", target)
    assert os.listdir(tmp_path) == ["task.safetensors"]
