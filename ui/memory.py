"""The memory plan in the app: each model's size and whether the pair streams (sidebar), and the
plan of the next run (Models page): bytes to read, peak memory, estimated time. Computed from the
models' safetensors headers and config.json only (engine.running.memplan); nothing is loaded."""

from __future__ import annotations

from typing import Any, Optional

import streamlit as st

from engine.api import GraftError, builtin_status, duration, fmt_bytes, plan_run, resolve_device
from ui.state import one_line
from ui.text import md


@st.cache_data(ttl=30, max_entries=64, show_spinner=False)
def _plan(
    donor: Any, target: Any, dtype: str, device: str, tokens: int, max_memory: str, stream: str, stats: str
) -> dict:
    plan = plan_run(
        [donor, target],
        dtype=dtype,
        device=resolve_device(device),
        tokens=tokens,
        max_memory=max_memory,
        stream=stream,
        lean=True,  # T2 and T3 can keep no rows (--stats streamed)
        stats=stats,
        dispatches=True,  # T2-T4 can run on a pair placed by accelerate (--stream dispatch)
    )
    return plan.as_dict()


def pair_plan(sel: Any) -> tuple[Optional[dict], str]:
    """The plan of a T1-T4 run on the selected pair with the sidebar's options, or a one-line error."""
    if not sel.ok or sel.options is None:
        return None, ""
    status = builtin_status()
    for spec in (sel.donor, sel.target):  # never convert or build a built-in just to plan
        if spec.kind == "builtin" and status.get(spec.ref, {}).get("state") != "ready":
            return None, ""
    o = sel.options
    try:
        return _plan(
            sel.donor, sel.target, o.dtype, o.device, o.max_tokens, o.max_memory, o.stream, o.stats
        ), ""
    except GraftError as exc:
        return None, one_line(exc)


def sidebar_memory(sel: Any) -> None:
    """One caption: the two models' sizes, and whether the pair is held whole or streams."""
    plan, error = pair_plan(sel)
    if plan is None:
        if error:
            st.caption(f":material/memory: Memory plan: {md(error)}")
        return
    sizes = " · ".join(f"{m['label']} {fmt_bytes(m['weights_bytes'])}" for m in plan["models"])
    how = {"whole": "held whole", "stream": "**streams block by block**"}.get(
        plan["route"], "**placed by accelerate across devices**"
    )
    fits = "" if plan["fits"] else " — :red[over the budget: T1-T4 will refuse]"
    st.caption(
        f":material/memory: {md(sizes)}; the pair is {how}, peak about {fmt_bytes(plan['peak_bytes'])} "
        f"of {fmt_bytes(plan['budget_bytes'])}{fits}"
    )


def memory_plan_panel(sel: Any) -> None:
    """The Models page's plan: what a T1-T4 run on the pair reads, holds and takes."""
    plan, error = pair_plan(sel)
    st.markdown("#### Memory plan")
    if plan is None:
        st.caption(md(error) if error else "Choose a valid pair in the sidebar to see its memory plan.")
        return
    # a short value (a metric cuts long ones off); what it means is in its help and the lines below
    route, how = {
        "whole": ("held whole", "both models held in memory, in the run's dtype"),
        "stream": (
            "streamed",
            "read block by block from the safetensors shards, one block in memory at a time",
        ),
    }.get(
        plan["route"], ("accelerate", "placed by accelerate's device_map across the device, the CPU and disk")
    )
    if plan.get("stats") == "streamed":
        how += "; T2 and T3 keep no rows (--stats streamed)"
    cols = st.columns(4)
    cols[0].metric("Route", route, help=how)
    cols[1].metric("Bytes to read", fmt_bytes(plan["read_bytes"]))
    cols[2].metric(
        "Peak memory", fmt_bytes(plan["peak_bytes"]), help=f"budget {fmt_bytes(plan['budget_bytes'])}"
    )
    cols[3].metric(
        "Estimated time", duration(plan["est_seconds"]), help="from a matrix-product probe of this machine"
    )
    if not plan["fits"]:
        need, budget = fmt_bytes(plan["peak_bytes"]), fmt_bytes(plan["budget_bytes"])
        st.error(
            md(f"This run needs about {need}, over the {budget} budget: raise Max memory in the run options, "
               "or lower Max tokens."),
            icon=":material/error:",
        )  # fmt: skip
    for line in plan["lines"]:
        st.caption(md(line))
    st.dataframe(
        [
            {
                "model": m["label"],
                "weights": fmt_bytes(m["weights_bytes"]),
                "in the run's dtype": fmt_bytes(m["in_run_dtype_bytes"]),
                "largest block": fmt_bytes(m["largest_block_bytes"]),
                "blocks": m["layers"],
                "width": m["width"],
                "can stream": m["streams"],
                **_placed(plan, i),
            }
            for i, m in enumerate(plan["models"])
        ],
        hide_index=True,
    )


def _placed(plan: dict, i: int) -> dict:
    """On the dispatch route: what accelerate is planned to keep on the device, the CPU and disk."""
    if plan["route"] != "dispatch" or i >= len(plan.get("placement") or []):
        return {}
    m = plan["placement"][i]
    return {f"on {t}": fmt_bytes(m[f"{t}_bytes"]) for t in ("device", "cpu", "disk")}
