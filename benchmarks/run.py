"""Runs the keras-lora benchmarks and writes `docs/benchmarks.md`.

Usage:

    python benchmarks/run.py                  # full run, every backend
    python benchmarks/run.py --quick          # seconds-long smoke run
    python benchmarks/run.py --backend torch  # one backend

Each backend runs in one subprocess (`KERAS_BACKEND` set) that interleaves
the variants it compares; this script gathers their JSON, renders the
Markdown page and draws the ratio chart. A quick run writes under
`bench_output/quick/` unless `--output` says otherwise, so it never
overwrites the real figures.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import chart  # noqa: E402
from benchmarks import machine  # noqa: E402
from benchmarks import report  # noqa: E402
from benchmarks import sizes  # noqa: E402

BACKENDS = ("jax", "tensorflow", "torch")
CHART_SUFFIX = "_step_ratios.png"
NO_GPU_NOTE = (
    "No GPU machine was lent to this task, so there is no GPU table. Run "
    "`python benchmarks/run.py --output docs/benchmarks_gpu.md` on one to "
    "add it."
)


def parse_arguments(argv):
    parser = argparse.ArgumentParser(
        description="keras-lora benchmarks (see docs/benchmarks.md)."
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="tiny sizes, a smoke run of every section (seconds)",
    )
    parser.add_argument(
        "--backend", action="append", choices=BACKENDS,
        help="restrict to this backend (repeatable); default: all three",
    )
    parser.add_argument(
        "--output",
        help="Markdown file to write (default docs/benchmarks.md, or "
        "bench_output/quick/benchmarks.md with --quick)",
    )
    parser.add_argument(
        "--json",
        help="raw results file (default bench_output/<page name>.json)",
    )
    parser.add_argument(
        "--sections", nargs="*",
        help="only these sections: training peft inference memory lifecycle",
    )
    parser.add_argument(
        "--in-process", action="store_true",
        help="run in this process instead of a subprocess per backend "
        "(for the smoke test; only the current KERAS_BACKEND)",
    )
    parser.add_argument(
        "--gpu-note", default=NO_GPU_NOTE,
        help="text of the page's GPU section",
    )
    return parser.parse_args(argv)


def default_output(quick):
    if quick:
        return os.path.join(ROOT, "bench_output", "quick", "benchmarks.md")
    return os.path.join(ROOT, "docs", "benchmarks.md")


def run_backend(backend, quick, sections, folder):
    """Runs `worker.py` under `backend`; returns its results (or an error)."""
    out = os.path.join(folder, f"{backend}.json")
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "worker.py"),
               "--out", out]
    if quick:
        command.append("--quick")
    if sections:
        command += ["--sections", *sections]
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    print(f"=== {backend} ===", flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT)
    print(f"=== {backend}: {time.perf_counter() - start:.0f}s ===", flush=True)
    if done.returncode != 0 or not os.path.exists(out):
        return {
            "backend": backend,
            "quick": quick,
            "sizes": {},
            "versions": {},
            "sections": {},
            "error": f"worker exited with status {done.returncode}",
        }
    with open(out) as file:
        return json.load(file)


def run_here(backends, quick, sections):
    """Runs the worker in this process (its backend must be the current)."""
    import keras

    from benchmarks import worker

    current = keras.backend.backend()
    if backends not in (None, [current]):
        raise ValueError(
            "--in-process runs on the current backend only. Received: "
            f"--backend {backends} with KERAS_BACKEND={current!r}"
        )
    return worker.collect(quick, sections)


def command_line(argv):
    return " ".join(["python benchmarks/run.py", *argv])


def main(argv=None):
    """Runs the benchmarks; returns the path of the written page."""
    argv = list(sys.argv[1:] if argv is None else argv)
    arguments = parse_arguments(argv)
    backends = arguments.backend or list(BACKENDS)
    output = os.path.abspath(arguments.output or default_output(arguments.quick))
    os.makedirs(os.path.dirname(output), exist_ok=True)
    if arguments.in_process:
        results = [
            run_here(arguments.backend, arguments.quick, arguments.sections)
        ]
    else:
        with tempfile.TemporaryDirectory() as folder:
            results = [
                run_backend(b, arguments.quick, arguments.sections, folder)
                for b in backends
            ]
    stem = os.path.splitext(output)[0]
    raw = arguments.json or os.path.join(
        ROOT, "bench_output", os.path.basename(stem) + ".json")
    os.makedirs(os.path.dirname(os.path.abspath(raw)), exist_ok=True)
    with open(raw, "w") as file:
        json.dump(results, file, indent=1)
    chart_path = chart.draw(
        [r for r in results if "error" not in r], stem + CHART_SUFFIX
    )
    page = report.render(
        [r for r in results if "error" not in r],
        machine.describe(),
        command_line(argv),
        os.path.basename(chart_path) if chart_path else None,
        arguments.quick,
        arguments.gpu_note,
        () if arguments.quick else sizes.FULL_DEVIATIONS,
    )
    failed = [f"{r['backend']}: {r['error']}" for r in results if "error" in r]
    if failed:
        page += "\n## Failed backends\n\n" + "\n".join(
            f"- {line}" for line in failed) + "\n"
    with open(output, "w") as file:
        file.write(page)
    print(f"wrote {output}", flush=True)
    return output


if __name__ == "__main__":
    main()
