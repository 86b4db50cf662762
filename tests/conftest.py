"""Shared pytest set-up: every test starts from the same Keras state."""

import keras
import pytest


@pytest.fixture(autouse=True)
def keras_state():
    """Seeds every RNG and restores the global dtype policy afterwards.

    A test that sets `mixed_bfloat16` must not leak it into the next test.
    """
    policy = keras.config.dtype_policy()
    keras.utils.set_random_seed(1337)
    yield
    keras.config.set_dtype_policy(policy)
