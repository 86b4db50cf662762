"""Seeded fuzzing of a real adapter file: truncations and byte flips in the
header and the tensor data either raise `ValueError` or load exactly the
original tensors; nothing loads silently with altered weights."""

import struct

import numpy as np
import pytest
from test_adapter_file import adapted_model

from keras_lora.adapter_file import read_adapter
from keras_lora.adapters import save_adapter

SEED = 14
CASES_PER_KIND = 120


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fuzz") / "task.safetensors")
    save_adapter(adapted_model(), path)
    with open(path, "rb") as handle:
        data = handle.read()
    (header_length,) = struct.unpack("<Q", data[:8])
    return path, data, 8 + header_length, read_adapter(path)


def mutations(data, data_start, rng):
    """(name, bytes) cases: truncations, and flips of one byte (any bits) or
    one bit, in the length prefix, the header and the tensor data."""
    regions = {
        "prefix": (0, 8), "header": (8, data_start), "data": (data_start, len(data))
    }
    for size in rng.choice(len(data), CASES_PER_KIND // 2, replace=False):
        yield f"truncated to {size} bytes", data[:size]
    for region, (low, high) in regions.items():
        count = 8 if region == "prefix" else CASES_PER_KIND
        for _ in range(count):
            at = int(rng.integers(low, high))
            mask = int(rng.integers(1, 256)) if rng.random() < 0.5 else 1 << int(rng.integers(8))
            mutated = bytearray(data)
            mutated[at] ^= mask
            yield f"{region} byte {at} ^ {mask:#04x}", bytes(mutated)


def test_no_corruption_loads_altered_tensors(original, tmp_path):
    path, data, data_start, expected = original
    rng = np.random.default_rng(SEED)
    target = tmp_path / "mutated.safetensors"
    outcomes = {"refused": 0, "identical": 0}
    for name, mutated in mutations(data, data_start, rng):
        target.write_bytes(mutated)
        try:
            adapter = read_adapter(str(target))
        except ValueError as error:
            assert str(target) in str(error), (name, str(error))
            outcomes["refused"] += 1
            continue
        except Exception as error:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{name}: {type(error).__name__}: {error}")
        assert sorted(adapter.tensors) == sorted(expected.tensors), name
        for key, value in expected.tensors.items():
            assert adapter.tensors[key].tobytes() == value.tobytes(), (name, key)
        assert adapter.layers.keys() == expected.layers.keys(), name
        outcomes["identical"] += 1
    assert sum(outcomes.values()) > 300
    # Every flip in the tensor data is caught by a digest, never loaded.
    assert outcomes["refused"] >= CASES_PER_KIND + CASES_PER_KIND // 2


def test_every_tensor_byte_flip_is_refused(original, tmp_path):
    path, data, data_start, _ = original
    target = tmp_path / "mutated.safetensors"
    rng = np.random.default_rng(SEED + 1)
    for at in rng.choice(np.arange(data_start, len(data)), 60, replace=False):
        mutated = bytearray(data)
        mutated[at] ^= 0x01
        target.write_bytes(bytes(mutated))
        with pytest.raises(ValueError, match="is corrupted|holds NaN"):
            read_adapter(str(target))
