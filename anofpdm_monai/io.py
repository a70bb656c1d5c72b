"""File writing shared by every writer of the package: outputs are written atomically (never half-written), with the
permissions a plain ``open`` would give, and errors are reported as one line.

Every module that writes a file goes through :func:`atomic_path` (or one of the small wrappers below); no other
module calls ``tempfile``/``os.replace`` itself.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

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
