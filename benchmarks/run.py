"""Runs the keras-lora benchmarks and writes `docs/benchmarks.md`.

Usage:

    python benchmarks/run.py                  # full run, every backend
    python benchmarks/run.py --quick          # seconds-long smoke run
    python benchmarks/run.py --backend torch  # one backend
    python benchmarks/run.py --sections minilm --output bench_output/m.md
                                              # one section, its own page

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
from benchmarks import memory  # noqa: E402
from benchmarks import report  # noqa: E402
from benchmarks import sizes  # noqa: E402
from benchmarks import threads  # noqa: E402

BACKENDS = ("jax", "tensorflow", "torch")
SECTIONS = ("training", "peft", "inference", "memory", "lifecycle", "minilm")
# Left out of a quick run unless `--sections` names them: the MiniLM section
# loads the 22.7M-parameter checkpoint six times, tens of seconds even at
# its quick sizes (`python benchmarks/run.py --quick --sections minilm`).
QUICK_OPT_IN = ("minilm",)
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
        help="only these sections: " + " ".join(SECTIONS)
        + " (a quick run leaves out " + " ".join(QUICK_OPT_IN)
        + " unless named here)",
    )
    parser.add_argument(
        "--threads", type=int,
        help="pin each backend process to this many cores (see "
        "benchmarks/threads.py); default: no limit",
    )
    parser.add_argument(
        "--from-json",
        help="render the page from a saved raw results file instead of "
        "running (after editing FINDINGS.md or the report code)",
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


def backend_env(backend, thread_count):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    if thread_count:
        env[threads.ENV] = str(thread_count)
    return env


def chosen_sections(sections, quick):
    """The sections to run: those asked for, else every default one."""
    if sections:
        return list(sections)
    return [s for s in SECTIONS if not (quick and s in QUICK_OPT_IN)]


def wants(sections, name):
    return not sections or name in sections


def add_memory(result, quick, sections, env):
    """Runs the memory section from this (small) process; see memory.py."""
    if not wants(sections, "memory"):
        return result
    backend = env["KERAS_BACKEND"]
    print(f"[{backend}] memory ...", flush=True)
    start = time.perf_counter()
    section = memory.peak_rss(
        quick, env, lambda m: print(f"[{backend}] {m}", flush=True),
        sizes.sizes_for(quick).memory_steps,
    )
    section["seconds"] = round(time.perf_counter() - start, 1)
    result["sections"]["memory"] = section
    return result


def run_backend(backend, quick, sections, folder, thread_count=None):
    """Runs `worker.py` under `backend`; returns its results (or an error)."""
    out = os.path.join(folder, f"{backend}.json")
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "worker.py"),
               "--out", out]
    if quick:
        command.append("--quick")
    if sections:
        command += ["--sections", *sections]
    env = backend_env(backend, thread_count)
    print(f"=== {backend} ===", flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT)
    if done.returncode != 0 or not os.path.exists(out):
        result = {
            "backend": backend,
            "quick": quick,
            "sizes": {},
            "versions": {},
            "sections": {},
            "error": f"worker exited with status {done.returncode}",
        }
    else:
        with open(out) as file:
            result = add_memory(json.load(file), quick, sections, env)
    print(f"=== {backend}: {time.perf_counter() - start:.0f}s ===", flush=True)
    return result


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
    worker_sections = [s for s in sections if s != "memory"]
    result = worker.collect(quick, worker_sections)
    return add_memory(result, quick, sections, backend_env(current, None))


def load_results(path, argv):
    """Results and the original arguments from a raw results file."""
    with open(path) as file:
        saved = json.load(file)
    if isinstance(saved, list):  # Files written before the command was kept.
        kept = [a for a in argv if a != "--from-json" and a != path]
        return saved, kept
    return saved["results"], saved["command"].split()[2:]


def command_line(argv):
    return " ".join(["python benchmarks/run.py", *argv])


def main(argv=None):
    """Runs the benchmarks; returns the path of the written page."""
    argv = list(sys.argv[1:] if argv is None else argv)
    arguments = parse_arguments(argv)
    backends = arguments.backend or list(BACKENDS)
    sections = chosen_sections(arguments.sections, arguments.quick)
    if arguments.from_json:
        results, argv = load_results(arguments.from_json, argv)
    elif arguments.in_process:
        results = [
            run_here(arguments.backend, arguments.quick, sections)
        ]
    else:
        with tempfile.TemporaryDirectory() as folder:
            results = [
                run_backend(b, arguments.quick, sections, folder,
                            arguments.threads)
                for b in backends
            ]
    quick = any(r.get("quick") for r in results)
    output = os.path.abspath(arguments.output or default_output(quick))
    os.makedirs(os.path.dirname(output), exist_ok=True)
    stem = os.path.splitext(output)[0]
    raw = arguments.json or os.path.join(
        ROOT, "bench_output", os.path.basename(stem) + ".json")
    os.makedirs(os.path.dirname(os.path.abspath(raw)), exist_ok=True)
    if not arguments.from_json:
        with open(raw, "w") as file:
            json.dump({"command": command_line(argv), "results": results},
                      file, indent=1)
    chart_path = chart.draw(
        [r for r in results if "error" not in r], stem + CHART_SUFFIX
    )
    page = report.render(
        [r for r in results if "error" not in r],
        machine.describe(),
        command_line(argv),
        os.path.basename(chart_path) if chart_path else None,
        quick,
        arguments.gpu_note,
        () if quick else sizes.FULL_DEVIATIONS,
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
