"""The TensorFlow-backend process that exports for the JAX and torch backends.

`export_merged` and `export_multi_adapter` run Keras's TensorFlow exporter,
so off TensorFlow they hand the job to a Python process started with
`KERAS_BACKEND=tensorflow`. Starting one costs seconds (importing
TensorFlow alone takes 7-10 s of CPU on a small machine), so the process
stays up after its first export and takes the next ones: the second export
of a session costs the export itself.

Each job behaves as it would in a fresh process where it can:

- the job runs with this process's current `os.environ`, `sys.path` and
  working directory;
- a job's output (Python's and TensorFlow's, file descriptors 1 and 2)
  goes to a file of its own, shown only inside the error if the job fails;
- `keras.backend.clear_session()` runs after every job;
- the process is replaced when what only a new process can pick up has
  changed: an environment variable read at start-up (`KERAS_*`, `TF_*`,
  `XLA_*`, `CUDA*`, `PYTHON*`, `OMP_*`, `MKL_*`, `LD_*`, `PATH`), or the
  source file of a module an earlier job imported;
- a job that fails ends the process (its exit code is reported, as from
  a fresh one), and the next job starts another.

The process ends itself when this one dies (it polls its parent pid) or
exits (its stdin closes). Jobs run one at a time (a lock); a job
interrupted in this process (`KeyboardInterrupt`) ends the worker, and a
forked child starts its own.
"""

import atexit
import json
import os
import subprocess
import sys
import tempfile
import threading

# Ends the worker when the process that started it dies (a killed
# parent cannot wait for, or kill, its child). Polls `os.getppid()`, which
# works on every POSIX system; the parent passes its pid so that a parent
# already gone before the thread starts is noticed too.
WATCHDOG = """
import os, sys, threading, time
_parent = int(sys.argv[1])
def _watch():
    while os.getppid() == _parent:
        time.sleep(0.2)
    os._exit(70)
threading.Thread(target=_watch, daemon=True).start()
"""

# Reads one JSON job per line from stdin and answers on the original
# stdout; between jobs, descriptors 1 and 2 point at /dev/null.
_SERVE = """
import json, traceback
_replies = os.fdopen(os.dup(1), "w")
_quiet = os.open(os.devnull, os.O_WRONLY)

def _point_output_at(fd):
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)

def _run(job):
    os.environ.clear()
    os.environ.update(job["env"])
    sys.path[:] = job["sys_path"]
    os.chdir(job["cwd"])
    sys.argv[2:] = [job["request"]]
    log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    _point_output_at(log)
    try:
        exec(compile(job["source"], "<export job>", "exec"),
             {"__name__": "__export_job__", "os": os, "sys": sys})
        return 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        _point_output_at(_quiet)
        os.close(log)

_point_output_at(_quiet)
for line in sys.stdin:
    status = _run(json.loads(line))
    if status:
        os._exit(status)
    if "keras" in sys.modules:
        sys.modules["keras"].backend.clear_session()
    _replies.write("done\\n")
    _replies.flush()
"""

SERVER = WATCHDOG + _SERVE

# Environment variables that only a new process picks up.
_START_UP_PREFIXES = ("KERAS_", "TF_", "XLA_", "CUDA", "PYTHON", "OMP_",
                      "MKL_", "LD_")
_START_UP_NAMES = ("PATH",)

_lock = threading.Lock()
_workers = {}  # backend -> _Worker


class _Worker:
    """One warm process and what it was started with."""

    def __init__(self, env):
        self.start_up = _start_up(env)
        self.modules = {}  # module name -> source mtime when first sent
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(os.getpid())],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True,
        )

    def fits(self, env, stamps):
        """Whether a job with `env` and module `stamps` can run here."""
        if self.process.poll() is not None or self.start_up != _start_up(env):
            return False
        return all(self.modules.get(name, stamp) == stamp
                   for name, stamp in stamps.items())

    def run(self, source, request, env, stamps):
        """Runs one job; `(exit code, output)`, exit code 0 on success."""
        self.modules = {**stamps, **self.modules}
        handle, log = tempfile.mkstemp(prefix="keras_lora_export_",
                                       suffix=".log")
        os.close(handle)
        try:
            job = {"source": source, "request": request, "env": env,
                   "sys_path": list(sys.path), "cwd": os.getcwd(),
                   "log": log}
            try:
                self.process.stdin.write(json.dumps(job) + "\n")
                self.process.stdin.flush()
                answer = self.process.stdout.readline()
            except (BrokenPipeError, OSError):
                answer = ""
            status = 0 if answer == "done\n" else self.process.wait()
            with open(log, errors="replace") as file:
                return status, file.read()
        finally:
            os.remove(log)

    def close(self):
        try:
            self.process.stdin.close()
            self.process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()


def run_job(source, request, backend, modules=()):
    """Runs `source` in the warm `backend` process.

    Args:
        source: Python source; the job's JSON `request` is `sys.argv[2]`,
            and `os` and `sys` are imported.
        request: the job's request, a JSON string.
        backend: the Keras backend of the process, `"tensorflow"`.
        modules: names of modules the job imports (a changed source file
            of one an earlier job imported starts a new process).

    Returns:
        `(exit_code, output)`: 0 and what the job printed if it succeeded,
        else the exit code of the process the failure ended and its output.
    """
    env = dict(os.environ, KERAS_BACKEND=backend)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # The worker finds what this process imports (custom classes included).
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    stamps = _stamps(modules)
    with _lock:
        worker = _workers.get(backend)
        if worker is None or not worker.fits(env, stamps):
            if worker is not None:
                worker.close()
            worker = _workers[backend] = _Worker(env)
        try:
            status, output = worker.run(source, request, env, stamps)
        except BaseException:  # interrupted mid-job: its answer is lost
            _workers.pop(backend, None)
            worker.process.kill()
            worker.process.wait()
            raise
        if status:
            _workers.pop(backend, None)
        return status, output


def worker_pid(backend):
    """The pid of the warm `backend` process, or `None` if there is none."""
    worker = _workers.get(backend)
    if worker is None or worker.process.poll() is not None:
        return None
    return worker.process.pid


def close_all():
    """Ends every warm process (also run when this process exits)."""
    with _lock:
        while _workers:
            _workers.popitem()[1].close()


def _forget_after_fork():
    """A forked child has copies of the pipes, not its own workers."""
    global _lock
    _lock = threading.Lock()
    _workers.clear()


atexit.register(close_all)
os.register_at_fork(after_in_child=_forget_after_fork)


def _start_up(env):
    """The variables of `env` only a new process picks up (`PYTHONPATH`
    is not one: each job sets `sys.path` itself)."""
    return {k: v for k, v in env.items() if k != "PYTHONPATH" and (
        k.startswith(_START_UP_PREFIXES) or k in _START_UP_NAMES)}


def _stamps(modules):
    """`{name: mtime of its source file}` for the modules imported here."""
    stamps = {}
    for name in modules:
        path = getattr(sys.modules.get(name), "__file__", None)
        try:
            stamps[name] = os.stat(path).st_mtime_ns if path else None
        except OSError:
            stamps[name] = None
    return stamps
