"""Runs the test suite once per backend, the runs side by side (`make test`).

Each backend's suite is mostly single-threaded Python, so on a 2-core
machine running them at once takes about half of running them one after
another. JAX's and TensorFlow's suites are the longest, so each runs as two
processes (a fresh clone's `make test` took 34 min with TensorFlow as one: it
ran 5 min alone after the rest had ended), its test files shared between them
by recorded durations (`DURATIONS`); each backend-specific test still runs exactly once
(see `tests/conftest.py`). Each log is printed whole when every run has
ended, with pytest's slowest tests; the exit status is 1 if any run failed
(pytest's "no tests collected", 5, included).

    python tools/run_suites.py [--backends jax tensorflow torch] [--split jax tensorflow]
"""

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Seconds each test file took in the JAX suite (`--junitxml` sums, 2 cores,
# all five suite processes side by side, 2026-12-03: `--junit-dir`), with
# test_docs as it runs now (a third of its pages on JAX) and the export
# files from a run with the warm export process. A file not listed counts
# as DEFAULT_SECONDS; refresh after big changes.
DURATIONS = {
    "test_hub": 389, "test_quantized": 268, "test_examples": 190,
    "test_benchmarks_smoke": 189, "test_mixed_batch": 140, "test_export": 126,
    "test_docs": 125, "test_distribution": 105, "test_conv": 103,
    "test_keras_native_save": 90, "test_minilm": 81, "test_cli": 65,
    "test_embedding": 59, "test_einsum_dense": 57, "test_adapters": 52,
    "test_init_methods": 41, "test_benchmark_embedding_conv": 41,
    "test_merge": 41, "test_peft_interop": 35, "test_surgery": 29,
    "test_fused_kernels": 26, "test_dora": 23, "test_dense": 23,
    "test_model_io": 21, "test_mixed_precision": 18, "test_clone": 15,
    "test_loraplus": 13, "test_layer_training": 12, "test_adapter_file": 12,
    "test_traced_cache": 12, "test_export_worker": 10, "test_multi": 10,
    "test_weighted": 9, "test_layer_serialization": 8,
    "test_adapter_file_fuzz": 7, "test_config": 0, "test_layer_dispatch": 0,
}
DEFAULT_SECONDS = 10

# More suites run at once than there are cores: each backend's op thread
# pools stay at one thread, so they do not spin against one another (the
# caller's own settings win).
SINGLE_THREADED = {
    "OMP_NUM_THREADS": "1",
    "TF_NUM_INTRAOP_THREADS": "1",
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false",
}


def balanced_halves(files):
    """Two lists of `files` with about equal recorded time (longest first,
    each to the half with less so far)."""
    def seconds(path):
        name = os.path.splitext(os.path.basename(path))[0]
        return DURATIONS.get(name, DEFAULT_SECONDS)

    halves = [[0, []], [0, []]]
    for path in sorted(files, key=lambda p: (-seconds(p), p)):
        half = min(halves, key=lambda h: h[0])
        half[0] += seconds(path)
        half[1].append(path)
    return [sorted(paths) for _, paths in halves]


def jobs(backends, split):
    """`[(label, backend, test paths)]`: one job per backend, two for `split`."""
    files = sorted(glob.glob(os.path.join("tests", "test_*.py")))
    result = []
    for backend in backends:
        if backend in split:
            first, second = balanced_halves(files)
            result.append((f"{backend} (1/2)", backend, first))
            result.append((f"{backend} (2/2)", backend, second))
        else:
            result.append((backend, backend, ["tests"]))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+",
                        default=["jax", "tensorflow", "torch"])
    parser.add_argument("--split", nargs="*", default=["jax", "tensorflow"],
                        help="backends whose suite runs as two processes")
    parser.add_argument("--junit-dir", default=None,
                        help="write each run's pytest --junitxml report here "
                             "(per-test durations, to refresh DURATIONS)")
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
            if arguments.junit_dir:
                os.makedirs(arguments.junit_dir, exist_ok=True)
                command.append("--junitxml=" + os.path.join(
                    arguments.junit_dir, f"{index}-{backend}.xml"))
            env = dict(SINGLE_THREADED, **os.environ)
            env["KERAS_BACKEND"] = backend
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
