"""Limiting a benchmark process to a few cores.

On a machine shared with other jobs, a backend that runs every op on all
cores waits at each op for a thread that another process has preempted:
small ops (the rank-r products of LoRA among them) then cost milliseconds
of scheduling rather than compute, and the ratios measure the neighbours.
`run.py --threads N` pins each backend process to N cores and sizes the
thread pools to match.
"""

import os

ENV = "KERAS_LORA_BENCH_THREADS"
_POOL_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def requested():
    """The thread count asked for via the environment, or `None`."""
    value = os.environ.get(ENV)
    return int(value) if value else None


def limit_from_environment():
    """Pins this process to `requested()` cores; call before importing a
    backend. Child processes inherit the pinning and the variables."""
    count = requested()
    if not count:
        return
    cores = sorted(os.sched_getaffinity(0))[:count]
    os.sched_setaffinity(0, cores)
    for name in _POOL_VARIABLES:
        os.environ[name] = str(count)
    # TensorFlow and XLA size their pools from the schedulable cores.


def limit_torch():
    """torch sizes its pool from the physical cores; set it explicitly."""
    count = requested()
    if count and "torch" in __import__("sys").modules:
        import torch

        torch.set_num_threads(count)


def describe():
    """The cores this process may run on, and the requested limit."""
    return {
        "requested": requested(),
        "schedulable_cores": len(os.sched_getaffinity(0)),
    }
