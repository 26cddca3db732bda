"""T2 Layer similarity map (docs/methods.md): linear CKA between every donor and target layer, and
the best monotone (non-decreasing) layer matching by dynamic programming.

Layer ``-1`` is the embedding stream ``h_{-1}`` (the input of block 0), shown when
``include_embeddings`` is on.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.params import param
from ..core.progress import Progress
from ..measure.linalg import monotone_matching
from ..running.context import ToolContext
from ..running.registry import Tool, register


@dataclass(frozen=True)
class CKAParams:
    include_embeddings: bool = param(False, "Also compare h_{-1}, the embedding stream that enters block 0.")


@dataclass
class CKAResult:
    donor_layers: list[int]  # row labels; -1 = embeddings
    target_layers: list[int]
    matrix: list[list[float]]  # donor layers x target layers, CKA in [0, 1]
    matching: list[list[int]]  # [donor_layer, target_layer] pairs, non-decreasing
    matching_cka: list[float]
    mean_matched_cka: float
    diagonal: list[float]  # CKA[i, i] where both have layer i
    alignment: str
    n_rows: int
    n_outlier_rows: int  # massive-activation tokens left out (RunOptions.outlier_factor)
    warnings: list[str]  # one-line warnings (CLI and UI show them): too few rows for the widths
    # "linear" (plug-in HSIC), or "debiased" (unbiased HSIC) when the rows are fewer than the wider
    # width; the form that computed it: "gram" (n x n blocks) or "feature" (d x d cross-products),
    # or "minibatch" (--stats streamed: unbiased HSIC summed over minibatches of rows)
    estimator: str = "linear"
    form: str = "gram"


def compute_cka(ctx: ToolContext, params: CKAParams, progress: Progress) -> CKAResult:
    M = ctx.cka(progress.sub(0, 0.95), params.include_embeddings)
    progress(0.96, "monotone matching")
    start = -1 if params.include_embeddings else 0
    dl = list(range(start, start + M.shape[0]))
    tl = list(range(start, start + M.shape[1]))
    pairs = monotone_matching(M)
    mc = [float(M[i, j]) for i, j in pairs]
    lean = getattr(ctx, "lean", None)
    if callable(lean) and lean():  # --stats streamed: no rows were kept (engine/running/lean_stats.py)
        ls = ctx.lean_stats(progress.sub(1, 1))
        mode, n, n_out, dx, dy = ls.ra.mode, ls.ra.n, ls.ra.n_outliers, ls.dx, ls.dy
    else:
        al = ctx.aligned(progress.sub(1, 1))
        mode, n, n_out, dx, dy = al.mode, al.n, al.n_outliers, int(al.X.shape[2]), int(al.Y.shape[2])
    return CKAResult(
        donor_layers=dl,
        target_layers=tl,
        matrix=[[round(float(v), 6) for v in row] for row in M],
        matching=[[dl[i], tl[j]] for i, j in pairs],
        matching_cka=[round(v, 6) for v in mc],
        mean_matched_cka=round(sum(mc) / len(mc), 6),
        diagonal=[round(float(M[i, i]), 6) for i in range(min(M.shape))],
        alignment=mode,
        n_rows=n,
        n_outlier_rows=n_out,
        warnings=cka_warnings(n, dx, dy),
        estimator=str(getattr(ctx, "meta", {}).get("cka_estimator", "linear")),
        form=str(getattr(ctx, "meta", {}).get("cka_form", "gram")),
    )


def cka_warnings(n: int, dx: int, dy: int) -> list[str]:
    """Linear CKA is biased upwards when the rows are few against the widths (with n <= d every
    centred Gram matrix is close to a scaled projection on the same n - 1 dimensional space): two
    unrelated random models then score high. There T2 reports debiased CKA instead
    (:func:`engine.measure.cka.choose_estimator`), and says so."""
    if n >= max(dx, dy):
        return []
    return [
        f"T2 CKA on {n} aligned rows against widths {dx} / {dy}: with fewer rows than dimensions linear "
        "CKA is biased upwards (unrelated models can score high), so T2 reports debiased CKA (from the "
        "unbiased HSIC estimator; values near 0 for unrelated layers, slightly negative possible) — a "
        "larger workload or --max-tokens gives more rows"
    ]


TOOL = register(
    Tool(
        name="cka",
        code="T2",
        title="Layer similarity map (CKA)",
        summary="Linear CKA between every donor and target layer, with the best monotone layer matching "
        "drawn on it.",
        params_cls=CKAParams,
        compute=compute_cka,
        figure="viz.alignment:cka_figure",
        page="Alignment",
        streams=True,
        dispatches=True,
        lean=True,
    )
)
