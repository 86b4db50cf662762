"""Shared pytest set-up: every test starts from the same Keras state."""

import keras
import pytest

if keras.backend.backend() == "torch":
    import torch

    # The suite's models are tiny: one intra-op thread avoids thread
    # hand-off overhead that dominates on 2 shared cores.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def keras_state():
    """Seeds every RNG and restores the global dtype policy afterwards.

    A test that sets `mixed_bfloat16` must not leak it into the next test.
    """
    policy = keras.config.dtype_policy()
    keras.utils.set_random_seed(1337)
    yield
    keras.config.set_dtype_policy(policy)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "backend(name, ...): the test exercises a backend-specific route "
        "(keras.distribution on JAX, MirroredStrategy on TensorFlow, "
        "torch.nn.Module tracking, ...) and is collected only in that "
        "backend's suite run.",
    )


def pytest_collection_modifyitems(config, items):
    """Deselects (does not skip) tests written for another backend.

    `make test` runs the suite once per backend, so each backend-specific
    test runs exactly once overall.
    """
    backend = keras.backend.backend()
    kept, deselected = [], []
    for item in items:
        marker = item.get_closest_marker("backend")
        if marker is None or backend in marker.args:
            kept.append(item)
        else:
            deselected.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept
