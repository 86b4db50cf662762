"""Validation of the numbers that define one LoRA adaptation."""

import math
import numbers


def _is_number(value, kind):
    # `True` is an `Integral` too, but `rank=True` is always a mistake.
    return isinstance(value, kind) and not isinstance(value, bool)


def validate_rank(rank, where=""):
    """Returns `rank` as an int if it is a positive integer.

    Args:
        rank: the value to check; Python and NumPy integers are accepted,
            booleans and floats (even `2.0`) are not.
        where: a prefix for the error message naming the layer.

    Returns:
        `rank` as a Python int.

    Raises:
        ValueError: if `rank` is not a positive integer.

    Example:

    >>> validate_rank(8)
    8
    """
    if not _is_number(rank, numbers.Integral) or rank < 1:
        raise ValueError(
            f"{where}`rank` must be a positive integer. Received: rank={rank!r}"
        )
    return int(rank)


def validate_alpha(alpha, rank, where=""):
    """Returns `alpha` as a float (defaulting to `rank`) if it is positive.

    Args:
        alpha: a positive finite number, or `None` for `rank`.
        rank: the (validated) adapter rank.
        where: a prefix for the error message naming the layer.

    Returns:
        A Python float.

    Raises:
        ValueError: if `alpha` is not a positive finite number.

    Example:

    >>> validate_alpha(None, 8)
    8.0
    """
    if alpha is None:
        return float(rank)
    if (
        not _is_number(alpha, numbers.Real)
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise ValueError(
            f"{where}`alpha` must be a positive number. Received: alpha={alpha!r}"
        )
    return float(alpha)


def validate_dropout(dropout, where=""):
    """Returns `dropout` as a float if it lies in [0, 1).

    Args:
        dropout: the dropout rate of the LoRA path's input.
        where: a prefix for the error message naming the layer.

    Returns:
        A Python float.

    Raises:
        ValueError: if `dropout` is not a number in [0, 1).

    Example:

    >>> validate_dropout(0.1)
    0.1
    """
    if not _is_number(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
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
