"""The sidebar every page shares: donor and target pickers, run options, the T1 verdict badge.

The chosen models live in ``st.session_state["donor"]`` / ``["target"]`` as spec text (a built-in
name, a folder, a .gguf file or a hub id). ``?donor=...&target=...`` in the URL preselects them on
a session's first run, and the URL follows the selection so a link reopens the same pair. At the
end, :func:`render_sidebar` stores a parsed :class:`~ui.state.Selection` for the pages.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import streamlit as st

from engine.api import (
    BUILTIN_DESCRIPTIONS,
    DEMO_DONOR,
    FAILED,
    LOADED,
    LOADING,
    SMOLLM2,
    GraftError,
    LoadState,
    ModelSpec,
    builtin_status,
    cached_hub_models,
    model_card,
    remote_code_files,
    resolve_device,
)
from ui.demo import demo_builder, demo_pair_ready
from ui.memory import sidebar_memory
from ui.run_options import run_options_section, save_upload  # noqa: F401  (save_upload: tested here)
from ui.state import (
    DONOR,
    SELECTION,
    TARGET,
    TRUST,
    Selection,
    graft_error,
    job_runner,
    last_job_id,
    model_store,
    one_line,
    preloader,
    startup_notes,
)
from ui.text import md

TINY_PAIR = ("tiny-gpt2-a", "tiny-gpt2-b")
OTHER = "\u2026other"  # the picker entry that reveals a free-text path / GGUF / hub id field
BUILTIN_ORDER = (DEMO_DONOR, SMOLLM2)  # shown first; the rest of the built-ins follow

STATE_ICONS = {"ready": "●", "needs preparing": "◐", "needs building": "◐", "unavailable": "○"}
VERDICT_LABELS = {
    "module_swap": "module swap",
    "organ_direct": "organ direct",
    "organ_bridged": "organ bridged",
    "conjugation": "conjugation",
}


# --------------------------------------------------------------------------- entry point
def render_sidebar() -> Selection:
    """Draw the sidebar and store the resolved selection for the pages of this run."""
    status = builtin_status()
    _init_selection()
    with st.sidebar:
        sel = _model_section(status)
        options, option_errors = run_options_section()
        sel = dataclasses.replace(sel, options=options, errors=sel.errors + option_errors)
        _sync_query_params(sel)
        st.session_state[SELECTION] = sel
        _compat_badge(sel, status)
        sidebar_memory(sel)
    if not st.session_state.get("_startup_notes_shown"):
        st.session_state["_startup_notes_shown"] = True
        for note in startup_notes():
            st.toast(md(note), icon=":material/cleaning_services:")
    return sel


def default_pair() -> tuple[str, str]:
    """The demo pair once built; the instant tiny random pair until then."""
    return (DEMO_DONOR, SMOLLM2) if demo_pair_ready() else TINY_PAIR


def _init_selection() -> None:
    """On a session's first run: models from ``?donor=&target=``, else the default pair."""
    if st.session_state.get("_selection_initialised"):
        return
    donor, target = default_pair()
    qp = st.query_params
    st.session_state.setdefault(DONOR, qp.get("donor") or donor)
    st.session_state.setdefault(TARGET, qp.get("target") or target)
    # Query parameters preselect models and nothing else: trusting remote code is never taken
    # from a link (see _trust_section).
    st.session_state["_selection_initialised"] = True


def _sync_query_params(sel: Selection) -> None:
    for name, value in (("donor", sel.donor_text), ("target", sel.target_text)):
        if value and st.query_params.get(name) != value:
            st.query_params[name] = value


# --------------------------------------------------------------------------- models
@st.cache_data(ttl=60, show_spinner=False)
def _hub_models() -> list[str]:
    return cached_hub_models()


def model_choices(status: dict[str, dict[str, Any]]) -> list[str]:
    builtins = list(BUILTIN_ORDER) + [n for n in BUILTIN_DESCRIPTIONS if n not in BUILTIN_ORDER]
    return builtins + [m for m in _hub_models() if m not in builtins] + [OTHER]


def _format_choice(option: str, status: dict[str, dict[str, Any]]) -> str:
    if option == OTHER:
        return "Other: folder, .gguf file or hub id…"
    if option in status:
        state = status[option]["state"]
        return f"{STATE_ICONS.get(state, '')} {option} · {state}"
    return f"● {option} · HF cache"


def _model_section(status: dict[str, dict[str, Any]]) -> Selection:
    st.markdown("##### Model pair")
    choices = model_choices(status)
    donor_text = _model_picker(DONOR, "Donor", "the model knowledge is taken from", choices, status)
    st.button(
        "Swap donor and target",
        key="swap-models",
        on_click=_swap,
        icon=":material/swap_vert:",
        type="tertiary",
    )
    target_text = _model_picker(TARGET, "Target", "the model knowledge is moved into", choices, status)
    trust = _trust_section(donor_text, target_text)

    errors: list[str] = []
    specs: dict[str, Optional[ModelSpec]] = {}
    for role, text in ((DONOR, donor_text), (TARGET, target_text)):
        specs[role] = None
        try:
            specs[role] = ModelSpec.parse(text, trust)
        except GraftError as exc:
            errors.append(f"{role.capitalize()}: {one_line(exc)}")
            continue
        state = status.get(text, {}).get("state")
        if state == "unavailable":
            errors.append(
                f"{role.capitalize()}: {text} is unavailable here (its optional package is not installed)"
            )
    for message in errors:
        st.error(md(message), icon=":material/error:")
    for role, text in ((DONOR, donor_text), (TARGET, target_text)):
        if specs[role] is not None and specs[role].kind != "builtin":
            summary = _card_summary(text)
            if summary:
                st.caption(f":material/description: {role.capitalize()}: {md(summary)}")
        state = status.get(text, {}).get("state")
        if state == "needs building":
            st.caption(
                f"{role.capitalize()} {md(text)} is built on first use (several minutes on CPU); "
                "or build it now below."
            )
        elif state == "needs preparing":
            st.caption(f"{role.capitalize()} {md(text)} is converted once on first use (about a minute).")

    if not demo_pair_ready() or last_job_id("demo-donor"):
        with st.container(border=True):
            if not demo_pair_ready():
                st.caption(
                    "The demo pair (SmolLM2 + its concept-tuned donor) is not built yet"
                    + (
                        ", so the instant tiny random pair is selected."
                        if (donor_text, target_text) == TINY_PAIR
                        else "."
                    )
                )
            demo_builder("sidebar")
    return Selection(donor_text, target_text, bool(trust), specs[DONOR], specs[TARGET], None, tuple(errors))


@st.cache_data(ttl=10, max_entries=64, show_spinner=False)
def _remote_code(text: str) -> list[str]:
    return remote_code_files(ModelSpec.parse(text))


@st.cache_data(ttl=10, max_entries=64, show_spinner=False)
def _card_summary(text: str) -> Optional[str]:
    try:
        card = model_card(ModelSpec.parse(text))
    except GraftError:
        return None
    return card["summary"] if card else None


def _trust_section(donor_text: str, target_text: str) -> bool:
    """Whether this session lets the chosen models run their own Python code.

    Off by default and never set from a link. Only when a chosen model ships code (``auto_map``
    entries or ``.py`` files) does the sidebar offer the switch, listing exactly the files that
    would run; the grant belongs to this session and to this pair, and is withdrawn as soon as
    either model changes."""
    pair = (donor_text, target_text)
    if st.session_state.get("_trust_pair") != pair:
        st.session_state[TRUST] = False  # a new pair starts untrusted
        st.session_state["_trust_pair"] = pair
    files: dict[str, list[str]] = {}
    for role, text in (("donor", donor_text), ("target", target_text)):
        try:
            found = _remote_code(text)
        except GraftError:
            continue
        if found:
            files[f"{role} {ModelSpec.parse(text).label}"] = found
    if not files:
        st.session_state[TRUST] = False
        return False
    with st.container(border=True):
        st.markdown(
            ":orange-badge[:material/code: custom code] The chosen models ship Python code that "
            "runs on this machine if you trust it:"
        )
        for who, names in files.items():
            st.caption(f"**{md(who)}**")
            st.code("\n".join(names), language=None)
        return bool(
            st.checkbox(
                "Trust and run this code (this session, this pair)",
                key=TRUST,
                help="Off: the models load without their custom code, or are refused if they need it. "
                "Never turned on by a link; resets when you pick another model.",
            )
        )


def _model_picker(
    role: str, label: str, what: str, choices: list[str], status: dict[str, dict[str, Any]]
) -> str:
    """Selectbox of known models plus a free-text field; returns the chosen spec text."""
    wanted = st.session_state.get(role, "")
    synced_key, gen_key = f"_{role}_synced", f"_{role}_gen"
    # The spec text was changed outside the widgets (query params, swap, "use the demo pair"):
    # push it into new widgets before they are drawn. New keys, not the old ones: a click sent
    # from the page drawn before this change still carries the old pickers' values, and under
    # the old keys those would undo the change (swap, then Run at once, ran the old pair).
    changed = st.session_state.get(synced_key) != wanted
    gen = st.session_state.get(gen_key, 0) + (1 if changed else 0)
    st.session_state[gen_key] = gen
    pick_key, path_key = _picker_keys(role, gen)
    # The widgets' defaults are the spec text itself, never set through their keys: Streamlit may
    # drop a keyed widget's state between runs (a run that did not draw it, a cold server's first
    # legacy run), and a selectbox without state falls back to its default; with a fixed default
    # of the first choice, that once put the demo donor in both pickers mid-run.
    pick = st.selectbox(
        label,
        choices,
        index=choices.index(wanted) if wanted in choices else choices.index(OTHER),
        key=pick_key,
        format_func=lambda o: _format_choice(o, status),
        help=f"The {role}: {what}. Built-ins, models in your local Hugging Face cache, "
        "or (Other) a local folder, a .gguf file or a hub id.",
    )
    if pick == OTHER:
        text = st.text_input(
            f"{label} path",
            value="" if wanted in choices else wanted,
            key=path_key,
            placeholder="/path/to/model, model.gguf or org/name",
            label_visibility="collapsed",
        ).strip()
    else:
        text = pick
    st.session_state[role] = text
    st.session_state[synced_key] = text
    return text


def _picker_keys(role: str, gen: int) -> tuple[str, str]:
    """The widget keys of a role's model picker (selectbox, path field) in generation ``gen``."""
    return f"{role}_pick-{gen}", f"{role}_path-{gen}"


def _swap() -> None:
    st.session_state[DONOR], st.session_state[TARGET] = (
        st.session_state.get(TARGET, ""),
        st.session_state.get(DONOR, ""),
    )


# --------------------------------------------------------------------------- T1 badge
BADGE_POLL_SECONDS = 1.0
PRELOAD_WAIT_S = 0.5  # an instant load (the tiny pair) shows its badge on the same run


def _compat_badge(sel: Selection, status: dict[str, dict[str, Any]]) -> None:
    """The pair's T1 verdicts. The models load in the background (engine/loading/preload.py) and the badge
    says so meanwhile: the page never waits for them."""
    if not sel.ok:
        return
    st.markdown("##### Compatibility (T1)")
    verdicts = _session_compat(sel)
    if verdicts is not None:
        st.markdown(verdict_badges(verdicts))
        return
    if not (_loadable(sel.donor, sel, status) and _loadable(sel.target, sel, status)):
        st.caption(
            "Run the compatibility report on the Models page to see which transplants fit "
            "(the models are loaded there, in the background)."
        )
        return
    states = _pair_states(sel, wait_s=PRELOAD_WAIT_S)
    if all(s.state == LOADED for s in states.values()):
        try:
            verdicts = _compat_verdicts(
                sel.donor_text, sel.target_text, sel.trust_remote_code, sel.options.device, sel.options.dtype
            )
        except Exception as exc:  # the badge is a convenience: never let it break the sidebar
            st.caption(f"Compatibility: {md(graft_error(exc))}")
            return
        st.markdown(verdict_badges(verdicts))
    elif any(s.state == FAILED for s in states.values()):
        for role, s in states.items():
            if s.state == FAILED:
                st.caption(f":material/error: {role.capitalize()} did not load: {md(s.message)}")
        if st.button("Try loading again", key="preload-retry", type="tertiary", icon=":material/refresh:"):
            for spec in (sel.donor, sel.target):
                preloader().retry(spec, sel.options.device, sel.options.dtype)
            st.rerun()
    else:
        _badge_while_loading(sel)


@st.fragment(run_every=BADGE_POLL_SECONDS)
def _badge_while_loading(sel: Selection) -> None:
    """Polls the background loads; the whole app reruns (and draws the badge) once both are done."""
    states = _pair_states(sel)
    if all(s.state != LOADING for s in states.values()):
        st.rerun()
    waiting = " · ".join(
        f"{role} {'✓' if s.state == LOADED else f'loading… {s.seconds:.0f} s'}" for role, s in states.items()
    )
    st.caption(
        f":material/hourglass_top: Loading the pair in the background ({waiting}); the verdicts "
        "show here when both are loaded. Every page works meanwhile."
    )


def _pair_states(sel: Selection, wait_s: float = 0.0) -> dict[str, LoadState]:
    return {
        role: preloader().request(spec, sel.options.device, sel.options.dtype, wait_s=wait_s)
        for role, spec in (("donor", sel.donor), ("target", sel.target))
    }


def verdict_badges(verdicts: dict[str, bool]) -> str:
    """``module swap ✓ · organ direct ✗ ...`` as coloured Markdown badges."""
    parts = []
    for op, ok in verdicts.items():
        label = VERDICT_LABELS.get(op, op.replace("_", " "))
        parts.append(f":green-badge[{label} ✓]" if ok else f":red-badge[{label} ✗]")
    return " ".join(parts)


def _loadable(spec: ModelSpec, sel: Selection, status: dict[str, dict[str, Any]]) -> bool:
    """True for the models the sidebar loads by itself: a ready built-in (never one that must be
    built or converted first), or one already in the store."""
    if spec.kind == "builtin":
        return status.get(spec.ref, {}).get("state") == "ready"
    try:
        key = (spec, str(resolve_device(sel.options.device)), sel.options.dtype)
    except GraftError:
        return False
    return key in model_store().loaded()


def _session_compat(sel: Selection) -> Optional[dict[str, bool]]:
    """Verdicts of this session's last finished T1 job, when it was for the selected pair."""
    job_id = last_job_id("compat")
    job = job_runner().get(job_id) if job_id else None
    if job is None or job.status != "done" or not job.result:
        return None
    if (job.result.get("donor"), job.result.get("target")) != (sel.donor.ref, sel.target.ref):
        return None
    return dict(job.result["result"]["verdicts"])


@st.cache_data(ttl=3600, max_entries=64, show_spinner="Checking compatibility…")
def _compat_verdicts(donor: str, target: str, trust: bool, device: str, dtype: str) -> dict[str, bool]:
    from engine.api import run_tool

    env = run_tool(
        "compat",
        ModelSpec.parse(donor, trust),
        ModelSpec.parse(target, trust),
        {"device": device, "dtype": dtype},
        {},
        store=model_store(),
    )
    return dict(env["result"]["verdicts"])
