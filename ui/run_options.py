"""The sidebar's run options: the workload (the bundled concept set, an upload or a path), its
summary, and the options every tool run takes (device, dtype, budget, batch size)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Optional

import streamlit as st

from engine.api import (
    GraftError,
    RunOptions,
    build_params,
    builtin_concept_path,
    check_ray_option,
    graft_home,
    load_workload,
    param_specs,
    resolve_device,
)
from ui.state import one_line
from ui.text import md
from ui.widgets import param_widget

UPLOAD_SUFFIXES = ("jsonl", "ndjson", "json", "txt")
WORKLOAD_SOURCES = ("Bundled concept set", "Upload a file", "Path on this machine")


def run_options_section() -> tuple[Optional[RunOptions], tuple[str, ...]]:
    errors: list[str] = []
    with st.expander("Run options", icon=":material/tune:"):
        workload, workload_error = _workload_picker()
        values: dict[str, Any] = {"workload": workload}
        for spec in param_specs(RunOptions):
            if spec.name != "workload":
                values[spec.name] = param_widget(spec, f"opt-{spec.name}")
    if workload_error:
        errors.append(f"Workload: {workload_error}")
    try:
        options = build_params(RunOptions, values)
        resolve_device(options.device)
        check_ray_option(options.ray)
    except GraftError as exc:
        errors.append(f"Run options: {one_line(exc)}")
        options = None
    for message in errors:
        st.error(md(message), icon=":material/error:")
    return options, tuple(errors)


def _workload_picker() -> tuple[str, str]:
    """Returns (workload path or "" for the bundled set, one-line error or "")."""
    help_text = next(s.help for s in param_specs(RunOptions) if s.name == "workload")
    source = st.radio("Workload", WORKLOAD_SOURCES, key="workload_source", help=help_text)
    path = ""
    if source == WORKLOAD_SOURCES[1]:
        upload = st.file_uploader(
            "Workload file", type=list(UPLOAD_SUFFIXES), key="workload_upload", label_visibility="collapsed"
        )
        if upload is None:
            return "", "upload a file, or pick the bundled concept set"
        path = str(_saved_upload(upload))
    elif source == WORKLOAD_SOURCES[2]:
        path = st.text_input(
            "Workload path",
            key="workload_path",
            placeholder="/path/to/texts.jsonl",
            label_visibility="collapsed",
        ).strip()
        if not path:
            return "", "type a path, or pick the bundled concept set"
    try:
        name, n_texts = _workload_summary(path or str(builtin_concept_path()))
    except GraftError as exc:
        return path, one_line(exc)
    st.caption(f"{md(name)} · {n_texts} texts")
    return path, ""


def _workload_summary(path: str) -> tuple[str, int]:
    p = Path(path).expanduser()
    try:
        st_ = p.stat()
    except OSError:
        raise GraftError(f"workload file not found: {path}") from None
    return _workload_summary_cached(str(p), st_.st_mtime_ns, st_.st_size)


@st.cache_data(max_entries=32, show_spinner=False)
def _workload_summary_cached(path: str, mtime_ns: int, size: int) -> tuple[str, int]:
    wl = load_workload(path)
    return wl.name, len(wl.texts)


def _saved_upload(upload: Any) -> Path:
    """Save an uploaded file under GRAFT_HOME/uploads once per upload; never overwrite a file."""
    saved = st.session_state.setdefault("_uploads", {})
    if upload.file_id in saved and Path(saved[upload.file_id]).exists():
        return Path(saved[upload.file_id])
    path = save_upload(upload.name, upload.getvalue())
    saved[upload.file_id] = str(path)
    return path


def save_upload(name: str, data: bytes, folder: Optional[Path] = None) -> Path:
    """Write ``data`` under ``folder`` (default GRAFT_HOME/uploads) with a safe, unused name.

    An identical file already there is reused; a different one keeps its name and the new file
    gets ``-1``, ``-2``... appended to its stem.
    """
    folder = folder or graft_home() / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name).strip("._") or "workload.txt"
    stem, suffix = Path(clean).stem, Path(clean).suffix
    digest = hashlib.sha256(data).digest()
    for i in range(10_000):
        candidate = folder / (clean if i == 0 else f"{stem}-{i}{suffix}")
        try:
            with open(candidate, "xb") as f:  # "x": fails instead of overwriting
                f.write(data)
            return candidate
        except FileExistsError:
            if hashlib.sha256(candidate.read_bytes()).digest() == digest:
                return candidate
    raise GraftError(f"too many uploads named {clean}")
