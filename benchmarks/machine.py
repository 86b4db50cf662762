"""A description of the machine a run happened on."""

import os
import platform
import subprocess


def _lscpu_fields(names):
    try:
        text = subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in names:
            fields[key.strip()] = value.strip()
    return fields


def _memory_gib():
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def describe():
    """Returns a dict: platform, Python, CPU model, core counts, memory."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "nproc": os.cpu_count(),
        "memory_gib": _memory_gib(),
    }
    info.update(
        _lscpu_fields(
            ("Model name", "CPU(s)", "Thread(s) per core", "L2 cache",
             "L3 cache", "Hypervisor vendor")
        )
    )
    return info
