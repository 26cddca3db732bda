"""Runs tell the truth: a run is marked interrupted only when its own process is gone, run ids do
not collide, and the staging folders of a save killed half-way are cleaned (or restored) later."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.core import paths, processes
from engine.core.paths import (
    clean_stale_staging,
    current_owner,
    describe_cleanup,
    discard_staging,
    owner_gone,
    replace_dir,
    staging_dir,
    staging_entries,
)
from engine.core.processes import process_start_time, this_host
from engine.running.history import History, new_run_id

ROOT = Path(__file__).resolve().parent.parent


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], cwd=ROOT)


def _kill(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)


def _run(h: History, owner: dict, tool: str = "swap") -> str:
    rid = h.create(new_run_id("t-"), tool, "a run", "d", "t", {"k": 1}, owner=owner)
    h.start(rid)
    return rid


# ---------------------------------------------------------------------------------- owners


def test_process_start_time_is_stable_and_matches_own_process():
    me = current_owner()
    assert me["pid"] == os.getpid() and me["host"] == this_host()
    assert me["started"] is not None and me["started"] <= time.time()
    assert abs(process_start_time(os.getpid()) - me["started"]) < 0.05
    assert process_start_time(0) is None and process_start_time(-1) is None
    assert not owner_gone(**{k: me[k] for k in ("pid", "host", "started")})


def test_run_of_live_child_survives_a_new_start_and_is_interrupted_once_the_child_dies():
    child = _sleeper()
    try:
        started = process_start_time(child.pid)
        assert started is not None
        h = History()
        rid = _run(h, {"pid": child.pid, "host": this_host(), "started": started})
        time.sleep(1.1)  # older than the grace the old (ownerless) rule gives
        h2 = History()
        row = h2.get(rid)
        assert row["status"] == "running" and not row["error"]
        assert row["owner_pid"] == child.pid and row["owner_host"] == this_host()
        assert h2.interrupted == []
        assert [r["id"] for r in h2.active_elsewhere()] == [rid]
    finally:
        _kill(child)
    h3 = History()
    row = h3.get(rid)
    assert row["status"] == "failed"
    assert row["error"] == f"interrupted (its process {child.pid} on {this_host()} is gone)"
    assert h3.interrupted == [{"id": rid, "error": row["error"]}]
    assert h3.active_elsewhere() == []


def test_zombie_owner_counts_as_gone():
    child = _sleeper()
    try:
        started = process_start_time(child.pid)
        h = History()
        rid = _run(h, {"pid": child.pid, "host": this_host(), "started": started})
        os.kill(child.pid, signal.SIGKILL)  # dead, but not reaped yet: a zombie still holds the pid
        for _ in range(200):
            if processes._proc_stat(child.pid) and processes._proc_stat(child.pid)[0] == "Z":
                break
            time.sleep(0.01)
        assert History().get(rid)["status"] == "failed"
    finally:
        _kill(child)


def test_reused_pid_with_another_start_time_is_interrupted():
    me = current_owner()
    h = History()
    rid = _run(h, {"pid": me["pid"], "host": me["host"], "started": me["started"] - 3600})
    ok = _run(h, me)
    h2 = History()
    assert h2.get(rid)["status"] == "failed"
    assert h2.get(rid)["error"] == f"interrupted (its process {me['pid']} on {me['host']} is gone)"
    assert h2.get(ok)["status"] == "running"  # this very process: alive, same start time


def test_run_of_another_host_is_left_alone():
    h = History()
    rid = _run(h, {"pid": 999_999_999, "host": this_host() + "-elsewhere", "started": 1.0})
    time.sleep(1.1)
    h2 = History()
    assert h2.get(rid)["status"] == "running"
    assert [r["id"] for r in h2.active_elsewhere()] == [rid]


def test_create_records_this_process_and_a_missing_id_is_generated():
    h = History()
    rid = h.create("", "swap", "a run", "d", "t", {})
    row = h.get(rid)
    assert len(rid) == 20 and row["status"] == "queued"
    me = current_owner()
    assert (row["owner_pid"], row["owner_host"], row["owner_started"]) == (
        me["pid"],
        me["host"],
        me["started"],
    )
    listed = h.list()[0]
    assert listed["owner_pid"] == me["pid"]


# The table as released before owners were recorded (git show HEAD:engine/running/history.py).
_OLD_SCHEMA = """
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


def test_migration_from_the_old_schema_keeps_rows_and_adds_owner_columns(tmp_path):
    db = tmp_path / "old.sqlite"
    conn = sqlite3.connect(str(db))
    conn.executescript(_OLD_SCHEMA)
    now = time.time()
    ins = (
        "INSERT INTO runs (id, tool, title, donor, target, params, status, created, finished, result) "
        "VALUES (?,?,?,?,?,?,?,?,?,?)"
    )
    conn.execute(
        ins,
        (
            "done1",
            "swap",
            "old done",
            "d",
            "t",
            json.dumps({"a": 1}),
            "done",
            now - 100,
            now - 90,
            json.dumps({"ok": True}),
        ),
    )
    conn.execute(ins, ("stale", "swap", "old running", "d", "t", "{}", "running", now - 100, None, None))
    conn.execute(ins, ("fresh", "swap", "just queued", "d", "t", "{}", "queued", now + 5, None, None))
    conn.commit()
    conn.close()

    h = History(db)
    cols = {r[1]: r[2] for r in sqlite3.connect(str(db)).execute("PRAGMA table_info(runs)")}
    assert cols["owner_pid"] == "INTEGER" and cols["owner_host"] == "TEXT" and cols["owner_started"] == "REAL"
    done = h.get("done1")
    assert done["status"] == "done" and done["result"] == {"ok": True} and done["params"] == {"a": 1}
    assert done["owner_pid"] is None
    # Rows without an owner keep the old rule.
    assert h.get("stale")["status"] == "failed"
    assert h.get("stale")["error"] == "interrupted (the server stopped)"
    assert h.get("fresh")["status"] == "queued"
    assert {r["id"] for r in h.list()} == {"done1", "stale", "fresh"}
    # A second start (migration already done) and new rows both work.
    h2 = History(db)
    rid = h2.create(None, "swap", "new", "d", "t", {})
    assert h2.get(rid)["owner_pid"] == os.getpid()


def test_run_ids_do_not_collide():
    ids = [new_run_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert new_run_id("cli-").startswith("cli-")

    per_thread: list[list[str]] = [[], []]

    def make(i: int) -> None:
        per_thread[i].extend(new_run_id("cli-") for _ in range(5_000))

    threads = [threading.Thread(target=make, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    both = per_thread[0] + per_thread[1]
    assert len(both) == 10_000 and len(set(both)) == 10_000


def test_two_runs_created_at_once_both_get_rows():
    h = History()
    rids = [h.create(None, "swap", "same moment", "d", "t", {}) for _ in range(50)]
    assert len(set(rids)) == 50 and len(h.list(limit=100)) == 50


# ---------------------------------------------------------------------------------- staging

_STAGE_AND_WAIT = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from engine.core.paths import staging_dir
tmp = staging_dir(Path({out!r}))
(tmp / "weights.bin").write_bytes(b"x" * {n})
(tmp / "sub").mkdir()
(tmp / "sub" / "card.json").write_text("{{}}")
print(tmp, flush=True)
time.sleep(120)
"""


def _stage_in_child(out: Path, n: int) -> tuple[subprocess.Popen, Path]:
    code = _STAGE_AND_WAIT.format(root=str(ROOT), out=str(out), n=n)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    line = p.stdout.readline().strip()
    assert line, "the child did not create its staging folder"
    return p, Path(line)


def test_staging_of_a_killed_process_is_removed_and_reported(tmp_path):
    out = tmp_path / "model"
    n = 1_234_567
    child, tmp = _stage_in_child(out, n)
    try:
        assert tmp.parent == tmp_path and tmp.name.startswith(f".model.tmp-{child.pid}-") and tmp.is_dir()
        assert clean_stale_staging() == []  # its owner is alive: kept
        assert tmp.is_dir()
        mine = staging_dir(out)  # and one of this (live) process
    finally:
        _kill(child)
    assert tmp.is_dir()  # SIGKILL leaves the folder behind
    items = clean_stale_staging()
    assert items == [
        {"path": str(tmp), "out_dir": str(out), "kind": "tmp", "bytes": n + 2, "action": "removed"}
    ]
    assert not tmp.exists() and mine.is_dir() and not out.exists()
    assert describe_cleanup(items) == f"removed 1 leftover partial save: {tmp} (1.2 MB)"
    assert [e["path"] for e in staging_entries()] == [str(mine)]
    assert clean_stale_staging() == []  # nothing twice
    discard_staging(mine)
    assert not mine.exists() and staging_entries() == []


def test_staging_lifecycle_in_one_process(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "old.txt").write_text("old")
    tmp = staging_dir(out)
    (tmp / "new.txt").write_text("new")
    assert [e["kind"] for e in staging_entries()] == ["tmp"]
    replace_dir(tmp, out)
    assert (out / "new.txt").read_text() == "new" and not (out / "old.txt").exists()
    assert staging_entries() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no .tmp or .old left over


def test_unregistered_and_unrelated_folders_are_never_touched(tmp_path):
    legacy = tmp_path / ".model.tmp-1a2b3c4d"  # made by an older version: no owner to check
    legacy.mkdir()
    other = tmp_path / "data"
    other.mkdir()
    assert clean_stale_staging() == []
    assert legacy.is_dir() and other.is_dir()


def test_a_registered_entry_cannot_point_clean_up_at_another_folder(tmp_path):
    victim = tmp_path / "precious"
    victim.mkdir()
    (victim / "f").write_text("keep")
    with paths._registry() as c:
        c.execute(
            "INSERT INTO staging VALUES (?,?,?,?,?,?,?)",
            (str(victim), "tmp", str(tmp_path / "model"), 999_999_999, this_host(), 1.0, time.time()),
        )
    assert clean_stale_staging() == []
    assert (victim / "f").read_text() == "keep" and staging_entries() == []


_KILLED_BETWEEN_RENAMES = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from engine.core import paths
from engine.core import processes
tmp = paths.staging_dir(Path({out!r}))
(tmp / "new.txt").write_text("new")
real = os.replace
calls = []
def replace(a, b):
    calls.append(a)
    if len(calls) == 2:  # out_dir is set aside; die before the new folder is moved in
        os.kill(os.getpid(), signal.SIGKILL)
    return real(a, b)
paths.os.replace = replace
paths.replace_dir(tmp, Path({out!r}))
"""


def test_replace_dir_killed_between_its_renames_restores_the_old_folder(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "weights.bin").write_bytes(b"w" * 1000)
    p = subprocess.run(
        [sys.executable, "-c", _KILLED_BETWEEN_RENAMES.format(root=str(ROOT), out=str(out))],
        timeout=120,
        cwd=ROOT,
    )
    assert p.returncode == -signal.SIGKILL
    assert not out.exists()  # the kill hit between the renames
    olds = [d for d in tmp_path.iterdir() if d.name.startswith(".model.old-")]
    tmps = [d for d in tmp_path.iterdir() if d.name.startswith(".model.tmp-")]
    assert len(olds) == 1 and len(tmps) == 1

    items = clean_stale_staging()
    assert (out / "weights.bin").read_bytes() == b"w" * 1000  # nothing that was on disk is lost
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    by_kind = {i["kind"]: i for i in items}
    assert by_kind["old"]["action"] == "restored" and by_kind["old"]["bytes"] == 1000
    assert by_kind["tmp"]["action"] == "removed" and by_kind["tmp"]["bytes"] == 3
    line = describe_cleanup(items)
    assert f"removed 1 leftover partial save: {tmps[0]} (3 B)" in line
    assert f"restored {out} from {olds[0]}" in line
    assert staging_entries() == []


def test_old_folder_left_after_the_new_one_is_in_place_is_removed(tmp_path):
    """Killed after both renames but before the old folder was deleted: the new save is complete."""
    out = tmp_path / "model"
    out.mkdir()
    (out / "new.txt").write_text("new")
    old = tmp_path / ".model.old-999999999-abcd1234"
    old.mkdir()
    (old / "old.txt").write_text("old")
    with paths._registry() as c:
        c.execute(
            "INSERT INTO staging VALUES (?,?,?,?,?,?,?)",
            (str(old), "old", str(out), 999_999_999, this_host(), 1.0, time.time()),
        )
    items = clean_stale_staging()
    assert [(i["kind"], i["action"], i["bytes"]) for i in items] == [("old", "removed", 3)]
    assert not old.exists() and (out / "new.txt").read_text() == "new"


def test_describe_cleanup_formats():
    assert describe_cleanup([]) == ""
    one = [
        {
            "path": "/x/.model.tmp-123-ab12",
            "out_dir": "/x/model",
            "kind": "tmp",
            "bytes": 514_200_000,
            "action": "removed",
        }
    ]
    assert describe_cleanup(one) == "removed 1 leftover partial save: /x/.model.tmp-123-ab12 (514.2 MB)"
    two = one + [
        {
            "path": "/x/.b.tmp-9-cd",
            "out_dir": "/x/b",
            "kind": "tmp",
            "bytes": 2_000_000_000,
            "action": "removed",
        }
    ]
    assert describe_cleanup(two) == (
        "removed 2 leftover partial saves (2.5 GB in all): "
        "/x/.model.tmp-123-ab12 (514.2 MB), /x/.b.tmp-9-cd (2.0 GB)"
    )


@pytest.mark.parametrize("fail_at", ["write", "replace"])
def test_failed_save_leaves_nothing_registered_and_keeps_what_was_there(tmp_path, monkeypatch, fail_at):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    real, calls = os.replace, []

    def replace(a, b):
        calls.append(a)
        if len(calls) == 2:  # moving the new folder in fails
            raise OSError("cross-device link")
        return real(a, b)

    tmp = staging_dir(out)
    with pytest.raises(OSError):
        try:
            (tmp / "a").write_text("a")
            if fail_at == "write":
                raise OSError("disk full")
            with monkeypatch.context() as m:  # (not monkeypatch.undo(): that would drop GRAFT_HOME too)
                m.setattr(paths.os, "replace", replace)
                replace_dir(tmp, out)
        finally:
            discard_staging(tmp)
    assert not tmp.exists() and staging_entries() == []
    assert (out / "keep.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
