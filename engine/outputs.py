"""Output paths are checked before any model is loaded, by really writing there.

``os.access`` is not enough: root passes every permission check, and pseudo file systems
(``/proc``, ``/sys``) or read-only mounts refuse writes that look allowed. So each check creates
and removes a small probe file where the output will go. A path that fails costs the user one
line and no minutes of computation.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import GraftError


def _probe(folder: Path, what: str) -> None:
    try:
        fd, name = tempfile.mkstemp(prefix=".graft-probe-", dir=str(folder))
    except OSError as e:
        raise GraftError(f"{what}: cannot write in {folder} ({e.strerror or e})") from None
    os.close(fd)
    try:
        os.unlink(name)
    except OSError:
        pass


def _make_parent(folder: Path, what: str) -> None:
    if folder.exists():
        if not folder.is_dir():
            raise GraftError(f"{what}: {folder} is a file, not a folder")
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GraftError(f"{what}: cannot create folder {folder} ({e.strerror or e})") from None


def _output_path(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not str(path).strip():
        raise GraftError(f"{what}: empty path")
    return p


def _parent_takes_new_entry(p: Path, what: str) -> Path:
    _make_parent(p.parent, what)
    _probe(p.parent, what)
    return p


def check_output_file(path: str | Path, what: str = "output") -> Path:
    """``path`` can be written as a file: it is not a folder and its folder takes a new file."""
    p = _output_path(path, what)
    if p.is_dir():
        raise GraftError(f"{what}: {p} is a folder; give a file name such as {p / 'result.json'}")
    if p.exists() and not os.access(p, os.W_OK):
        raise GraftError(f"{what}: {p} exists and is read-only")
    return _parent_takes_new_entry(p, what)


def check_output_dir(path: str | Path, what: str = "output folder") -> Path:
    """``path`` can become a folder: it is not a file, and its parent takes a new entry."""
    p = _output_path(path, what)
    if p.exists() and not p.is_dir():
        raise GraftError(f"{what}: {p} exists and is a file, not a folder")
    return _parent_takes_new_entry(p, what)


def check_input_file(path: str | Path, what: str = "input") -> Path:
    """``path`` is a readable file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise GraftError(f"{what}: file not found: {path}")
    if p.is_dir():
        raise GraftError(f"{what}: {path} is a folder, not a file")
    try:
        with open(p, "rb") as f:
            f.read(1)
    except OSError as e:
        raise GraftError(f"{what}: cannot read {path} ({e.strerror or e})") from None
    return p
