"""The warm export process: reused across exports, fresh where it matters.

Most jobs here are a few lines of Python that never import Keras, run in
a process of their own (`BACKEND`, not the TensorFlow one the exports
share), so they take milliseconds.
"""

import json
import os
import signal
import sys

import keras
import numpy as np
import pytest

from keras_lora import export_worker
from keras_lora import file_swap
from keras_lora.export import export_merged

BACKEND = "numpy"  # only names the slot: these jobs never import Keras

# Writes what the job saw to the file `sys.argv[2]` names.
REPORT = """
import json
request = json.loads(sys.argv[2])
with open(request["out"], "w") as file:
    json.dump({"value": os.environ.get("JOB_TEST_VALUE"),
               "cwd": os.getcwd(), "path_head": sys.path[0],
               "backend": os.environ["KERAS_BACKEND"]}, file)
"""


@pytest.fixture(autouse=True)
def no_test_worker():
    yield
    worker = export_worker._workers.pop(BACKEND, None)
    if worker is not None:
        worker.close()


def report(tmp_path, name="out.json", source=REPORT, modules=()):
    out = tmp_path / name
    status, output = export_worker.run_job(
        source, json.dumps({"out": str(out)}), BACKEND, modules)
    assert status == 0, output
    return json.loads(out.read_text())


def test_a_second_job_runs_in_the_same_process(tmp_path):
    report(tmp_path, "first.json")
    pid = export_worker.worker_pid(BACKEND)
    report(tmp_path, "second.json")
    assert export_worker.worker_pid(BACKEND) == pid is not None


def test_each_job_sees_the_current_environment_path_and_directory(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("JOB_TEST_VALUE", "one")
    first = report(tmp_path, "first.json")
    pid = export_worker.worker_pid(BACKEND)
    monkeypatch.setenv("JOB_TEST_VALUE", "two")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    second = report(tmp_path, "second.json")

    assert export_worker.worker_pid(BACKEND) == pid
    assert (first["value"], second["value"]) == ("one", "two")
    assert second["cwd"] == str(tmp_path)
    assert second["path_head"] == str(tmp_path)
    assert second["backend"] == BACKEND


def test_a_changed_start_up_variable_starts_a_new_process(tmp_path, monkeypatch):
    monkeypatch.setenv("TF_KERAS_LORA_TEST", "a")
    report(tmp_path, "first.json")
    first = export_worker.worker_pid(BACKEND)
    monkeypatch.setenv("TF_KERAS_LORA_TEST", "b")
    report(tmp_path, "second.json")
    second = export_worker.worker_pid(BACKEND)

    assert second != first
    assert not file_swap.process_alive(first)


def test_a_changed_module_file_starts_a_new_process(tmp_path, monkeypatch):
    module = tmp_path / "worker_test_module.py"
    module.write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "worker_test_module", raising=False)
    __import__("worker_test_module")
    source = REPORT + "import worker_test_module\n"
    report(tmp_path, "first.json", source, ["worker_test_module"])
    first = export_worker.worker_pid(BACKEND)
    report(tmp_path, "second.json", source, ["worker_test_module"])
    assert export_worker.worker_pid(BACKEND) == first

    module.write_text("VALUE = 2\n")
    stamp = os.stat(module).st_mtime_ns + 10**9
    os.utime(module, ns=(stamp, stamp))
    report(tmp_path, "third.json", source, ["worker_test_module"])
    assert export_worker.worker_pid(BACKEND) != first


def test_a_failed_job_reports_exit_code_and_output_and_the_next_starts_afresh(
    tmp_path,
):
    report(tmp_path, "first.json")
    first = export_worker.worker_pid(BACKEND)
    status, output = export_worker.run_job(
        "print('before the failure')\nraise ValueError('job broke')\n",
        "{}", BACKEND)

    assert status == 1
    assert "before the failure" in output and "ValueError: job broke" in output
    assert export_worker.worker_pid(BACKEND) is None
    assert not file_swap.process_alive(first)
    report(tmp_path, "second.json")
    assert export_worker.worker_pid(BACKEND) not in (None, first)


def test_a_job_exit_code_is_the_process_exit_code(tmp_path):
    status, output = export_worker.run_job(
        "import sys\nsys.exit(3)\n", "{}", BACKEND)
    assert (status, output) == (3, "")


def test_an_idle_process_that_was_killed_is_replaced(tmp_path):
    report(tmp_path, "first.json")
    first = export_worker.worker_pid(BACKEND)
    os.kill(first, signal.SIGKILL)
    export_worker._workers[BACKEND].process.wait()
    assert report(tmp_path, "second.json")["backend"] == BACKEND
    assert export_worker.worker_pid(BACKEND) != first


def test_what_a_successful_job_prints_is_kept_from_the_terminal(capfd):
    status, output = export_worker.run_job(
        "print('to stdout')\nos.write(2, b'to fd 2\\n')\n", "{}", BACKEND)

    assert status == 0
    assert "to stdout" in output and "to fd 2" in output
    assert capfd.readouterr() == ("", "")


def test_an_interrupted_job_ends_its_worker(tmp_path, monkeypatch):
    report(tmp_path)
    worker = export_worker._workers[BACKEND]

    def interrupted(self, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_worker._Worker, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_worker.run_job("", "{}", BACKEND)
    assert export_worker.worker_pid(BACKEND) is None
    assert not file_swap.process_alive(worker.process.pid)


def test_a_forked_child_does_not_use_the_parents_worker(tmp_path):
    report(tmp_path)
    child = os.fork()
    if child == 0:
        os._exit(0 if export_worker.worker_pid(BACKEND) is None else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert export_worker.worker_pid(BACKEND) is not None


def test_close_all_ends_the_processes(tmp_path):
    report(tmp_path)
    pid = export_worker.worker_pid(BACKEND)
    export_worker.close_all()
    assert export_worker.worker_pid(BACKEND) is None
    assert not file_swap.process_alive(pid)


@pytest.mark.backend("jax", "torch")
def test_exports_from_this_backend_share_one_tensorflow_process(tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    export_merged(model, str(tmp_path / "first"))
    pid = export_worker.worker_pid("tensorflow")
    export_merged(model, str(tmp_path / "second"))

    assert export_worker.worker_pid("tensorflow") == pid is not None
    for name in ("first", "second"):
        assert os.path.isfile(tmp_path / name / "saved_model.pb")
    np.testing.assert_array_equal(  # the model is unchanged by either
        model.get_weights()[1], np.zeros(2, "float32"))
