"""Where Graft keeps its caches, built-in models and run history."""
from __future__ import annotations

import os
from pathlib import Path

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
