"""Inputs of the Concept page: where the concept comes from (an adapter or a full fine-tune) and
which base it was trained on, resolved once per script run into :class:`ui.jobs.PanelInputs`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import streamlit as st

from engine.api import GraftError, ModelSpec
from ui.jobs import PanelInputs
from ui.state import one_line, selection
from ui.text import code, md

SOURCES = ("The donor's LoRA adapter", "A PEFT adapter folder", "Full fine-tune: donor − base")
SOURCE_KEY, PATH_KEY, BASE_KEY = "concept_source", "concept_adapter_path", "concept_base"


@dataclass(frozen=True)
class ConceptInputs:
    """What T5/T6 read (adapter, or donor + base) and what the conjugation adds the target to."""

    analysis: PanelInputs  # T5 / T6
    transplant: PanelInputs  # conjugation: the same source and base, plus the sidebar's target
    description: str


@st.cache_data(ttl=10, max_entries=32, show_spinner=False)
def _resolve(text: str) -> tuple[str, str, str]:
    """(adapter folder, base hint, label) of an adapter text; raises GraftError."""
    from engine.api import resolve_adapter

    ref = resolve_adapter(text)
    return str(ref.path), ref.base_hint, ref.label or text


def donor_adapter(donor_text: str, donor_ref: str) -> Optional[str]:
    """The adapter behind the sidebar's donor, when it is a Graft donor (make-donor folder or the
    demo donor): the text to resolve, or None."""
    candidates = [donor_text]
    if donor_ref and Path(donor_ref).name == "merged":
        candidates.append(str(Path(donor_ref).parent))
    for text in candidates:
        try:
            _resolve(text)
            return text
        except GraftError:
            continue
    return None


def concept_inputs() -> ConceptInputs:
    """Draw the source / base pickers and resolve them (errors become one line each)."""
    sel = selection()
    errors: list[str] = []
    own = donor_adapter(sel.donor_text, sel.donor.ref if sel.donor else "") if sel.donor_text else None
    choices = list(SOURCES) if own else list(SOURCES[1:])
    if st.session_state.get(SOURCE_KEY) not in choices:
        st.session_state[SOURCE_KEY] = choices[0]
    left, right = st.columns([3, 2])
    source = left.radio(
        "Where the concept comes from",
        choices,
        key=SOURCE_KEY,
        horizontal=True,
        help="A LoRA adapter (its factors are read directly), or a full fine-tune given as the "
        "donor against its base (dW = W_D − W_base, factored by a randomized SVD).",
    )
    adapter: Optional[str] = None
    hint = ""
    if source == SOURCES[0]:
        adapter = own
    elif source == SOURCES[1]:
        adapter = (
            left.text_input(
                "Adapter folder",
                key=PATH_KEY,
                placeholder="/path/to/peft-adapter (adapter_config.json + adapter_model.safetensors)",
            ).strip()
            or None
        )
        if adapter is None:
            errors.append("type the path of a PEFT adapter folder")
    if adapter:
        try:
            folder, hint, label = _resolve(adapter)
            left.caption(f"Adapter: {code(folder)}" + (f" · trained on **{md(hint)}**" if hint else ""))
        except GraftError as exc:
            errors.append(f"Adapter: {one_line(exc)}")
    default_base = hint or (sel.target_text if source != SOURCES[2] else sel.target_text)
    if st.session_state.get("_concept_base_default") != default_base:
        st.session_state[BASE_KEY] = default_base  # follow the adapter's own base until the user edits it
        st.session_state["_concept_base_default"] = default_base
    base_text = right.text_input(
        "Base model",
        key=BASE_KEY,
        help="The model the adapter (or the fine-tuned donor) was trained from: a built-in "
        "name, a folder, a .gguf file or a cached hub id. Defaults to the adapter's "
        "own base.",
    ).strip()
    base: Optional[ModelSpec] = None
    try:
        base = ModelSpec.parse(base_text, sel.trust_remote_code)
    except GraftError as exc:
        errors.append(f"Base: {one_line(exc)}")
    if source == SOURCES[2] and sel.donor is None:
        errors.append("choose the fine-tuned donor in the sidebar")

    models: dict = {"base": base}
    if source == SOURCES[2]:
        models["donor"] = sel.donor
        what = f"full fine-tune {sel.donor_text} − {base_text}"
    else:
        models["adapter"] = adapter
        what = f"adapter {adapter or '?'} on {base_text}"
    analysis = PanelInputs(
        {k: v for k, v in models.items() if v},
        sel.options,
        tuple(errors) + (() if sel.options else ("fix the run options in the sidebar",)),
    )
    t_errors = list(analysis.errors)
    if sel.target is None:
        t_errors.append("choose the target in the sidebar")
    transplant = PanelInputs(
        {**analysis.models, **({"target": sel.target} if sel.target else {})}, sel.options, tuple(t_errors)
    )
    return ConceptInputs(analysis, transplant, what)
