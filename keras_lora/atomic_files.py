"""Atomic file replacement that leaves nothing behind a crash can't clean.

A file is written under a temporary name beside its target,
`.<target name>.<8 random characters><suffix>` (`tempfile.mkstemp`'s
naming), flushed to disk and renamed over the target, so a reader sees the
old file or the new one, never a partial one. A process killed mid-write
leaves its temporary file behind; the next successful write to the same
target removes such leftovers.

A writer holds an exclusive `flock` on its temporary file while it writes,
so a leftover can be told from a file another process is still writing: the
lock is released when its process dies, and only lockable leftovers are
removed. Where `fcntl` is not available (Windows), only leftovers older than
`STALE_AFTER_S` are removed.

New files get the mode `0o666 & ~umask`, as `open()` would create them
(`mkstemp` creates `0o600`); a file that is replaced keeps its mode.
"""

import contextlib
import os
import re
import stat
import tempfile
import time

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

# Without locks, how old a leftover must be before it counts as stale.
STALE_AFTER_S = 3600.0
# `tempfile.mkstemp`'s random part: 8 characters of this alphabet.
_RANDOM_PART = "[a-z0-9_]{8}"


def write_atomically(payload, target, suffix=".tmp"):
    """Writes `payload` (bytes) to `target` through a temporary file.

    Args:
        payload: the bytes to write.
        target: the absolute path to replace or create.
        suffix: the temporary file's suffix.

    Example:

    >>> write_atomically(b"data", "/tmp/a.bin")  # doctest: +SKIP
    """
    with temporary_beside(target, suffix) as (handle, _):
        handle.write(payload)


@contextlib.contextmanager
def temporary_beside(target, suffix=".tmp"):
    """Yields `(binary file, path)` of a temporary file that replaces
    `target` when the block ends without an exception (and is removed when
    it raises). Stale leftovers of earlier writes to `target` are removed
    first. The block may write through the handle or through the path (the
    lock is held by the handle either way).

    Example:

    >>> with temporary_beside("/tmp/m.keras", ".keras") as (_, path):
    ...     model.save(path)  # doctest: +SKIP
    """
    parent, name = os.path.split(target)
    mode = _mode_for(target)
    handle, temporary = _locked_temporary(parent, name, suffix)
    try:
        with handle:
            remove_stale_temporaries(target, suffix, keep=temporary)
            yield handle, temporary
            handle.flush()
            # The block may have written through the path: sync that file.
            with open(temporary, "rb") as written:
                os.fsync(written.fileno())
            os.chmod(temporary, mode)
            os.replace(temporary, target)
    except BaseException:
        if os.path.lexists(temporary):
            os.unlink(temporary)
        raise


def remove_stale_temporaries(target, suffix=".tmp", keep=None):
    """Removes `.<name>.XXXXXXXX<suffix>` leftovers of writes to `target`.

    Only regular files whose name matches exactly that pattern are touched,
    and only those no live writer holds (see the module docstring).

    Returns:
        The paths removed.
    """
    parent, name = os.path.split(target)
    pattern = re.compile(
        re.escape(f".{name}.") + _RANDOM_PART + re.escape(suffix) + r"\Z"
    )
    removed = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return removed
    for entry in entries:
        path = os.path.join(parent, entry)
        if not pattern.match(entry) or path == keep:
            continue
        with contextlib.suppress(OSError):
            if _remove_if_abandoned(path):
                removed.append(path)
    return removed


def _remove_if_abandoned(path):
    if not stat.S_ISREG(os.lstat(path).st_mode):
        return False
    if fcntl is None:
        if time.time() - os.lstat(path).st_mtime < STALE_AFTER_S:
            return False
        os.unlink(path)
        return True
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live writer holds it
        os.unlink(path)
        return True
    finally:
        os.close(descriptor)


def _locked_temporary(parent, name, suffix):
    """A new temporary file beside the target, locked by the returned handle.

    A cleaner may list a fresh file before its writer locks it and remove
    it; the writer then sees its path gone (or another file there) and
    starts again.
    """
    while True:
        descriptor, temporary = tempfile.mkstemp(
            prefix=f".{name}.", suffix=suffix, dir=parent
        )
        handle = os.fdopen(descriptor, "w+b")
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            same = os.path.samestat(os.fstat(handle.fileno()), os.lstat(temporary))
        except FileNotFoundError:
            same = False
        if same:
            return handle, temporary
        handle.close()


def _mode_for(target):
    """The mode a replaced file keeps, or the umask's mode for a new one."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask():
    # Reading it without changing it (thread-safe) where Linux allows.
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
