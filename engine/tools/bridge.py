"""T4 Bridge sufficiency (METHODS.md; NOT, Proposition 1).

An organ taken from donor position ``s`` expects the donor's stream ``h_{s-1}`` as input; inserted
at target position ``p`` it receives the target's ``h_{p-1}``. For every (s, p) we report the mean
row cosine between the two, raw (equal widths only) and after the best linear bridge, and
``epsilon = 1 - cosine``.

The bridge W maps target h_{p-1} -> donor h_{s-1}. It is ridge least squares shrunk towards the
identity (towards 0 when widths differ), since bridges start at identity (T10):
``W = (X^T X + lam I)^{-1} (X^T Y + lam W0)``. It is fitted on the fit rows and every cosine is
measured on held-out rows, so a bridge cannot look good by memorising. Cosines are uncentred, as
the residual stream is what the organ reads.

Cost: the grid needs a bridge for every (s, p). We use the exact dual form
``X_h W = (X_h A^{-1} X_f^T) Y_f + lam X_h A^{-1} W0`` with ``A = X_f^T X_f + lam I``: the n_h x n_f
matrix ``P = X_h A^{-1} X_f^T`` is computed once per p (float64, A factored once by Cholesky and
reused for every s), and one float32 product ``P @ [Y_f(s=0) ... Y_f(s=L-1)]`` gives every donor
position at once; the row cosines are float32 dot products of 576 terms (about 1e-7 relative). At most
``max_heldout_rows`` held-out rows (evenly spaced) are scored, which bounds the cost.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..context import ToolContext
from ..errors import GraftError
from ..linalg import RidgeFactor, split_rows
from ..params import HeldOutFit, param
from ..progress import Progress
from ..registry import Tool, register


@dataclass(frozen=True)
class BridgeParams(HeldOutFit):
    epsilon_threshold: float = param(0.1, "Direct replacement is called plausible where epsilon = 1 - cosine is below this.", min=0.0, max=2.0)
    max_heldout_rows: int = param(256, "Cap on held-out rows scored per cell (cost grows linearly; the mean cosine is stable well before).", min=8)


@dataclass
class BridgeResult:
    donor_positions: list[int]  # s: organ starts at donor block s (input h_{s-1})
    target_positions: list[int]  # p: inserted at target block p (input h_{p-1})
    cos_raw: Optional[list[list[float]]]  # s x p; None when widths differ
    cos_bridged: list[list[float]]
    epsilon_raw: Optional[list[list[float]]]
    epsilon_bridged: list[list[float]]
    plausible_direct: list[list[int]]  # [s, p] with epsilon_raw < threshold
    best_target_for_donor: list[dict[str, Any]]
    threshold: float
    alignment: str
    n_fit: int
    n_heldout: int


def _mean_cos(pred: torch.Tensor, Y: torch.Tensor, Y_norm: torch.Tensor) -> torch.Tensor:
    """Mean row cosine of each donor block. pred: (n, Ld or 1, d), Y: (n, Ld, d) float32,
    Y_norm: (n, Ld) float64 -> (Ld,) float64. Sums of 576 float32 products (about 1e-7 relative)."""
    num = (pred * Y).sum(-1).double()
    den = pred.norm(dim=-1).double() * Y_norm
    return (num / den.clamp_min(1e-12)).mean(0)


def compute_bridge(ctx: ToolContext, params: BridgeParams, progress: Progress) -> BridgeResult:
    al = ctx.aligned(progress.sub(0, 0.6))
    Ld, Lt = al.X.shape[0] - 1, al.Y.shape[0] - 1
    dd, dt = al.X.shape[2], al.Y.shape[2]
    fit, held = split_rows(al.group, params.heldout_fraction, params.seed)
    if int(fit.sum()) < 2 or int(held.sum()) < 1:
        raise GraftError("too few aligned rows to hold some out: use a larger workload or --max-tokens")
    held_idx = held.nonzero().squeeze(1)
    if held_idx.numel() > params.max_heldout_rows:  # evenly spaced, deterministic
        pick = torch.linspace(0, held_idx.numel() - 1, params.max_heldout_rows).round().long()
        held_idx = held_idx[pick]
    fit_idx = fit.nonzero().squeeze(1)
    # Inputs: donor h_{s-1} for s in 0..Ld-1 is residual index s; same for target h_{p-1}.
    Yd = al.X[:Ld]  # (Ld, n, dd) donor organ inputs
    Xt = al.Y[:Lt]  # (Lt, n, dt) target streams at insertion points
    YdF = Yd[:, fit_idx].permute(1, 0, 2).reshape(fit_idx.numel(), Ld * dd).float()  # (n_f, Ld*dd)
    YdH = Yd[:, held_idx].permute(1, 0, 2).float()  # (n_h, Ld, dd)
    YdH_norm = YdH.double().norm(dim=-1)  # (n_h, Ld)
    square = dt == dd
    cos_b = torch.zeros(Ld, Lt, dtype=torch.float64)
    cos_r = torch.zeros(Ld, Lt, dtype=torch.float64) if square else None
    for p in range(Lt):
        progress(0.6 + 0.4 * p / Lt, f"bridges into target position {p}")
        XF, XH = Xt[p][fit_idx].double(), Xt[p][held_idx].double()  # (n_f, dt), (n_h, dt)
        rf = RidgeFactor.of(XF.T @ XF, params.ridge_alpha)
        XhAinv = rf.solve(XH.T).T  # (n_h, dt) = XH A^{-1} (A symmetric)
        P = (XhAinv @ XF.T).float()  # (n_h, n_f)
        pred = (P @ YdF).reshape(XH.shape[0], Ld, dd)  # (n_h, Ld, dd)
        if square and rf.lam > 0:
            pred += (rf.lam * XhAinv).float().unsqueeze(1)  # the W0 = I prior term, same for every s
        cos_b[:, p] = _mean_cos(pred, YdH, YdH_norm)
        if cos_r is not None:
            cos_r[:, p] = _mean_cos(XH.float().unsqueeze(1), YdH, YdH_norm)
    eps_b = 1.0 - cos_b
    eps_r = None if cos_r is None else 1.0 - cos_r
    plausible = [] if eps_r is None else [[int(s), int(p)] for s, p in (eps_r < params.epsilon_threshold).nonzero().tolist()]
    best = []
    for s in range(Ld):
        p = int(torch.argmin(eps_b[s]))
        best.append({"s": s, "p": p, "epsilon_bridged": round(float(eps_b[s, p]), 6),
                     "epsilon_raw": None if eps_r is None else round(float(eps_r[s, p]), 6)})
    r = lambda M: [[round(float(v), 6) for v in row] for row in M]  # noqa: E731
    progress(1.0, "done")
    return BridgeResult(
        donor_positions=list(range(Ld)), target_positions=list(range(Lt)),
        cos_raw=None if cos_r is None else r(cos_r), cos_bridged=r(cos_b),
        epsilon_raw=None if eps_r is None else r(eps_r), epsilon_bridged=r(eps_b),
        plausible_direct=plausible, best_target_for_donor=best, threshold=params.epsilon_threshold,
        alignment=al.mode, n_fit=int(fit_idx.numel()), n_heldout=int(held_idx.numel()),
    )


TOOL = register(Tool(
    name="bridge-check", code="T4", title="Bridge sufficiency",
    summary="For an organ from donor position s inserted at target position p: epsilon = 1 - cosine of their input streams, raw and through the best linear bridge.",
    params_cls=BridgeParams, compute=compute_bridge, figure="viz.alignment:bridge_figure", page="Alignment",
))
