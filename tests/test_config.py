"""The numbers that define one adaptation: rank, alpha, dropout, scaling."""

import math

import numpy as np
import pytest

from keras_lora import config


@pytest.mark.parametrize("rank", [1, 8, np.int64(4)])
def test_rank_accepts_positive_integers(rank):
    assert config.validate_rank(rank) == rank
    assert type(config.validate_rank(rank)) is int


@pytest.mark.parametrize("rank", [0, -1, 2.5, 2.0, True, "8", None])
def test_rank_rejects_anything_but_a_positive_integer(rank):
    with pytest.raises(ValueError, match=r"positive integer.*rank="):
        config.validate_rank(rank)


def test_rank_error_names_the_layer_and_echoes_the_value():
    with pytest.raises(ValueError) as info:
        config.validate_rank(0, where="LoRADense for layer 'q': ")
    assert "LoRADense for layer 'q'" in str(info.value)
    assert "rank=0" in str(info.value)


def test_alpha_defaults_to_rank():
    assert config.validate_alpha(None, 4) == 4.0


@pytest.mark.parametrize("alpha", [0.5, 16, np.float32(2.0)])
def test_alpha_accepts_positive_numbers(alpha):
    assert config.validate_alpha(alpha, 4) == float(alpha)


@pytest.mark.parametrize(
    "alpha", [0, -1.0, math.inf, math.nan, True, "16"]
)
def test_alpha_rejects_non_positive_or_non_finite_values(alpha):
    with pytest.raises(ValueError, match=r"positive number.*alpha="):
        config.validate_alpha(alpha, 4)


@pytest.mark.parametrize("dropout", [0, 0.0, 0.5, 0.999])
def test_dropout_accepts_numbers_in_zero_one(dropout):
    assert config.validate_dropout(dropout) == float(dropout)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5, math.nan, True, "0.1"])
def test_dropout_rejects_values_outside_zero_one(dropout):
    with pytest.raises(ValueError, match=r"in \[0, 1\).*dropout="):
        config.validate_dropout(dropout)


def test_scaling_is_alpha_over_rank():
    assert config.scaling_for(8, 16.0, use_rslora=False) == 2.0


def test_rslora_scaling_is_alpha_over_sqrt_rank():
    assert config.scaling_for(16, 8.0, use_rslora=True) == 2.0
