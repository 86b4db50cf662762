"""Keeps backends' native start-up log lines out of a command's stderr.

TensorFlow (imported by Keras on every backend when it is installed) logs
through absl before absl is initialised, which no environment variable
silences: "WARNING: All log messages before absl::InitializeLog() ...",
"I0000 ... port.cc:153] oneDNN custom operations are on ...",
"I0000 ... cudart_stub.cc:31] Could not find cuda drivers ...",
"... cpu_feature_guard.cc ...". `filtered_stderr()` routes file descriptor 2
through a filter that drops exactly such lines and passes everything else
through as it comes (Python tracebacks, warnings, real errors).
"""

import contextlib
import os
import re
import sys
import threading

# absl / glog info and warning lines: "I0000 00:00:17.9 1234 file.cc:31] ..."
_NOISE = re.compile(
    rb"^(?:WARNING: All log messages before absl::InitializeLog\(\) is called"
    rb"|[IW]\d{4} [\d:.]+\s+\d+ [\w./-]+:\d+\] "
    rb"|E\d{4} [\d:.]+\s+\d+ [\w./-]+:\d+\] Unable to register cu"
    rb"|To enable the following instructions: .* rebuild TensorFlow)"
)


def is_noise(line):
    """Whether one stderr line (bytes) is a backend's start-up log line.

    Example:

    >>> is_noise(b"I0000 00:00:17.5 7 cudart_stub.cc:31] Could not find cuda")
    True
    >>> is_noise(b"Traceback (most recent call last):")
    False
    """
    return bool(_NOISE.match(line))


@contextlib.contextmanager
def filtered_stderr():
    """Within the block, lines written to file descriptor 2 (by Python or
    native code) reach the real stderr unless `is_noise` says otherwise.

    Example:

    >>> with filtered_stderr():
    ...     import keras  # doctest: +SKIP
    """
    try:
        original = os.dup(2)
    except OSError:  # no stderr descriptor: nothing to filter
        yield
        return
    read_end, write_end = os.pipe()
    pump = threading.Thread(target=_pump, args=(read_end, original), daemon=True)
    pump.start()
    _flush()
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        _flush()
        os.dup2(original, 2)  # closes the pipe's last write end
        pump.join(timeout=5)
        os.close(original)


def _pump(read_end, target):
    with os.fdopen(read_end, "rb", buffering=0) as source:
        pending = b""
        while True:
            chunk = source.read(65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            _write(target, b"".join(
                line + b"\n" for line in lines if not is_noise(line)
            ))
        if pending and not is_noise(pending):
            _write(target, pending)


def _write(descriptor, data):
    with contextlib.suppress(OSError):  # stderr closed under us
        while data:
            data = data[os.write(descriptor, data):]


def _flush():
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
