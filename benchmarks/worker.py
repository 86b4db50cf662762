"""One backend's benchmarks, run in a process of its own.

`run.py` starts this script once per backend with `KERAS_BACKEND` set and
reads the JSON it writes (the memory section runs from `run.py` itself,
see `memory.py`). A section that fails or whose keras-lora
function does not exist yet is recorded (and printed) with its reason;
the other sections still run.
"""

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import threads  # noqa: E402

# Before any backend is imported: thread pools are sized at import.
threads.limit_from_environment()

import keras  # noqa: E402

from benchmarks import inference  # noqa: E402
from benchmarks import lifecycle  # noqa: E402
from benchmarks import minilm  # noqa: E402
from benchmarks import peft_torch  # noqa: E402
from benchmarks import sizes as sizes_module  # noqa: E402
from benchmarks import training  # noqa: E402


def log(message):
    print(f"[{keras.backend.backend()}] {message}", file=sys.stderr, flush=True)


def versions():
    import importlib.metadata

    found = {}
    for name in (
        "keras", "keras-hub", "jax", "jaxlib", "tensorflow", "torch", "peft",
        "numpy",
    ):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def guarded(name, fn):
    """Runs a section; a crash becomes an `error` entry, not a lost run."""
    log(f"{name} ...")
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as error:
        log(f"{name}: FAILED {error!r}")
        result = {
            "status": "error",
            "reason": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc(limit=8),
        }
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def collect(quick, sections=None):
    """Runs the sections on the current backend; returns a JSON-ready dict.

    Args:
        quick: use the tiny `--quick` sizes.
        sections: names of the sections to run (all by default).
    """
    sizes = sizes_module.sizes_for(quick)
    plan = {
        "training": lambda: training.run(sizes, log),
        "peft": lambda: peft_torch.run(sizes, log),
        "inference": lambda: inference.run(sizes, log),
        "lifecycle": lambda: lifecycle.run(sizes, log),
        "minilm": lambda: minilm.run(quick, log),
    }
    threads.limit_torch()
    results = {
        "backend": keras.backend.backend(),
        "quick": quick,
        "threads": threads.describe(),
        "sizes": sizes_module.as_dict(sizes),
        "versions": versions(),
        "sections": {},
    }
    for name, fn in plan.items():
        if sections is None or name in sections:
            results["sections"][name] = guarded(name, fn)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--sections", nargs="*", default=None)
    arguments = parser.parse_args(argv)
    results = collect(arguments.quick, arguments.sections)
    with open(arguments.out, "w") as file:
        json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()
