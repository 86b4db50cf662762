"""Validation of the numbers that define one LoRA adaptation."""

import math


def validate_rank(rank, where=""):
    """Returns `rank` if it is a positive integer, else raises `ValueError`."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(
            f"{where}`rank` must be a positive integer. Received: rank={rank!r}"
        )
    return rank


def validate_alpha(alpha, rank, where=""):
    """Returns `alpha` as a float (defaulting to `rank`) if it is positive."""
    if alpha is None:
        return float(rank)
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise ValueError(
            f"{where}`alpha` must be a positive number. Received: alpha={alpha!r}"
        )
    return float(alpha)


def validate_dropout(dropout, where=""):
    """Returns `dropout` as a float if it lies in [0, 1)."""
    if (
        isinstance(dropout, bool)
        or not isinstance(dropout, (int, float))
        or not 0.0 <= dropout < 1.0
    ):
        raise ValueError(
            f"{where}`dropout` must be a number in [0, 1). "
            f"Received: dropout={dropout!r}"
        )
    return float(dropout)


def scaling_for(rank, alpha, use_rslora):
    """The factor applied to `A·B`: `alpha / rank`, or `alpha / sqrt(rank)`.

    Args:
        rank: the adapter rank.
        alpha: the LoRA alpha.
        use_rslora: whether to use rank-stabilized scaling (rsLoRA).

    Returns:
        A Python float.

    Example:

    >>> scaling_for(8, 16, False)
    2.0
    >>> scaling_for(4, 4, True)
    2.0
    """
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank
