"""Background job runner: long work never blocks the page.

Jobs run one at a time on a worker thread (the machine's cores are shared, and one forward pass
at a time per cached model is also enforced by each model's lock). Each job reports progress,
can be cancelled (its compute stops at the next progress checkpoint), and is recorded in the
run history from the moment it is queued.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..core.errors import Cancelled, GraftError
from ..core.params import RunOptions
from ..core.progress import Progress
from ..loading.models import ModelSpec, ModelStore
from .history import History, new_run_id
from .registry import get_tool
from .runner import input_labels, run_tool


@dataclass
class Job:
    id: str
    kind: str  # tool name, or another job kind such as "make-donor"
    title: str
    donor: str
    target: str
    params: dict[str, Any]
    status: str = "queued"
    progress: float = 0.0
    message: str = "queued"
    result: Optional[dict[str, Any]] = None
    error: str = ""
    created: float = field(default_factory=time.time)
    started: Optional[float] = None
    finished: Optional[float] = None
    cancel_event: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def done(self) -> bool:
        return self.status in ("done", "failed", "cancelled")

    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or time.time()) - self.started


class JobRunner:
    def __init__(self, store: ModelStore, history: Optional[History] = None, live: Any = None) -> None:
        self.store = store
        self.history = history or History()
        self.live = (
            live  # engine.running.live.LiveTransplants: swap runs keep T' applied for one-click rollback/save
        )
        self._jobs: dict[str, Job] = {}
        self._queue: "queue.Queue[tuple[Job, Callable[[Progress], dict[str, Any]]]]" = queue.Queue()
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._loop, name="graft-jobs", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ submit
    def submit_tool(
        self,
        tool_name: str,
        donor: Optional[ModelSpec],
        target: Optional[ModelSpec],
        options: RunOptions,
        params: Any,
        *,
        base: Optional[ModelSpec] = None,
        adapter: Optional[str] = None,
        organ: Optional[str] = None,
        run: Optional[str] = None,
    ) -> Job:
        """Queue a registered tool on the given inputs (checked against the tool's needs first)."""
        tool = get_tool(tool_name)
        inputs = {
            "donor": donor,
            "target": target,
            "base": base,
            "adapter": adapter,
            "organ": organ,
            "run": run,
        }
        tool.choose(inputs)
        refs = {
            k: (v.ref if isinstance(v, ModelSpec) else v) for k, v in inputs.items() if v not in (None, "")
        }
        record = {
            "options": dataclasses.asdict(options),
            "params": dataclasses.asdict(params),
            "inputs": refs,
        }

        def work(progress: Progress) -> dict[str, Any]:
            return run_tool(
                tool_name,
                donor,
                target,
                options,
                params,
                base=base,
                adapter=adapter,
                organ=organ,
                run=run,
                store=self.store,
                progress=progress,
                live=self.live,
            )

        return self.submit(
            tool.name, f"{tool.code} {tool.title}", *input_labels(refs, self.history), record, work
        )

    def submit(
        self,
        kind: str,
        title: str,
        donor: str,
        target: str,
        params: dict[str, Any],
        work: Callable[[Progress], dict[str, Any]],
    ) -> Job:
        job = Job(new_run_id(), kind, title, donor, target, params)
        with self._lock:
            self._jobs[job.id] = job
        self.history.create(job.id, kind, title, donor, target, params)
        self._queue.put((job, work))
        return job

    # ------------------------------------------------------------------ control
    def get(self, job_id: str) -> Optional[Job]:
        with self._lock:
            return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.created, reverse=True)

    def cancel(self, job_id: str) -> None:
        """A running job stops at its next progress checkpoint; a queued one is cancelled now (it
        used to wait, shown as "Cancelling…", until the jobs ahead of it had finished)."""
        job = self.get(job_id)
        if job is None or job.done:
            return
        job.cancel_event.set()
        with self._lock:  # the worker takes a queued job under the same lock (_start)
            if job.status != "queued":
                job.message = "cancelling..."
                return
            self.history.finish(job.id, "cancelled", error="cancelled before start")  # history first
            job.status, job.message, job.finished = "cancelled", "cancelled before start", time.time()

    def wait(self, job_id: str, timeout: float = 600.0) -> Job:
        """Block until the job ends (tests and the CLI only; pages poll instead)."""
        t0 = time.time()
        job = self.get(job_id)
        assert job is not None
        while not job.done and time.time() - t0 < timeout:
            time.sleep(0.02)
        return job

    # ------------------------------------------------------------------ worker
    def _loop(self) -> None:
        while True:
            job, work = self._queue.get()
            self._run(job, work)

    def _start(self, job: Job) -> bool:
        """Move a queued job to running; False when it was cancelled before it started."""
        with self._lock:
            if job.done:
                return False
            if job.cancel_event.is_set():
                self.history.finish(job.id, "cancelled", error="cancelled before start")
                job.status, job.message, job.finished = "cancelled", "cancelled before start", time.time()
                return False
            job.status, job.started = "running", time.time()
            return True

    def _run(self, job: Job, work: Callable[[Progress], dict[str, Any]]) -> None:
        if not self._start(job):
            return

        def report(fraction: float, message: str) -> None:
            job.progress, job.message = fraction, message

        # The run history is written (History.running) before the in-memory job says it ended, so
        # a page that sees a finished job always finds the same outcome in the history.
        box: dict[str, Any] = {}
        try:
            with self.history.running(job.id) as box:
                box["result"] = work(Progress(report, job.cancel_event))
        except Cancelled:
            job.status, job.message = "cancelled", "cancelled"
        except GraftError as exc:
            job.status, job.error, job.message = "failed", str(exc), str(exc)
        except Exception as exc:  # a bug must not kill the worker; the UI shows one line
            error = f"internal error: {type(exc).__name__}: {exc}"
            job.status, job.error, job.message = "failed", error, error
        else:
            job.result, job.progress, job.message = box["result"], 1.0, "done"
            job.status = "done"
        finally:
            if box.get("history_error"):
                job.message = box["history_error"]
            job.finished = time.time()
