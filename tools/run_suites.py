"""Runs the test suite once per backend, the runs side by side (`make test`).

Each backend's suite is mostly single-threaded Python, so on a 2-core
machine running them at once takes about half of running them one after
another. JAX's suite is the longest, so it runs as two processes (the test
files alternately); each backend-specific test still runs exactly once
(see `tests/conftest.py`). Each log is printed whole when every run has
ended, with pytest's slowest tests; the exit status is 1 if any run failed
(pytest's "no tests collected", 5, included).

    python tools/run_suites.py [--backends jax tensorflow torch] [--split jax]
"""

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def jobs(backends, split):
    """`[(label, backend, test paths)]`: one job per backend, two for `split`."""
    files = sorted(glob.glob(os.path.join("tests", "test_*.py")))
    result = []
    for backend in backends:
        if backend in split:
            result.append((f"{backend} (1/2)", backend, files[0::2]))
            result.append((f"{backend} (2/2)", backend, files[1::2]))
        else:
            result.append((backend, backend, ["tests"]))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+",
                        default=["jax", "tensorflow", "torch"])
    parser.add_argument("--split", nargs="*", default=["jax"],
                        help="backends whose suite runs as two processes")
    arguments = parser.parse_args(argv)
    os.chdir(ROOT)
    running = []
    with tempfile.TemporaryDirectory() as logs:
        for index, (label, backend, paths) in enumerate(
            jobs(arguments.backends, arguments.split)
        ):
            log = open(os.path.join(logs, f"{index}.log"), "w+")
            command = [sys.executable, "-m", "pytest", "-q", "-p",
                       "no:cacheprovider", "--durations=10", *paths]
            env = dict(os.environ, KERAS_BACKEND=backend)
            process = subprocess.Popen(command, env=env, stdout=log,
                                       stderr=subprocess.STDOUT)
            running.append((label, process, log, time.monotonic()))
        failed = []
        for label, process, log, started in running:
            code = process.wait()
            minutes = (time.monotonic() - started) / 60
            log.seek(0)
            print(f"=== KERAS_BACKEND={label} (exit {code}, "
                  f"{minutes:.1f} min) ===", flush=True)
            sys.stdout.write(log.read())
            log.close()
            if code != 0:
                failed.append(label)
    if failed:
        print(f"=== FAILED: {', '.join(failed)} ===")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
