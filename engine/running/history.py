"""Run history in SQLite (WAL): every job's tool, parameters, models, status, timings, result
JSON. Survives restarts; one connection per call keeps it thread-safe.

Each run records its owner (pid, host and the process's start time): several app and CLI processes
share one history, and a run left 'running' is marked interrupted only once its own process is gone."""

from __future__ import annotations

import json
import sqlite3
import time
import traceback
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from ..core.errors import Cancelled, GraftError
from ..core.jsonio import loads_checked
from ..core.paths import current_owner, history_db, owner_gone

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
    source TEXT NOT NULL DEFAULT 'ui',
    owner_pid INTEGER,
    owner_host TEXT,
    owner_started REAL
);
CREATE INDEX IF NOT EXISTS runs_created ON runs(created);
"""

STATUSES = ("queued", "running", "done", "failed", "cancelled")

# Columns added after the first release; an older database gets them with ALTER TABLE.
_ADDED_COLUMNS = (("owner_pid", "INTEGER"), ("owner_host", "TEXT"), ("owner_started", "REAL"))

# Rows from before owners were recorded (owner_pid NULL) keep the old rule: stale once they are
# older than this many seconds at a start.
_UNOWNED_GRACE_S = 1.0


def new_run_id(prefix: str = "") -> str:
    """A run id that does not collide, however many are made at once in however many threads or
    processes: ``prefix`` + 20 hex digits of a uuid4 (80 random bits)."""
    return f"{prefix}{uuid.uuid4().hex[:20]}"


def _migrate(c: sqlite3.Connection) -> None:
    have = {r["name"] for r in c.execute("PRAGMA table_info(runs)")}
    for name, kind in _ADDED_COLUMNS:
        if name not in have:
            try:
                c.execute(f"ALTER TABLE runs ADD COLUMN {name} {kind}")
            except sqlite3.OperationalError as e:  # another process added it just now
                if "duplicate column" not in str(e).lower():
                    raise


class History:
    def __init__(self, path: Optional[Path] = None) -> None:
        self.path = Path(path) if path else history_db()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._conn() as c:
            c.execute("PRAGMA journal_mode=WAL")
            c.executescript(_SCHEMA)
            _migrate(c)
        # A run left 'running' or 'queued' by a process that died cannot finish any more.
        self.interrupted: list[dict[str, Any]] = self.reap_orphans()

    def reap_orphans(self) -> list[dict[str, Any]]:
        """Mark as failed every 'running' or 'queued' run whose owner process is gone: it ran on
        this host and its pid is dead or now belongs to another process. Runs of live processes
        and of other hosts are left alone. Rows without an owner (older versions) are marked
        when created over a second ago. Returns ``[{"id", "error"}]`` for the rows it marked."""
        now = time.time()
        with self._conn() as c:
            rows = c.execute(
                "SELECT id, created, owner_pid, owner_host, owner_started FROM runs "
                "WHERE status IN ('running','queued') AND finished IS NULL"
            ).fetchall()
        marked = []
        for r in rows:
            if r["owner_pid"] is None:
                if r["created"] >= now - _UNOWNED_GRACE_S:
                    continue
                error = "interrupted (the server stopped)"
            elif owner_gone(r["owner_pid"], r["owner_host"], r["owner_started"]):
                error = f"interrupted (its process {r['owner_pid']} on {r['owner_host']} is gone)"
            else:
                continue
            with self._conn() as c:
                n = c.execute(
                    "UPDATE runs SET status='failed', error=? WHERE id=? "
                    "AND status IN ('running','queued') AND finished IS NULL",
                    (error, r["id"]),
                ).rowcount
            if n:
                marked.append({"id": r["id"], "error": error})
        return marked

    def active_elsewhere(self) -> list[dict[str, Any]]:
        """The 'running' or 'queued' runs owned by another process that is not known to be gone
        (alive on this host, or on another host): ``[{"id", "tool", "title", "status", "created",
        "started", "owner_pid", "owner_host", "owner_started"}]``, newest first."""
        me = current_owner()
        with self._conn() as c:
            rows = c.execute(
                "SELECT id, tool, title, status, created, started, owner_pid, owner_host, owner_started "
                "FROM runs WHERE status IN ('running','queued') AND finished IS NULL "
                "AND owner_pid IS NOT NULL ORDER BY created DESC"
            ).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            if d["owner_pid"] == me["pid"] and d["owner_host"] == me["host"]:
                continue
            if owner_gone(d["owner_pid"], d["owner_host"], d["owner_started"]):
                continue
            out.append(d)
        return out

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(str(self.path), timeout=30)
        try:
            conn.row_factory = sqlite3.Row
            yield conn
            conn.commit()
        finally:
            conn.close()

    def create(
        self,
        run_id: Optional[str],
        tool: str,
        title: str,
        donor: str,
        target: str,
        params: dict[str, Any],
        source: str = "ui",
        *,
        owner: Optional[dict[str, Any]] = None,
    ) -> str:
        """Add a 'queued' run owned by this process (or by ``owner``: ``{"pid", "host", "started"}``).
        An empty ``run_id`` gets a ``new_run_id()``; returns the id."""
        run_id = run_id or new_run_id()
        o = owner if owner is not None else current_owner()
        with self._conn() as c:
            c.execute(
                "INSERT INTO runs (id, tool, title, donor, target, params, status, created, source, "
                "owner_pid, owner_host, owner_started) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    run_id,
                    tool,
                    title,
                    donor,
                    target,
                    json.dumps(params),
                    "queued",
                    time.time(),
                    source,
                    o.get("pid"),
                    o.get("host"),
                    o.get("started"),
                ),
            )
        return run_id

    def start(self, run_id: str) -> None:
        with self._conn() as c:
            c.execute("UPDATE runs SET status='running', started=? WHERE id=?", (time.time(), run_id))

    @contextmanager
    def running(self, run_id: str, *, create: Optional[dict[str, Any]] = None) -> Iterator[dict[str, Any]]:
        """The one way a run is recorded (job runner, CLI, the app's instant actions): create its row
        when ``create`` gives ``tool, title, donor, target, params[, source]``, mark it running,
        yield a dict in which the caller puts ``"result"``, and finish it by how the block ended:
        done, cancelled (Cancelled / Ctrl-C) or failed (a GraftError's one line; anything else as
        an internal error with its traceback). The exception is re-raised. A history that cannot
        be written (a full disk) never hides the run's own outcome: ``box["history_error"]`` says so.
        """
        if create is not None:
            self.create(run_id, **create)
        self.start(run_id)
        box: dict[str, Any] = {}

        def end(status: str, **kw: Any) -> None:
            try:
                self.finish(run_id, status, **kw)
            except Exception as exc:
                box["history_error"] = (
                    f"{status}, but the run history could not be written: {type(exc).__name__}: {exc}"
                )

        try:
            yield box
        except (Cancelled, KeyboardInterrupt):
            end("cancelled", error="cancelled by user")
            raise
        except GraftError as exc:
            end("failed", error=str(exc))
            raise
        except BaseException as exc:
            end("failed", error=f"internal error: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            raise
        else:
            end(box.get("status", "done"), result=box.get("result"), error=box.get("error", ""))

    def finish(
        self, run_id: str, status: str, result: Optional[dict[str, Any]] = None, error: str = ""
    ) -> None:
        assert status in STATUSES
        now = time.time()
        with self._conn() as c:
            row = c.execute("SELECT started FROM runs WHERE id=?", (run_id,)).fetchone()
            started = row["started"] if row and row["started"] else now
            c.execute(
                "UPDATE runs SET status=?, finished=?, duration_s=?, result=?, error=? WHERE id=?",
                (
                    status,
                    now,
                    now - started,
                    json.dumps(result) if result is not None else None,
                    error,
                    run_id,
                ),
            )

    def list(self, limit: int = 200, tool: Optional[str] = None) -> list[dict[str, Any]]:
        q = (
            "SELECT id, tool, title, donor, target, params, status, created, started, finished, "
            "duration_s, error, "
            "source, owner_pid, owner_host, owner_started FROM runs"
        )
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
            try:
                d["params"] = _stored_json(d["params"], d["id"], "parameters")
            except GraftError as e:  # one damaged row is listed as damaged; the others still show
                d["params"], d["status"], d["error"] = {}, "damaged", str(e)
            out.append(d)
        return out

    def get(self, run_id: str) -> Optional[dict[str, Any]]:
        with self._conn() as c:
            r = c.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()
        if r is None:
            return None
        d = dict(r)
        d["params"] = _stored_json(d["params"], run_id, "parameters")
        d["result"] = _stored_json(d["result"], run_id, "result") if d["result"] else None
        return d

    def delete(self, run_id: str) -> None:
        with self._conn() as c:
            c.execute("DELETE FROM runs WHERE id=?", (run_id,))


def _stored_json(text: Any, run_id: str, what: str) -> Any:
    """A JSON column of one run; a row damaged on disk (not JSON, or nested past the cap) is a
    GraftError naming the run, so every other run still reads."""
    try:
        return loads_checked(text if isinstance(text, str) else "", f"run {run_id}'s stored {what}")
    except GraftError:
        raise GraftError(
            f"run {run_id} is damaged in the run history: its stored {what} is not valid JSON "
            "(the Runs page can delete it)"
        ) from None
