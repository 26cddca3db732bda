"""Run history in SQLite (WAL): every job's tool, parameters, models, status, timings, result
JSON and artifact folder. Survives restarts; one connection per call keeps it thread-safe."""
from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from .paths import history_db

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    tool TEXT NOT NULL,
    title TEXT NOT NULL,
    donor TEXT,
    target TEXT,
    params TEXT NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    duration_s REAL,
    result TEXT,
    error TEXT,
    artifact_dir TEXT,
    source TEXT NOT NULL DEFAULT 'ui'
);
CREATE INDEX IF NOT EXISTS runs_created ON runs(created);
"""

STATUSES = ("queued", "running", "done", "failed", "cancelled")


class History:
    def __init__(self, path: Optional[Path] = None) -> None:
        self.path = Path(path) if path else history_db()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._conn() as c:
            c.execute("PRAGMA journal_mode=WAL")
            c.executescript(_SCHEMA)
            # A run left 'running' or 'queued' by a process that died cannot finish any more.
            c.execute("UPDATE runs SET status='failed', error='interrupted (the server stopped)' "
                      "WHERE status IN ('running','queued') AND finished IS NULL AND created < ?", (time.time() - 1,))

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(str(self.path), timeout=30)
        try:
            conn.row_factory = sqlite3.Row
            yield conn
            conn.commit()
        finally:
            conn.close()

    def create(self, run_id: str, tool: str, title: str, donor: str, target: str, params: dict[str, Any],
               source: str = "ui", artifact_dir: str = "") -> None:
        with self._conn() as c:
            c.execute(
                "INSERT INTO runs (id, tool, title, donor, target, params, status, created, source, artifact_dir) "
                "VALUES (?,?,?,?,?,?,?,?,?,?)",
                (run_id, tool, title, donor, target, json.dumps(params), "queued", time.time(), source, artifact_dir),
            )

    def start(self, run_id: str) -> None:
        with self._conn() as c:
            c.execute("UPDATE runs SET status='running', started=? WHERE id=?", (time.time(), run_id))

    def finish(self, run_id: str, status: str, result: Optional[dict[str, Any]] = None, error: str = "") -> None:
        assert status in STATUSES
        now = time.time()
        with self._conn() as c:
            row = c.execute("SELECT started FROM runs WHERE id=?", (run_id,)).fetchone()
            started = row["started"] if row and row["started"] else now
            c.execute(
                "UPDATE runs SET status=?, finished=?, duration_s=?, result=?, error=? WHERE id=?",
                (status, now, now - started, json.dumps(result) if result is not None else None, error, run_id),
            )

    def list(self, limit: int = 200, tool: Optional[str] = None) -> list[dict[str, Any]]:
        q = "SELECT id, tool, title, donor, target, params, status, created, started, finished, duration_s, error, artifact_dir, source FROM runs"
        args: tuple = ()
        if tool:
            q += " WHERE tool=?"
            args = (tool,)
        q += " ORDER BY created DESC LIMIT ?"
        with self._conn() as c:
            rows = c.execute(q, args + (limit,)).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["params"] = json.loads(d["params"])
            out.append(d)
        return out

    def get(self, run_id: str) -> Optional[dict[str, Any]]:
        with self._conn() as c:
            r = c.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()
        if r is None:
            return None
        d = dict(r)
        d["params"] = json.loads(d["params"])
        d["result"] = json.loads(d["result"]) if d["result"] else None
        return d

    def delete(self, run_id: str) -> None:
        with self._conn() as c:
            c.execute("DELETE FROM runs WHERE id=?", (run_id,))
