"""Interleaved timing: every variant steps once per round, in turn.

On a shared machine the load drifts from second to second. Timing the
variants in alternation and comparing them round by round cancels most of
that drift; absolute times stay noisy, ratios much less so.
"""

import statistics
import time


def interleave(steps, warmup, repeats):
    """Times `steps` in rounds.

    Args:
        steps: dict `name -> callable()` (each call must block until its
            work is done).
        warmup: untimed calls per step before timing (compilation, caches).
        repeats: timed rounds.

    Returns:
        dict `name -> [seconds per round]`.
    """
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    times = {name: [] for name in names}
    for round_index in range(repeats):
        # Rotate the order so no variant always runs first after a pause.
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return times


def median_ms(seconds):
    """The median of `seconds`, in milliseconds."""
    return 1000.0 * statistics.median(seconds)


def paired_ratio(numerator, denominator):
    """The median over rounds of `numerator[i] / denominator[i]`."""
    return statistics.median(n / d for n, d in zip(numerator, denominator))


def time_once(fn):
    """Runs `fn()` once; returns `(result, seconds)`."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start
