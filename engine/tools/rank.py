"""T7 ``rank-modules``. For every linear module present in both models with identical stored
shape, both models read the workload and the module's output rows are captured (token level:
the same tokenizer is required). With ``o_D``, ``o_T`` the donor's and the target's output on
the same token,

    score = mean_tokens ||o_D - o_T||_2 / mean_tokens ||o_T||_2,

and the same ratio restricted to each text gives per-text scores. A module is in a text's top
decile when its per-text score ranks within the first ``ceil(top_decile * M)`` of the ``M``
modules (ties broken by block order); consistency = share of texts where that happens.

Both models must share family and tokenizer (:func:`engine.surgery.transplant.check_swap_pair`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.params import param
from ..core.progress import Progress
from ..running.context import ToolContext
from ..running.module_choice import RankResult, rank_modules
from ..running.registry import Tool, register


@dataclass(frozen=True)
class RankParams:
    top_decile: float = param(
        0.1,
        "Share of modules that counts as a text's 'top decile' for the consistency column (0.1 = the top "
        "10%).",
        min=0.01,
        max=1.0,
    )


def compute_rank(ctx: ToolContext, params: RankParams, progress: Progress) -> RankResult:
    return rank_modules(ctx, progress, params.top_decile)


RANK_TOOL = register(
    Tool(
        name="rank-modules",
        code="T7",
        title="Activation-difference module ranking",
        summary="Ranks every linear module shared by donor and target by how differently it responds to "
        "the workload: mean ||o_D − o_T|| / mean ||o_T||, with per-text consistency.",
        params_cls=RankParams,
        compute=compute_rank,
        figure="viz.transplant:rank_figure",
        page="Transplant",
        same_family=True,
        streams=True,
        dispatches=True,
        module_rows=True,
    )
)
