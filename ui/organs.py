"""Organs page helpers: choosing an organ checkpoint (one found under <GRAFT_HOME>/organs, or any
folder), the inputs of each organ tool, and the insertion's details (T' actions, Compare)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import streamlit as st

from engine.api import ORGAN_CARD, GraftError, jsonsafe, load_organ, organs_dir
from ui.jobs import PanelInputs, file_stem
from ui.state import last_job_id, one_line, selection
from ui.text import md

ORGAN_INSERT = "organ-insert"
PICK_KEY, PATH_KEY, KNOWN_KEY = "organ_pick", "organ_path", "organ_known"
TYPED = "a folder I type…"


def found_organs() -> list[str]:
    """Organ checkpoint folders under <GRAFT_HOME>/organs, newest first."""
    root = organs_dir()
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if (p / ORGAN_CARD).is_file()]
    return [str(p) for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]


@st.cache_data(ttl=10, max_entries=64, show_spinner=False)
def _describe(path: str, mtime_ns: int) -> str:
    organ = load_organ(path)
    layers = organ.card["layers"]
    trained = organ.card.get("training")
    return (
        f"{organ.card['source']['label']} blocks {layers[0]}–{layers[-1]} (k={organ.size}, width "
        f"{organ.hidden_size}, "
        f"{organ.nbytes / 2**20:.1f} MiB)"
        + (f" · trained standalone {trained.get('steps')} steps" if trained else "")
    )


def describe(path: str) -> str:
    return _describe(path, (Path(path) / ORGAN_CARD).stat().st_mtime_ns)


def organ_picker() -> tuple[Optional[str], Optional[str]]:
    """Draw the organ chooser; returns (organ folder, error)."""
    found = found_organs()
    options = found + [TYPED]
    new = [p for p in found if p not in st.session_state.get(KNOWN_KEY, [])]
    st.session_state[KNOWN_KEY] = found
    if st.session_state.get(PICK_KEY) not in options or new:  # a newly extracted / trained organ is picked
        st.session_state[PICK_KEY] = new[0] if new else options[0]
    pick = st.selectbox(
        "Organ checkpoint",
        options,
        key=PICK_KEY,
        format_func=lambda p: p if p == TYPED else f"{Path(p).name}",
        help="Organs extracted or trained here are listed (newest first); any organ folder "
        "(organ.json + organ.safetensors) can be typed instead.",
    )
    path = (
        st.text_input("Organ folder", key=PATH_KEY, placeholder="/path/to/organ").strip()
        if pick == TYPED
        else pick
    )
    if not path:
        return None, "extract an organ first (below), or type an organ checkpoint folder"
    try:
        st.caption(md(describe(path)))
    except (GraftError, OSError) as exc:
        return None, f"Organ: {one_line(exc)}"
    return path, None


def inputs_for(tool: str, organ: Optional[str], organ_error: Optional[str]) -> PanelInputs:
    """The inputs of one organ tool: the sidebar's donor (extract), the organ (train), or the organ
    and the sidebar's target (insert, T9, T10)."""
    sel = selection()
    errors = list(sel.errors) if not sel.ok else []
    if tool == "organ-extract":
        return PanelInputs({"donor": sel.donor} if sel.donor is not None else {}, sel.options, tuple(errors))
    if organ is None:
        errors.insert(0, organ_error or "choose an organ checkpoint")
    models: dict[str, Any] = {"organ": organ} if organ else {}
    if tool != "organ-train":
        models["target"] = sel.target
        if sel.target is None:
            errors.append("choose a target in the sidebar")
    return PanelInputs(models, sel.options, tuple(errors))


def insert_details(envelope: dict) -> None:
    """Placements, the transplant's one-click actions and a link to Compare."""
    from ui.transplant import COMPARE_RUN, transplant_actions

    r = envelope["result"]
    rows = [
        {
            "organ": Path(p["organ"]).name,
            "source layers": str(p["layers"]),
            "position": p["position"],
            "mode": p["mode"],
            "‖W_in − I‖": (p.get("bridge_deviation") or {}).get("in"),
            "‖W_out − I‖": (p.get("bridge_deviation") or {}).get("out"),
        }
        for p in r.get("placements") or []
    ]
    st.dataframe(rows, hide_index=True, width="stretch")
    st.caption(
        f"Organ bytes {r.get('organ_bytes', 0) / 2**20:.2f} MiB · held beyond the cached target "
        f"{r.get('extra_bytes', 0) / 2**20:.2f} MiB · rollback bit-exact "
        f"{'yes' if r.get('rollback_bit_exact') else 'NO'} · "
        f"cached target untouched {'yes' if r.get('target_untouched') else 'NO'}"
    )
    run_id = last_job_id(ORGAN_INSERT)
    if run_id and r.get("live_id"):
        st.session_state[COMPARE_RUN] = run_id
        st.page_link("pages/compare.py", label="Compare T, T′ and D", icon=":material/compare:")
        transplant_actions(run_id, envelope, where="organs")


def organ_compare(run_id: str, envelope: dict) -> None:
    """The Compare page's view of an organ insertion run."""
    import viz
    from ui.transplant import transplant_actions
    from viz.organs import insert_figure

    fig = insert_figure(envelope)
    st.plotly_chart(fig, config=viz.download_config(fig), key=f"compare-organ-{run_id}")
    insert_details_table = envelope["result"].get("placements") or []
    st.caption(
        f"{len(insert_details_table)} organ(s) · "
        f"{envelope['result'].get('strategy') or envelope['result'].get('mode')} · "
        f"position {envelope['result'].get('position')}"
    )
    transplant_actions(run_id, envelope, where="compare")
    st.download_button(
        "Result JSON",
        data=jsonsafe.dumps(envelope, indent=2),
        file_name=f"{file_stem(envelope)}.json",
        mime="application/json",
        key=f"compare-organ-json-{run_id}",
        icon=":material/download:",
        on_click="ignore",
    )
