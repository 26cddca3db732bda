"""Shared objects and the user's current choices.

The model store and the job runner are process-wide singletons (``st.cache_resource``): every
session and page shares one set of loaded models, which are never mutated, and one worker
thread. They are keyed by ``GRAFT_HOME`` so tests with separate homes get separate histories.

What the user picked lives in ``st.session_state``; the sidebar writes a :class:`Selection`
there on every run and pages read it with :func:`selection`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import streamlit as st

from engine.api import (
    LIVE,
    GraftError,
    History,
    Job,
    JobRunner,
    ModelSpec,
    ModelStore,
    Preloader,
    RunOptions,
    graft_home,
    history_db,
)

# Session-state keys shared by the sidebar, the pages and the tests.
DONOR = "donor"  # spec text of the donor (built-in name, folder, .gguf file or hub id)
TARGET = "target"
TRUST = "trust_remote_code"
SELECTION = "_selection"
LAST_JOBS = "_last_jobs"  # tool or job kind -> id of the last job this session started
DEMO_JOB = "demo-donor"


@st.cache_resource(show_spinner=False)
def _store(home: str) -> ModelStore:
    store = ModelStore()
    store.on_evict.append(LIVE.drop_model)  # a transplant must not keep an evicted target alive
    return store


@st.cache_resource(show_spinner=False)
def _preloader(home: str) -> Preloader:
    return Preloader(_store(home))


@st.cache_resource(show_spinner=False)
def _runner(home: str) -> JobRunner:
    return JobRunner(_store(home), History(history_db()), live=LIVE)


@st.cache_resource(show_spinner=False)
def _startup_notes(home: str) -> tuple[str, ...]:
    """Once per server process: partial saves left by killed processes are removed, and runs whose
    process is gone are marked interrupted (History does it on open). Returns what was done."""
    from engine.api import clean_stale_staging, describe_cleanup

    notes = []
    try:
        removed = describe_cleanup(clean_stale_staging())
    except Exception as exc:  # housekeeping must never stop the app
        removed = f"could not check for leftover partial saves: {type(exc).__name__}: {exc}"
    if removed:
        notes.append(removed)
    interrupted = job_runner().history.interrupted
    if interrupted:
        notes.append(
            f"{len(interrupted)} run(s) left running by a process that is gone were marked interrupted "
            f"(see Runs)"
        )
    return tuple(notes)


def startup_notes() -> tuple[str, ...]:
    return _startup_notes(str(graft_home()))


def model_store() -> ModelStore:
    """The process-wide cache of loaded models."""
    return _store(str(graft_home()))


def preloader() -> Preloader:
    """Loads the chosen pair into the model store in the background (see engine/loading/preload.py)."""
    return _preloader(str(graft_home()))


def job_runner() -> JobRunner:
    """The process-wide background job runner (one worker thread, with the run history)."""
    return _runner(str(graft_home()))


@dataclass(frozen=True)
class Selection:
    """The donor, target and run options chosen in the sidebar, parsed and validated."""

    donor_text: str
    target_text: str
    trust_remote_code: bool
    donor: Optional[ModelSpec]
    target: Optional[ModelSpec]
    options: Optional[RunOptions]
    errors: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return (
            not self.errors
            and self.donor is not None
            and self.target is not None
            and self.options is not None
        )


def selection() -> Selection:
    """What the sidebar resolved on this run (an error-carrying empty selection before it ran)."""
    sel = st.session_state.get(SELECTION)
    if sel is None:
        return Selection("", "", False, None, None, None, ("no models chosen yet",))
    return sel


def remember_job(key: str, job: Job) -> None:
    st.session_state.setdefault(LAST_JOBS, {})[key] = job.id


def last_job_id(key: str) -> Optional[str]:
    return st.session_state.get(LAST_JOBS, {}).get(key)


def forget_job(key: str) -> None:
    st.session_state.get(LAST_JOBS, {}).pop(key, None)


def one_line(message: Any) -> str:
    """First non-empty line of an error message (the UI never shows tracebacks)."""
    for line in str(message).splitlines():
        if line.strip():
            return line.strip()
    return str(message) or "unknown error"


def graft_error(exc: Exception) -> str:
    return one_line(exc) if isinstance(exc, GraftError) else f"{type(exc).__name__}: {one_line(exc)}"
