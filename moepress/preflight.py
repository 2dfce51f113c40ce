"""Checks that run before long work: will the outputs be writable, is there room for them.

An output path that turns out to be unwritable must not cost an hour of calibration, so every
command checks its outputs first, with these helpers. Each raises :class:`MoepressError` with one
line that names the path, says what is wrong and what to do; ``what`` says which output it is
(``"the plan"``, ``"--json"``, ``"the checkpoint"``), so the line reads "cannot write the plan ...".

The tests write and remove a real temporary file (or folder) instead of trusting ``os.access``
alone: a read-only mount, a full quota or an ACL answers ``os.access`` wrongly, and root passes it
everywhere.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from .errors import MoepressError


def _try_create(folder: str, name: str, what: str, path: str, make_dir: bool = False) -> None:
    """Create and remove a temporary file (or folder) in ``folder``, or raise one line."""
    prefix = f".{name}.moepress-check-"
    try:
        if make_dir:
            os.rmdir(tempfile.mkdtemp(prefix=prefix, dir=folder))
        else:
            fd, tmp = tempfile.mkstemp(prefix=prefix, dir=folder)
            os.close(fd)
            os.remove(tmp)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise MoepressError(f"cannot write {what} {path}: cannot create files in {folder} ({reason}); "
                            "pick a writable location") from None


def _parent(path: str, what: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(parent):
        raise MoepressError(f"cannot write {what} {path}: folder {parent} does not exist; create it or pick another path")
    if not os.path.isdir(parent):
        raise MoepressError(f"cannot write {what} {path}: {parent} is a file, not a folder; pick another path")
    return parent


def check_writable_file(path: str, what: str = "output file") -> None:
    """``path`` can be written as a file: it is not a folder, its folder exists and accepts new files
    (moepress writes ``path.tmp`` beside it and renames it), and an existing file is writable."""
    if os.path.isdir(path):
        raise MoepressError(f"cannot write {what} {path}: it is a folder; give a file name")
    parent = _parent(path, what)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise MoepressError(f"cannot write {what} {path}: the file is read-only; pick another path or make it writable")
    _try_create(parent, os.path.basename(path), what, path)


def check_writable_dir(path: str, what: str = "output folder") -> None:
    """``path`` can be written as a folder (created, or replaced): it is not a file and its parent
    exists and accepts new folders (moepress writes a temporary folder beside ``path`` and renames it).
    Whether an existing folder may be replaced (``--overwrite``) is the caller's question."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise MoepressError(f"cannot write {what} {path}: it is a file, not a folder; pick another path")
    _try_create(_parent(path, what), os.path.basename(os.path.abspath(path)), what, path, make_dir=True)


def _size(nbytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:,.0f} {unit}" if unit == "bytes" else f"{nbytes:,.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def check_free_space(folder: str, needed_bytes: int, what: str = "the output") -> None:
    """The file system holding ``folder`` (or its nearest existing parent, when ``folder`` is still
    to be created) has at least ``needed_bytes`` free; the line says how much is needed and free."""
    existing = os.path.abspath(folder)
    while not os.path.isdir(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        raise MoepressError(f"not enough disk space for {what} in {existing}: it needs about {_size(needed_bytes)}, "
                            f"{_size(free)} is free; free some space or pick another location")
