"""Output paths are checked before any model is loaded, by really writing there.

``os.access`` is not enough: root passes every permission check, and pseudo file systems
(``/proc``, ``/sys``) or read-only mounts refuse writes that look allowed. So each check creates
and removes a small probe file where the output will go. A path that fails costs the user one
line and no minutes of computation.
"""

from __future__ import annotations

import contextlib
import os
import stat
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


def check_output_file(path: str | Path, what: str = "output", suggest: str = "result.json") -> Path:
    """``path`` can be written as a file: it is not a folder and its folder takes a new file.

    A symbolic link stands for its target (the target is written, the link stays). A character
    device (``/dev/null``, ``/dev/stdout``) is written through (:func:`is_stream`); any other
    existing path that is not a regular file (a FIFO, a socket, a block device) is refused, so an
    atomic replace can never put a plain file in place of a device. ``suggest``: the file name an
    error suggests when ``path`` is a folder."""
    p = _output_path(path, what)
    if p.is_symlink():
        p = p.resolve()
    if p.is_dir():
        raise GraftError(f"{what}: {p} is a folder; give a file name in it, such as {p / suggest}")
    if p.exists() and not p.is_file():
        if is_stream(p):
            return p
        raise GraftError(f"{what}: {p} is not a regular file (a pipe, socket or device); give a file path")
    if p.exists() and not os.access(p, os.W_OK):
        raise GraftError(f"{what}: {p} exists and is read-only")
    return _parent_takes_new_entry(p, what)


def new_file_mode() -> int:
    """The permissions a new file gets here: 0666 less the process umask (read from /proc, so no
    thread ever sees a changed umask; else set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def share_like_new(path: Path) -> None:
    """Give ``path`` (a file, or every file under a folder) the permissions of a new file here
    (:func:`new_file_mode`). safetensors and temporary files are written 0600, which would leave a
    saved model or organ unreadable to the other users of a shared machine."""
    mode = new_file_mode()
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    for f in files:
        try:
            os.chmod(f, mode)
        except OSError:
            pass


def is_stream(p: Path) -> bool:
    """``p`` is a character device (written through, never replaced)."""
    try:
        return stat.S_ISCHR(os.stat(p).st_mode)
    except OSError:
        return False


def check_output_dir(path: str | Path, what: str = "output folder") -> Path:
    """``path`` can become a folder: it is not a file, and its parent takes a new entry."""
    p = _output_path(path, what)
    if p.exists() and not p.is_dir():
        raise GraftError(f"{what}: {p} exists and is a file, not a folder")
    return _parent_takes_new_entry(p, what)


def check_input_file(path: str | Path, what: str = "input") -> Path:
    """``path`` is a readable file."""
    p = Path(path).expanduser()
    if not os.path.exists(p):  # False, not OSError, for a name too long for the file system
        raise GraftError(f"{what}: file not found: {path}")
    if p.is_dir():
        raise GraftError(f"{what}: {path} is a folder, not a file")
    if not p.is_file():  # a FIFO would block the read below forever
        raise GraftError(f"{what}: {path} is not a regular file (a pipe, socket or device)")
    try:
        with open(p, "rb") as f:
            f.read(1)
    except OSError as e:
        raise GraftError(f"{what}: cannot read {path} ({e.strerror or e})") from None
    return p


def write_text_atomic(path: str, text: str, what: str, suggest: str = "result.json") -> Path:
    """Write ``text`` to ``path`` atomically: a failed write never clobbers an existing file and
    leaves no temporary file behind. ``what`` names the option in error messages; ``suggest`` the
    file name suggested when ``path`` is a folder."""
    out = check_output_file(path, what, suggest)
    if is_stream(out):  # /dev/null, /dev/stdout: written through, never replaced
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)
        return out
    try:  # keep an existing file's permissions; a new file gets the usual ones (0666 less the umask)
        mode = stat.S_IMODE(os.stat(out).st_mode)
    except OSError:
        mode = new_file_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=str(out.parent))
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return out
