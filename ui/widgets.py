"""Widgets built from a parameter class: one widget per field, its help text as the tooltip."""

from __future__ import annotations

from typing import Any, Iterable

import streamlit as st

from engine.api import ParamSpec, param_specs


def label_for(name: str) -> str:
    """``heldout_fraction`` -> ``Heldout fraction``."""
    text = name.replace("_", " ")
    return text[:1].upper() + text[1:]


def param_widget(spec: ParamSpec, key: str) -> Any:
    """One widget for one parameter, starting at its default and kept across page switches."""
    label = label_for(spec.name)
    common = {"key": key, "help": spec.help, "persist_state": "session"}
    if spec.choices:
        choices = list(spec.choices)
        index = choices.index(spec.default) if spec.default in choices else 0
        return st.selectbox(label, choices, index=index, **common)
    if spec.type is bool:
        return st.toggle(label, value=bool(spec.default), **common)
    if spec.type is int:
        return st.number_input(
            label,
            value=int(spec.default),
            step=1,
            min_value=int(spec.min) if spec.min is not None else None,
            max_value=int(spec.max) if spec.max is not None else None,
            **common,
        )
    if spec.type is float:
        return st.number_input(
            label,
            value=float(spec.default),
            step=_float_step(spec.default),
            format="%g",
            min_value=float(spec.min) if spec.min is not None else None,
            max_value=float(spec.max) if spec.max is not None else None,
            **common,
        )
    return st.text_input(label, value="" if spec.default is None else str(spec.default), **common)


def _float_step(default: float) -> float:
    if default and abs(default) < 0.1:
        return 0.005
    return 0.05


def param_widgets(cls: type, key_prefix: str, skip: Iterable[str] = (), columns: int = 2) -> dict[str, Any]:
    """Widgets for every field of ``cls`` (except ``skip``), laid out in ``columns`` columns."""
    specs = [s for s in param_specs(cls) if s.name not in set(skip)]
    values: dict[str, Any] = {}
    if not specs:
        return values
    cols = st.columns(min(columns, len(specs))) if columns > 1 else [st.container()]
    for i, spec in enumerate(specs):
        with cols[i % len(cols)]:
            values[spec.name] = param_widget(spec, f"{key_prefix}-{spec.name}")
    return values
