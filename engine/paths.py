"""Where Graft keeps its caches, built-in models and run history."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from platformdirs import user_cache_dir


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


def runs_dir() -> Path:
    p = graft_home() / "runs"
    p.mkdir(parents=True, exist_ok=True)
    return p


def history_db() -> Path:
    return graft_home() / "history.sqlite"


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    return repo_root() / "data"


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished folder ``tmp`` to ``out_dir``. An existing ``out_dir`` is set aside first,
    restored if the move fails, and deleted only once the new one is in place: a failed save never
    loses what was on disk."""
    import shutil
    import uuid

    old: Optional[Path] = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except OSError:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
