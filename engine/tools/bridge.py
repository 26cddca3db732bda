"""T4 as a registered tool: ``bridge``. The estimator lives in :mod:`engine.running.bridge_fit`."""

from __future__ import annotations

from ..running.bridge_fit import BridgeParams, compute_bridge
from ..running.registry import Tool, register

TOOL = register(
    Tool(
        name="bridge-check",
        code="T4",
        title="Bridge sufficiency",
        summary="For an organ from donor position s inserted at target position p: epsilon = 1 - cosine of "
        "their input streams, raw and through the best linear bridge.",
        params_cls=BridgeParams,
        compute=compute_bridge,
        figure="viz.alignment:bridge_figure",
        page="Alignment",
        streams=True,
        dispatches=True,
    )
)
