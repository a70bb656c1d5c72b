"""File writing shared by every writer of the package: outputs are written atomically (never half-written), with the
permissions a plain ``open`` would give, and errors are reported as one line.

Every module that writes a file goes through :func:`atomic_path` (or one of the small wrappers below), and a group of
files that belong together (the outputs of one inference case) through :func:`atomic_folder`; no other module calls
``tempfile``/``os.replace`` itself.

- :func:`atomic_folder`: the files are written into ``.<name>.tmp-XXXXXXXX/`` next to the final folder, which is then
  swapped into place: an existing folder is renamed aside (``.<name>.old-XXXXXXXX``), the new one renamed in, the old
  one deleted. A process killed at any instant leaves the old complete folder or the new complete one, plus hidden
  folders that :func:`recover_folder_swaps` resolves (the old folder is put back when the kill fell between the two
  renames; temporary folders are deleted).
- :class:`OutputLock`: an exclusive ``fcntl.flock`` on ``<folder>/.lock`` held for a run, so that a second run on the
  same output folder stops at start (:class:`OutputPathError` naming the holder's pid) instead of deleting the first
  run's temporary files; cleaning up after killed runs is only done while holding it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked (a warning says so)
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "atomic_path",
    "atomic_link",
    "write_text",
    "write_json",
    "torch_save",
    "save_npz",
    "default_mode",
    "first_line",
    "remove_stale_temporaries",
    "atomic_folder",
    "recover_folder_swaps",
    "sha256_file",
    "file_record",
    "OutputLock",
    "output_lock",
    "acquire_output_lock",
    "release_output_lock",
    "holds_output_lock",
    "OutputPathError",
    "ensure_writable_dir",
    "ensure_writable_file",
]


def default_mode(directory: bool = False) -> int:
    """Permissions a normally created file (0666) or folder (0777) gets under the current umask.

    ``tempfile`` creates 0600/0700 entries; the renamed output would otherwise keep those.
    """
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


class OutputPathError(ValueError):
    """An output folder or file that cannot be written (one line naming the option and the path)."""


def ensure_writable_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create the folder ``path`` if needed and check that files can be created in it, before any work is done.

    Raises:
        OutputPathError: one line naming ``what`` and the path (an existing file, an unwritable folder, ...).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{what} {path} is an existing file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_check.", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        reason = exc.strerror or first_line(exc)
        raise OutputPathError(f"{what} {path} is not writable ({reason})") from None
    return path


def ensure_writable_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """Check, before any work is done, that the file ``path`` can be written (atomically, next to itself): it is not
    a folder and its folder is writable (created if needed).

    Raises:
        OutputPathError: one line naming ``what`` and the path.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{what} {path} is an existing folder, not a file")
    ensure_writable_dir(path.parent, f"the folder of {what}")
    return path


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it gets normal permissions and replaces ``path``.

    On an exception the temporary file is removed and ``path`` is untouched.

    Args:
        path: the final file.
        suffix: suffix of the temporary name (e.g. ``.nii.gz`` for writers that pick the format by suffix).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def remove_stale_temporaries(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Remove the temporary files :func:`atomic_path` leaves when its process is killed mid-write
    (``.<name>.<random><suffix>`` next to each final path); returns what was removed. Call it only for outputs no
    other running process is writing."""
    removed = []
    for path in paths:
        path = Path(path)
        if not path.parent.is_dir():
            continue
        for stale in path.parent.glob(f".{glob_escape(path.name)}.*"):
            if stale.is_file():
                stale.unlink(missing_ok=True)
                removed.append(stale)
    return removed


_SWAP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[a-z0-9_]{8}$")  # tempfile.mkdtemp's 8 characters


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder next to the folder ``path``; on success it replaces ``path`` as one unit.

    Write the files with their final names into the yielded folder. On success the folder gets normal permissions
    and is swapped into place: an existing ``path`` is renamed aside first and deleted after the new folder is in.
    On an exception the temporary folder is deleted and ``path`` is untouched. A kill leaves either the old or the
    new complete ``path`` (or the old one renamed aside, put back by :func:`recover_folder_swaps`).

    Raises:
        OutputPathError: ``path`` exists and is not a folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{path} is an existing file, not a folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, default_mode(directory=True))  # mkdtemp makes 0700
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``; an existing ``path`` is renamed aside first and deleted after."""
    aside = None
    if path.is_dir():
        # rename(2) replaces an empty folder, so the unique name mkdtemp reserves can take the old folder
        aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.rename(path, aside)
    try:
        os.rename(tmp, path)
    except BaseException:
        if aside is not None:
            os.rename(aside, path)  # the old folder back in place
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def recover_folder_swaps(parent: str | os.PathLike) -> list[str]:
    """Resolve what :func:`atomic_folder` leaves in ``parent`` when its process is killed: temporary folders
    (``.<name>.tmp-*``) are deleted; a folder renamed aside (``.<name>.old-*``) is put back when ``<name>`` is
    missing (the kill fell between the two renames) and deleted otherwise. Returns one line per action. Call it only
    while no other process writes into ``parent`` (holding its :class:`OutputLock`)."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    found = []
    for entry in parent.iterdir():
        match = _SWAP_NAME.match(entry.name)
        if match and entry.is_dir() and not entry.is_symlink():
            found.append((match["kind"], match["name"], entry))
    actions = []
    for _, _name, entry in sorted((f for f in found if f[0] == "tmp"), key=lambda f: f[2].name):
        shutil.rmtree(entry, ignore_errors=True)
        actions.append(f"removed the temporary folder {entry.name} of a killed run")
    # the newest folder renamed aside first: it is the one that was in place last
    olds = sorted((f for f in found if f[0] == "old"), key=lambda f: f[2].stat().st_mtime_ns, reverse=True)
    for _, name, entry in olds:
        target = parent / name
        if not target.exists() and any(entry.iterdir()):
            os.rename(entry, target)
            actions.append(f"put {name} back in place (a run was killed while replacing it)")
        else:
            shutil.rmtree(entry, ignore_errors=True)
            actions.append(f"removed {entry.name}, left by a killed run")
    return actions


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file's content (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """``{"size", "mtime_ns", "sha256"}`` of a file (raises ``OSError`` when it cannot be read)."""
    st = os.stat(path)
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns), "sha256": sha256_file(path)}


# ---------------------------------------------------------------------------------------------------------------------
# one run per output folder
# ---------------------------------------------------------------------------------------------------------------------

LOCK_NAME = ".lock"
_HELD: dict[str, OutputLock] = {}  # the locks this process holds, by real folder path
_logger = logging.getLogger(__name__)


class OutputLock:
    """Exclusive lock of an output folder for the duration of a run (``fcntl.flock`` on ``<folder>/.lock``,
    non-blocking), so that two runs never write into one folder at the same time.

    The lock file holds the owner's pid and host; :meth:`release` deletes it. The kernel drops the lock when its
    process ends, killed or not, so a lock file a killed run left does not block the next run. Use
    :func:`acquire_output_lock`/:func:`output_lock`, which keep one lock per folder and process.

    Args:
        folder: the output folder (created if needed).
        what: the option that names it, for the error message.
    """

    def __init__(self, folder: str | os.PathLike, what: str = "output_dir") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> str:
        """What the lock file says about its owner (``pid N on host``), or ``pid unknown``."""
        try:
            text = self.path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            text = ""
        return text.splitlines()[0] if text else "pid unknown"

    def acquire(self) -> OutputLock:
        """Take the lock.

        Raises:
            OutputPathError: another process holds it (one line naming the folder and the holder's pid).
        """
        if self.held:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            if fcntl is None:
                _logger.warning(
                    "%s %s: file locks are not available here; runs sharing it are not detected", self.what, self.folder
                )
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputPathError(
                    f"{self.what} {self.folder} is in use by another run ({self.holder()}); wait for it to end or "
                    f"choose another {self.what}"
                ) from None
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    os.close(fd)
                    raise
                _logger.warning(
                    "%s %s: file locks are not supported here (%s); runs sharing it are not detected",
                    self.what,
                    self.folder,
                    exc.strerror,
                )
                break
            # a run that released the lock deletes the file: we may have locked a file that is no longer the one
            # at the path; then lock the new one
            if _same_file(fd, self.path):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Delete the lock file and drop the lock (nothing when not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if _same_file(fd, self.path):
                os.remove(self.path)  # while still locked: no other run can hold this file
        except OSError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _lock_key(folder: str | os.PathLike) -> str:
    return os.path.realpath(folder)


def acquire_output_lock(folder: str | os.PathLike, what: str = "output_dir") -> OutputLock:
    """The :class:`OutputLock` of ``folder``, taken now unless this process holds it already; it stays held until
    :func:`release_output_lock` (or the process ends).

    Raises:
        OutputPathError: another run holds it.
    """
    key = _lock_key(folder)
    lock = _HELD.get(key)
    if lock is not None and lock.held:
        return lock
    lock = OutputLock(folder, what).acquire()
    _HELD[key] = lock
    return lock


def release_output_lock(folder: str | os.PathLike) -> bool:
    """Release the lock this process holds on ``folder``; False when it held none."""
    lock = _HELD.pop(_lock_key(folder), None)
    if lock is None or not lock.held:
        return False
    lock.release()
    return True


def holds_output_lock(folder: str | os.PathLike) -> bool:
    """Whether this process holds the lock of ``folder``."""
    lock = _HELD.get(_lock_key(folder))
    return lock is not None and lock.held


@contextmanager
def output_lock(folder: str | os.PathLike, what: str = "output_dir") -> Iterator[OutputLock]:
    """Hold the lock of ``folder`` for a block: taken on entry unless this process holds it already, and then
    released on exit (a lock held before the block stays held)."""
    if holds_output_lock(folder):
        yield _HELD[_lock_key(folder)]
        return
    lock = acquire_output_lock(folder, what)
    try:
        yield lock
    finally:
        if _HELD.get(_lock_key(folder)) is lock:
            release_output_lock(folder)


def atomic_link(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Make ``target`` a hard link to ``source`` (a copy where links are not supported), replacing it atomically."""
    target = Path(target)
    with atomic_path(target) as tmp:
        os.remove(tmp)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON atomically (values JSON cannot hold are written with ``str``)."""
    return write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


def torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def save_npz(path: str | os.PathLike, **arrays: Any) -> Path:
    """``numpy.savez_compressed`` atomically."""
    import numpy as np

    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)
    return Path(path)
