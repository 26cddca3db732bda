"""Where Graft keeps its caches, built-in models and run history; which process owns what (from the
process facts of :mod:`engine.core.processes`); and the registered staging folders that saves are
written into."""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from platformdirs import user_cache_dir

from .outputs import share_like_new
from .processes import pid_alive, process_start_time, this_host


def graft_home() -> Path:
    """Root of Graft's user cache. ``GRAFT_HOME`` overrides it (tests use a temp dir)."""
    env = os.environ.get("GRAFT_HOME")
    root = Path(env) if env else Path(user_cache_dir("graft"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def models_dir() -> Path:
    """Built-in and converted models. Kept apart from GRAFT_HOME so tests that isolate their
    history still share the (expensive to build) model cache; ``GRAFT_MODELS_HOME`` overrides."""
    env = os.environ.get("GRAFT_MODELS_HOME")
    p = Path(env) if env else Path(user_cache_dir("graft")) / "models"
    p.mkdir(parents=True, exist_ok=True)
    return p


def history_db() -> Path:
    return graft_home() / "history.sqlite"


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    return repo_root() / "data"


def check_writable_parent(out_dir: Path) -> None:
    """Fail early, with one line, when ``out_dir`` cannot be created or written: its parent is
    created if missing and must be writable, and ``out_dir`` itself must not be a file."""
    from .errors import GraftError

    if out_dir.exists() and not out_dir.is_dir():
        raise GraftError(f"output path {out_dir} exists and is not a folder")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GraftError(f"cannot create {out_dir.parent}: {e.strerror or e}") from None
    if not os.access(out_dir.parent, os.W_OK):
        raise GraftError(f"output folder {out_dir.parent} is not writable")


# --------------------------------------------------------------------------------------------
# Process owners: who made a run or a half-written folder, and whether that process still lives


_OWNER: Optional[dict[str, Any]] = None


def current_owner() -> dict[str, Any]:
    """This process as an owner: ``{"pid": int, "host": str, "started": float | None}``."""
    global _OWNER
    pid = os.getpid()
    if _OWNER is None or _OWNER["pid"] != pid:  # recomputed after a fork
        _OWNER = {"pid": pid, "host": this_host(), "started": process_start_time(pid)}
    return dict(_OWNER)


# Start times read twice from /proc can differ by a clock tick, or by a clock step that moved the
# computed boot time; a reused pid belongs to a process started later than that.
START_TIME_TOLERANCE_S = 1.0


def owner_gone(pid: Optional[int], host: Optional[str], started: Optional[float]) -> bool:
    """True only when the owner is known to be gone: it ran on this host and its pid is not alive,
    or the pid is alive but belongs to a process that started at another time (pid reuse).
    An owner on another host, or one whose start time cannot be compared, counts as alive."""
    if pid is None or host is None or host != this_host():
        return False
    if not pid_alive(int(pid)):
        return True
    if started is None:
        return False
    now_started = process_start_time(int(pid))
    if now_started is None:
        return False
    return abs(now_started - float(started)) > START_TIME_TOLERANCE_S


# --------------------------------------------------------------------------------------------
# Staging folders for saves: registered so that a save killed half-way is cleaned up later

_STAGING_SCHEMA = """
CREATE TABLE IF NOT EXISTS staging (
    path TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    out_dir TEXT NOT NULL,
    owner_pid INTEGER NOT NULL,
    owner_host TEXT NOT NULL,
    owner_started REAL,
    created REAL NOT NULL
);
"""


def staging_db() -> Path:
    return graft_home() / "staging.sqlite"


@contextmanager
def _registry() -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(str(staging_db()), timeout=30)
    try:
        conn.row_factory = sqlite3.Row
        conn.executescript(_STAGING_SCHEMA)
        yield conn
        conn.commit()
    finally:
        conn.close()


def _abs(p: Union[str, Path]) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(p))))


def _register(path: Path, kind: str, out_dir: Path) -> None:
    """Record ``path`` (before it exists on disk) as a staging folder of this process. A registry
    that cannot be written does not stop the save; the folder is then only not recoverable."""
    o = current_owner()
    try:
        with _registry() as c:
            c.execute(
                "INSERT OR REPLACE INTO staging (path, kind, out_dir, owner_pid, owner_host, owner_started, "
                "created) VALUES (?,?,?,?,?,?,?)",
                (str(path), kind, str(out_dir), o["pid"], o["host"], o["started"], time.time()),
            )
    except (sqlite3.Error, OSError) as e:
        warnings.warn(f"could not register staging folder {path}: {e}", RuntimeWarning, stacklevel=3)


def _forget(path: Path) -> None:
    try:
        with _registry() as c:
            c.execute("DELETE FROM staging WHERE path=?", (str(path),))
    except (sqlite3.Error, OSError):
        pass


def staging_dir(out_dir: Path) -> Path:
    """Create and register an empty hidden sibling ``.{name}.tmp-{pid}-{hex}`` of ``out_dir`` to
    write a save into; finish with ``replace_dir(tmp, out_dir)`` or ``discard_staging(tmp)``.
    If this process dies first, ``clean_stale_staging()`` in a later one removes it."""
    out_dir = _abs(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    _register(tmp, "tmp", out_dir)  # registered first: no moment when it exists unrecorded
    try:
        tmp.mkdir()
    except BaseException:
        _forget(tmp)
        raise
    return tmp


def discard_staging(tmp: Path) -> None:
    """Delete the staging folder ``tmp`` (if still there) and forget it. A folder that could not
    be deleted stays registered, for ``clean_stale_staging()`` once this process is gone."""
    tmp = _abs(tmp)
    if tmp.exists() or tmp.is_symlink():
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            try:
                tmp.unlink()
            except OSError:
                pass
    if not (tmp.exists() or tmp.is_symlink()):
        _forget(tmp)


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished folder ``tmp`` to ``out_dir``. An existing ``out_dir`` is set aside first,
    restored if the move fails, and deleted only once the new one is in place: a failed save never
    loses what was on disk. The set-aside ``.{name}.old-{pid}-{hex}`` is registered, so a process
    killed between the two renames has ``out_dir`` restored by ``clean_stale_staging()``."""
    tmp, out_dir = _abs(tmp), _abs(out_dir)
    old: Optional[Path] = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        _register(old, "old", out_dir)
        try:
            os.replace(out_dir, old)
        except BaseException:
            _forget(old)
            raise
    share_like_new(tmp)  # safetensors writes 0600
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
            _forget(old)
        raise
    _forget(tmp)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        if not old.exists():
            _forget(old)


def _tree_bytes(p: Path) -> int:
    total = 0
    for root, dirs, files in os.walk(p):
        for name in files + dirs:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                total += st.st_size
    return total


def staging_entries() -> list[dict[str, Any]]:
    """Every registered staging folder: path, kind ("tmp" or "old"), out_dir, owner_pid,
    owner_host, owner_started, created, and owner_gone (bool)."""
    try:
        with _registry() as c:
            rows = [dict(r) for r in c.execute("SELECT * FROM staging ORDER BY created")]
    except (sqlite3.Error, OSError):
        return []
    for r in rows:
        r["owner_gone"] = owner_gone(r["owner_pid"], r["owner_host"], r["owner_started"])
    return rows


def clean_stale_staging() -> list[dict[str, Any]]:
    """Remove the registered staging folders whose owner process is gone (see ``owner_gone``).

    A ``.tmp`` folder is deleted. A set-aside ``.old`` folder is put back at its ``out_dir`` when
    that is missing (the owner died between the two renames of ``replace_dir``), and deleted only
    when ``out_dir`` is in place. Only registered paths are touched, never other folders.
    Returns one dict per folder acted on: ``{"path", "out_dir", "kind", "action", "bytes"}`` with
    action "removed" (bytes freed), "restored" (bytes put back), "kept" (an old folder left on
    disk, unregistered, because ``out_dir`` was since filled by something else) or "failed"
    (plus "error"; it stays registered and is tried again next time)."""
    done: list[dict[str, Any]] = []
    entries = staging_entries()
    # Save folders whose owner never renamed them into place: when one is still on disk, an
    # ``out_dir`` present now is not the owner's new save, so its set-aside old one is kept.
    unplaced = {
        (e["owner_pid"], e["owner_host"], e["out_dir"])
        for e in entries
        if e["kind"] == "tmp" and os.path.isdir(e["path"])
    }
    for e in entries:
        if not e["owner_gone"]:
            continue
        path, out_dir, kind = Path(e["path"]), Path(e["out_dir"]), e["kind"]
        # Claim the entry: of several processes cleaning at once, one acts on it.
        try:
            with _registry() as c:
                claimed = (
                    c.execute(
                        "DELETE FROM staging WHERE path=? AND owner_pid=? AND created=?",
                        (e["path"], e["owner_pid"], e["created"]),
                    ).rowcount
                    == 1
                )
        except (sqlite3.Error, OSError):
            continue
        if not claimed:
            continue
        expected = f".{out_dir.name}.{kind}-"
        if (
            not path.name.startswith(expected)
            or path.parent != out_dir.parent
            or not path.is_dir()
            or path.is_symlink()
        ):
            continue  # gone already (or not what was registered): only the entry is dropped
        item: dict[str, Any] = {
            "path": str(path),
            "out_dir": str(out_dir),
            "kind": kind,
            "bytes": _tree_bytes(path),
        }
        try:
            if kind == "old" and not os.path.lexists(out_dir):
                os.replace(path, out_dir)
                item["action"] = "restored"
            elif kind == "old" and (e["owner_pid"], e["owner_host"], e["out_dir"]) in unplaced:
                item["action"] = "kept"  # out_dir came from elsewhere: delete neither
            else:
                shutil.rmtree(path)
                item["action"] = "removed"
        except OSError as err:
            item.update(action="failed", error=str(err.strerror or err))
            if path.exists():  # try again on a later start
                try:
                    with _registry() as c:
                        c.execute(
                            "INSERT OR IGNORE INTO staging (path, kind, out_dir, owner_pid, owner_host, "
                            "owner_started, created) VALUES (?,?,?,?,?,?,?)",
                            (
                                e["path"],
                                kind,
                                e["out_dir"],
                                e["owner_pid"],
                                e["owner_host"],
                                e["owner_started"],
                                e["created"],
                            ),
                        )
                except (sqlite3.Error, OSError):
                    pass
        done.append(item)
    return done


def format_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def describe_cleanup(items: list[dict[str, Any]]) -> str:
    """One line saying what ``clean_stale_staging()`` did, "" when it did nothing, e.g.
    "removed 1 leftover partial save: /x/.model.tmp-123-ab12 (514.2 MB)"."""
    parts = []
    removed = [i for i in items if i.get("action") == "removed"]
    if removed:
        what = "leftover partial save" + ("s" if len(removed) != 1 else "")
        listed = ", ".join(f"{i['path']} ({format_bytes(i['bytes'])})" for i in removed)
        total = f" ({format_bytes(sum(i['bytes'] for i in removed))} in all)" if len(removed) > 1 else ""
        parts.append(f"removed {len(removed)} {what}{total}: {listed}")
    for i in items:
        if i.get("action") == "restored":
            parts.append(
                f"restored {i['out_dir']} from {i['path']} (a save was interrupted while replacing it)"
            )
    for i in items:
        if i.get("action") == "kept":
            parts.append(
                f"kept {i['path']} ({format_bytes(i['bytes'])}): a save into {i['out_dir']} was "
                "interrupted and the folder has been replaced since; delete it yourself if not needed"
            )
    for i in items:
        if i.get("action") == "failed":
            parts.append(f"could not remove leftover {i['path']}: {i.get('error', 'error')}")
    return "; ".join(parts)
