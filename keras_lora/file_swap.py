"""Putting a finished export artifact in place without a moment of no artifact.

A file is replaced with one `os.replace` (atomic). A directory cannot be
replaced atomically with `rename`, so on Linux the finished directory and
the old one are swapped with `renameat2(RENAME_EXCHANGE)`, one atomic
step. Where that call is missing (other systems, old kernels, some file
systems), the old directory is first renamed to `<staging>/previous` and
the new one renamed into place; a process killed between the two renames
leaves the previous artifact in its staging directory, and
`recover_previous` (run by the next export to the same path) puts it back.
"""

import ctypes
import errno
import os
import shutil

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def is_previous_artifact(path, is_directory_format):
    """Whether `path` looks like an earlier artifact of the same format."""
    if is_directory_format:
        return os.path.isdir(path) and os.path.isfile(
            os.path.join(path, "saved_model.pb")
        )
    return os.path.isfile(path) and not os.path.islink(path)


def move_into_place(artifact, target, previous):
    """Moves `artifact` to `target`; the old `target` ends at `previous`.

    Args:
        artifact: the finished file or directory.
        target: where it goes; replaced if present.
        previous: a free path on the same file system (inside the staging
            directory) where the old artifact is kept until the end.
    """
    if not os.path.lexists(target):
        os.rename(artifact, target)
        return
    if not (os.path.isdir(artifact) or os.path.isdir(target)):
        os.replace(artifact, target)  # atomic for files
        return
    if _exchange(artifact, target):
        return  # the old artifact now sits at `artifact`, in staging
    os.rename(target, previous)
    try:
        os.rename(artifact, target)
    except BaseException:
        os.rename(previous, target)
        raise


def _exchange(first, second):
    """Atomically swaps two paths (Linux `renameat2`); False if unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                          ctypes.c_char_p, ctypes.c_uint]
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD,
                       os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), second)


def recover_previous(directory, prefix, target, previous_name):
    """Puts back an artifact a killed export left in its staging directory.

    Only when `target` is missing and the staging directory belongs to a
    dead process: a crash between the two renames of the fallback swap.
    """
    if os.path.lexists(target):
        return
    for staging in _stale(directory, prefix):
        previous = os.path.join(staging, previous_name)
        if os.path.lexists(previous):
            os.rename(previous, target)
            return


def remove_stale(directory, prefix):
    """Removes staging directories named `<prefix><pid>-...` of dead pids."""
    for staging in _stale(directory, prefix):
        shutil.rmtree(staging, ignore_errors=True)


def _stale(directory, prefix):
    found = []
    for entry in sorted(os.listdir(directory)):
        if not entry.startswith(prefix):
            continue
        pid = entry[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            found.append(os.path.join(directory, entry))
    return found


def process_alive(pid):
    """Whether process `pid` exists (a zombie counts as dead)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
