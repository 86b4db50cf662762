"""Validation of the numbers that define one LoRA adaptation."""

import math
import numbers

import numpy as np


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


def validate_bool(value, name, where=""):
    """Returns `value` if it is a bool (NumPy bools included).

    Strings such as `"false"`, numbers and lists are refused: Python would
    read `"false"` and `[0]` as true.

    Args:
        value: the value to check.
        name: the argument's name, for the error message.
        where: a prefix for the error message naming the layer.

    Returns:
        A Python bool.

    Raises:
        TypeError: if `value` is not a bool.

    Example:

    >>> validate_bool(False, "use_rslora")
    False
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"{where}`{name}` must be True or False. "
            f"Received: {name}={value!r} of type {type(value).__name__}"
        )
    return bool(value)


def validate_scaling(rank, alpha, use_rslora, where=""):
    """Returns the scaling if it is finite and nonzero in float32.

    A huge `alpha` (say `1e39`) is a finite Python float, but its scaling
    overflows the float32 adapters' compute and every output turns NaN.

    Args:
        rank: the validated rank.
        alpha: the validated alpha.
        use_rslora: whether rsLoRA scaling is used.
        where: a prefix for the error message naming the layer.

    Returns:
        The scaling, a Python float.

    Raises:
        ValueError: if the scaling is not a finite, nonzero float32.

    Example:

    >>> validate_scaling(8, 16.0, False)
    2.0
    """
    scaling = scaling_for(rank, alpha, use_rslora)
    with np.errstate(over="ignore", under="ignore"):
        as_float32 = np.float32(scaling)
    if not np.isfinite(as_float32) or as_float32 == 0:
        raise ValueError(
            f"{where}the LoRA scaling alpha/{'sqrt(rank)' if use_rslora else 'rank'}"
            f" = {scaling!r} is not a finite nonzero float32. "
            f"Received: alpha={alpha!r}, rank={rank!r}"
        )
    return scaling


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
