"""What the Transplant and Compare pages share: finding swap runs, and the one-click actions on
a transplant (roll back, re-apply, save as a Hugging Face model, rebuild after a restart).

A swap run started from the app keeps T' applied in :data:`engine.running.live.LIVE` (only the swapped
tensors are copies). Roll back / re-apply take milliseconds and run inline; saving and rebuilding
load or write a whole model, so they are background jobs. Every action is recorded in the run
history next to the swap it acts on.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Callable, Optional

import streamlit as st

from engine.api import LIVE, GraftError, graft_home, new_run_id, pair_labels, rebuild
from ui.jobs import job_view
from ui.state import job_runner, last_job_id, model_store, one_line, remember_job

SWAP = "swap"
CONJUGATE = "conjugate"
ORGAN = "organ-insert"
TRANSPLANTS = (SWAP, CONJUGATE, ORGAN)  # tools whose runs keep a live T' and appear on Compare
COMPARE_RUN = "compare_run"  # session key: the swap run the Compare page shows


# --------------------------------------------------------------------------- finding runs
def swap_runs(limit: int = 200) -> list[dict[str, Any]]:
    """Finished transplant runs (module swaps and conjugations), newest first (from the history,
    so they survive restarts)."""
    rows = [
        r
        for tool in TRANSPLANTS
        for r in job_runner().history.list(limit=limit, tool=tool)
        if r["status"] == "done"
    ]
    return sorted(rows, key=lambda r: r["created"], reverse=True)[:limit]


def latest_swap_id() -> Optional[str]:
    """This session's last finished transplant, else the newest in the history."""
    jobs = [job_runner().get(jid) for jid in (last_job_id(t) for t in TRANSPLANTS) if jid]
    done = [j for j in jobs if j is not None and j.status == "done"]
    if done:
        return max(done, key=lambda j: j.created).id
    runs = swap_runs(limit=1)
    return runs[0]["id"] if runs else None


def swap_envelope(run_id: str) -> Optional[dict[str, Any]]:
    job = job_runner().get(run_id)
    if job is not None and job.status == "done" and job.result is not None:
        return job.result
    row = job_runner().history.get(run_id)
    return row["result"] if row and row["status"] == "done" else None


def default_save_dir(envelope: dict[str, Any], run_id: str) -> str:
    r = envelope.get("result") or {}
    src, dst = pair_labels(envelope)
    how = {SWAP: f"k{r.get('k', '')}", ORGAN: f"organ-p{r.get('position', '')}"}.get(
        envelope.get("tool"), "conj"
    )
    stem = re.sub(
        r"[^A-Za-z0-9._+-]+",
        "-",
        f"{Path(dst or 'target').name}+{Path(src or 'donor').name}-{how}-{run_id[:6]}",
    )
    return str(graft_home() / "transplants" / stem)


# --------------------------------------------------------------------------- actions
def _record(
    kind: str,
    title: str,
    envelope: dict[str, Any],
    params: dict[str, Any],
    result: dict[str, Any],
    status: str = "done",
    error: str = "",
) -> None:
    """An instant action still gets a row in the run history, named as its transplant's run is
    (a conjugation's envelope has no donor but an adapter; an organ insertion's donor is None)."""
    donor, target = pair_labels(envelope)
    record = {"tool": kind, "title": title, "donor": donor, "target": target, "params": params}
    with job_runner().history.running(new_run_id(), create=record) as run:
        run.update(status=status, result=result, error=error)


def _rollback(run_id: str, live_id: str) -> None:
    env = swap_envelope(run_id) or {}
    try:
        t0 = time.perf_counter()
        out = LIVE.rollback(live_id)
        out["seconds"] = round(time.perf_counter() - t0, 4)
    except GraftError as exc:
        st.session_state[f"_tp_msg-{run_id}"] = ("error", one_line(exc))
        return
    _record("rollback", "Roll back transplant", env, {"swap_run": run_id, "live_id": live_id}, out)
    verdict = "bit-exact ✓" if out["bit_exact"] else "NOT bit-exact ✗"
    st.session_state[f"_tp_msg-{run_id}"] = (
        "success" if out["bit_exact"] else "error",
        f"Rolled back {out['restored_tensors']} tensors in {out['seconds'] * 1000:.1f} ms: the working "
        f"copy equals the target, {verdict}.",
    )


def _reapply(run_id: str, live_id: str) -> None:
    env = swap_envelope(run_id) or {}
    try:
        out = LIVE.reapply(live_id)
    except GraftError as exc:
        st.session_state[f"_tp_msg-{run_id}"] = ("error", one_line(exc))
        return
    _record("reapply", "Re-apply transplant", env, {"swap_run": run_id, "live_id": live_id}, out)
    ok = out["matches_run"]
    st.session_state[f"_tp_msg-{run_id}"] = (
        "success" if ok else "error",
        "T′ applied again; its weight hash equals the run's."
        if ok
        else "T′ applied again, but its weight hash differs from the run's.",
    )


def save_work(run_id: str, live_id: str, folder: str) -> Callable[[Any], dict[str, Any]]:
    """The background work of "Save as model". Its only cancel point is before the write: the
    write replaces the folder at once (engine.core.paths.replace_dir), so a cancel arriving during it
    must not report "cancelled" for a folder that was saved."""

    def work(progress) -> dict[str, Any]:
        progress(0.1, f"saving T′ to {folder}")
        path = LIVE.save(live_id, Path(folder).expanduser())
        return {"saved_to": str(path), "swap_run": run_id}

    return work


def _save(run_id: str, live_id: str, folder_key: str) -> None:
    env = swap_envelope(run_id) or {}
    folder = (st.session_state.get(folder_key) or "").strip()
    if not folder:
        st.session_state[f"_tp_msg-{run_id}"] = ("error", "give a folder to save T′ into")
        return

    work = save_work(run_id, live_id, folder)
    job = job_runner().submit(
        "save-transplant",
        "Save transplant as model",
        env.get("donor", ""),
        env.get("target", ""),
        {"swap_run": run_id, "folder": folder},
        work,
    )
    remember_job(f"save-{run_id}", job)


def _rebuild(run_id: str) -> None:
    env = swap_envelope(run_id)
    if env is None:
        st.session_state[f"_tp_msg-{run_id}"] = ("error", "that run is no longer in the history")
        return

    def work(progress) -> dict[str, Any]:
        progress(0.1, "loading the models and re-applying the run's modules")
        live_id = rebuild(env, model_store(), LIVE)
        return {"live_id": live_id, "swap_run": run_id}

    job = job_runner().submit(
        "rebuild-transplant",
        "Rebuild transplant",
        env.get("donor", ""),
        env.get("target", ""),
        {"swap_run": run_id},
        work,
    )
    remember_job(f"rebuild-{run_id}", job)


def _live_id_for(run_id: str, envelope: dict[str, Any]) -> Optional[str]:
    """The live id of this run's T': the one the run recorded, or one a rebuild made."""
    lid = (envelope.get("result") or {}).get("live_id")
    if LIVE.get(lid) is not None:
        return lid
    jid = last_job_id(f"rebuild-{run_id}")
    job = job_runner().get(jid) if jid else None
    if (
        job is not None
        and job.status == "done"
        and job.result
        and LIVE.get(job.result.get("live_id")) is not None
    ):
        return job.result["live_id"]
    return None


def transplant_actions(run_id: str, envelope: dict[str, Any], *, where: str) -> None:
    """State of T' in memory, and one button each: roll back / re-apply, save as model."""
    live_id = _live_id_for(run_id, envelope)
    live = LIVE.get(live_id)
    with st.container(border=True):
        st.markdown("**Transplant T′**")
        result = envelope.get("result") or {}
        if live is None and result.get("rolled_back"):
            st.caption(
                f"T′ was rolled back automatically: {result.get('roll_back_reason')}. The target is "
                "unchanged; raise the threshold (max retained increase) to keep such a transplant."
            )
        elif live is None and envelope.get("tool") == CONJUGATE:
            st.caption(
                "T′ is not held in memory (the app restarted, or newer transplants replaced it). "
                "Run the conjugation again to roll back, re-apply or save it (its maps are refitted "
                "on the same workload and give the same weights)."
            )
        elif live is None:
            st.caption(
                "T′ is not held in memory (the app restarted, or newer transplants replaced it). "
                "Rebuild it from this run to roll back, re-apply or save."
            )
            st.button(
                "Rebuild T′",
                key=f"rebuild-{where}-{run_id}",
                icon=":material/replay:",
                on_click=_rebuild,
                args=(run_id,),
            )
            jid = last_job_id(f"rebuild-{run_id}")
            if jid:
                job_view(jid, where=f"rebuild-{where}")
        else:
            state = "applied" if live.applied else "rolled back (the working copy equals T)"
            st.caption(
                f"In memory: {len(live.swap.modules)} modules changed, {state}. "
                f"Only the changed tensors are copies ({live.swap.swapped_bytes / 2**20:.1f} MiB); "
                "the cached target is never written."
            )
            left, mid = st.columns([1, 1])
            if live.applied:
                left.button(
                    "Roll back",
                    key=f"rollback-{where}-{run_id}",
                    icon=":material/undo:",
                    type="primary",
                    on_click=_rollback,
                    args=(run_id, live_id),
                    width="stretch",
                    help="Restore the target's own tensors and check the result is bit-exact.",
                )
            else:
                left.button(
                    "Re-apply",
                    key=f"reapply-{where}-{run_id}",
                    icon=":material/redo:",
                    on_click=_reapply,
                    args=(run_id, live_id),
                    width="stretch",
                )
            folder_key = f"save-folder-{where}-{run_id}"
            if folder_key not in st.session_state:
                st.session_state[folder_key] = default_save_dir(envelope, run_id)
            st.text_input(
                "Save folder",
                key=folder_key,
                help="A Hugging Face model folder: safetensors, config, tokenizer and surgery.json. "
                "An existing Graft transplant folder is replaced only once the new one is written.",
            )
            mid.button(
                "Save as model",
                key=f"save-{where}-{run_id}",
                icon=":material/save:",
                width="stretch",
                on_click=_save,
                args=(run_id, live_id, folder_key),
                help="Writes T′ (re-applied first if rolled back) in the background.",
            )
            jid = last_job_id(f"save-{run_id}")
            if jid:
                job_view(
                    jid,
                    where=f"save-{where}",
                    on_done=lambda res: st.success(
                        f"Saved to `{res['saved_to']}`: load it with "
                        "`AutoModelForCausalLM.from_pretrained`, "
                        "or type the path as a model in the sidebar.",
                        icon=":material/check_circle:",
                    ),
                )
        msg = st.session_state.pop(f"_tp_msg-{run_id}", None)
        if msg:
            (st.success if msg[0] == "success" else st.error)(msg[1])
