"""T4 Bridge sufficiency (docs/methods.md; NOT, Proposition 1).

An organ taken from donor position ``s`` expects the donor's stream ``h_{s-1}`` as input; inserted
at target position ``p`` it receives the target's ``h_{p-1}``. For every (s, p) we report the mean
row cosine between the two, raw (equal widths only) and after the best linear bridge, and
``epsilon = 1 - cosine``.

The bridge W maps target h_{p-1} -> donor h_{s-1}. It is ridge least squares shrunk towards the
identity (towards 0 when widths differ), since bridges start at identity (T10):
``W = (X^T X + lam I)^{-1} (X^T Y + lam W0)``. It is fitted on the fit rows and every cosine is
measured on held-out rows, so a bridge cannot look good by memorising. Cosines are uncentred, as
the residual stream is what the organ reads.

Cost: the grid needs a bridge for every (s, p). Per target position p, one factorisation serves
every donor position s, and :func:`_form` picks the cheapest exact form by flop count: the dual
``X_h W = (X_h A^{-1} X_f^T) Y_f + lam X_h A^{-1} W0`` with ``A = X_f^T X_f + lam I`` (X_h A^{-1}
from a float64 Cholesky factor, then the n_h x n_f matrix P and one product ``P @ [Y_f(s=0) ...
Y_f(s=L-1)]`` in float32), the same P through the n_f x n_f kernel when there are fewer fit rows than the
width, or the primal W for all s at once when the target is narrow. The row cosines are float32
dot products of d terms (about 1e-7 relative). At most ``max_heldout_rows`` held-out rows (evenly
spaced) are scored, which bounds the cost. On a CPU with several threads the target positions
are computed side by side, one thread each (:mod:`engine.core.threads`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..core.errors import GraftError
from ..core.params import HeldOutFit, param
from ..core.progress import Progress
from ..core.threads import cpu_workers, parallel_map
from ..measure.linalg import RidgeFactor, gram, ieee_float32, split_rows
from .context import ToolContext, device_rows


@dataclass(frozen=True)
class BridgeParams(HeldOutFit):
    epsilon_threshold: float = param(
        0.1,
        "Direct replacement is called plausible where epsilon = 1 - cosine is below this.",
        min=0.0,
        max=2.0,
    )
    max_heldout_rows: int = param(
        256,
        "Cap on held-out rows scored per cell (cost grows linearly; the mean cosine is stable well before).",
        min=8,
    )


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
    warnings: list[str]  # one-line warnings (CLI and UI show them): fewer fit rows than the target's width


def _mean_cos(pred: torch.Tensor, Y: torch.Tensor, Y_norm: torch.Tensor) -> torch.Tensor:
    """Mean row cosine of each donor block. pred: (n, Ld or 1, d), Y: (n, Ld, d) float32,
    Y_norm: (n, Ld) float64 -> (Ld,) float64. Sums of 576 float32 products (about 1e-7 relative)."""
    num = torch.linalg.vecdot(pred, Y, dim=-1).double()  # no (n, Ld, d) temporary
    den = pred.norm(dim=-1).double() * Y_norm
    return (num / den.clamp_min(1e-12)).mean(0)


def _form(n_f: int, n_h: int, dt: int, width: int) -> str:
    """The cheapest exact way to the held-out predictions of every bridge into one position, by
    flop count (float64 counted twice): ``primal`` (W for all donor positions at once, when the
    target is narrow), ``dual`` (P = X_h A^{-1} X_f^T, dt x dt factor) or ``kernel`` (the same P
    through the n_f x n_f kernel, when fewer fit rows than the width)."""
    product = n_h * n_f * width  # float32 P @ [Y_f(s)]
    costs = {
        "primal": 2 * (dt * n_f * width + dt * dt * width + n_h * dt * width + n_f * dt * dt),
        "dual": product + 2 * (n_f * dt * dt + dt**3 // 3 + n_h * dt * dt + n_h * dt * n_f),
        "kernel": product + 2 * (n_f * n_f * dt + n_f**3 // 3 + 2 * n_h * n_f * dt + n_h * n_f * n_f),
    }
    return min(costs, key=costs.get)


def _add_prior(out: torch.Tensor, term: torch.Tensor) -> None:
    """out (rows, Ld * d) += term (rows, d) in every donor position's block, in place."""
    out.view(out.shape[0], -1, term.shape[1]).add_(term.to(out.dtype).unsqueeze(1))


def _bridged(
    XF: torch.Tensor, XH: torch.Tensor, YF: torch.Tensor, alpha: float, square: bool, form: str
) -> torch.Tensor:
    """Held-out predictions ``X_h W`` of the ridge bridges into one target position, for every donor
    position at once: XF (n_f, dt), XH (n_h, dt) float64, YF (n_f, Ld * dd) -> (n_h, Ld * dd) float32.

    ``W = A^{-1} (X_f^T Y_f + lam W0)`` with ``A = X_f^T X_f + lam I`` and ``W0 = I`` when the widths
    are equal (else 0). The three forms are the same numbers (to float32 round-off of P's product):
    primal ``X_h A^{-1} (X_f^T Y_f + lam W0)``; dual ``P Y_f + lam X_h A^{-1}`` with
    ``P = X_h A^{-1} X_f^T``; kernel: the same P as ``(X_h X_f^T)(K + lam I)^{-1}`` with
    ``K = X_f X_f^T`` (push-through identity), and ``lam X_h A^{-1} = X_h - P X_f`` (Woodbury).
    """
    lam = alpha * float(XF.pow(2).sum()) / XF.shape[1]  # as RidgeFactor: alpha * tr(X^T X) / dt
    if form == "kernel" and lam > 0:
        P = RidgeFactor.shifted(gram(XF.T), lam).solve(XF @ XH.T).T  # (n_h, n_f); K symmetric
        pred = P.float() @ YF
        if square:
            _add_prior(pred, XH - P @ XF)
        return pred
    rf = RidgeFactor.of(gram(XF), alpha)
    if form == "primal":
        B = XF.T @ YF  # (dt, Ld * dd) float64
        if square and rf.lam > 0:
            _add_prior(B, rf.lam * torch.eye(XF.shape[1], dtype=B.dtype, device=B.device))
        return (XH @ rf.solve(B)).float()
    XhAinv = rf.solve(XH.T).T  # (n_h, dt) = XH A^{-1} (A symmetric)
    pred = (XhAinv.float() @ XF.T.float()) @ YF  # (n_h, Ld * dd); P in float32 (it is used in float32)
    if square and rf.lam > 0:
        _add_prior(pred, rf.lam * XhAinv)  # the W0 = I prior, same for every s
    return pred


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
    al, dev = device_rows(ctx, al)
    fit_idx, held_idx = fit_idx.to(dev), held_idx.to(dev)
    # Inputs: donor h_{s-1} for s in 0..Ld-1 is residual index s; same for target h_{p-1}.
    Yd = al.X[:Ld].to(dev)  # (Ld, n, dd) donor organ inputs
    Xt = al.Y[:Lt].to(dev)  # (Lt, n, dt) target streams at insertion points
    YdF = Yd[:, fit_idx].permute(1, 0, 2).reshape(fit_idx.numel(), Ld * dd).float()  # (n_f, Ld*dd)
    YdH = Yd[:, held_idx].permute(1, 0, 2).float()  # (n_h, Ld, dd)
    YdH_norm = YdH.double().norm(dim=-1)  # (n_h, Ld)
    square = dt == dd
    form = _form(fit_idx.numel(), held_idx.numel(), dt, Ld * dd)  # the same for every p
    YdF_form = YdF.double() if form == "primal" else YdF

    def into(p: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The cosines of every donor position s bridged into target position p (raw and bridged)."""
        XF, XH = Xt[p][fit_idx].double(), Xt[p][held_idx].double()  # (n_f, dt), (n_h, dt)
        pred = _bridged(XF, XH, YdF_form, params.ridge_alpha, square, form)
        raw = _mean_cos(XH.float().unsqueeze(1), YdH, YdH_norm) if square else None
        return _mean_cos(pred.reshape(XH.shape[0], Ld, dd), YdH, YdH_norm), raw

    n_f, n_h = fit_idx.numel(), held_idx.numel()  # per worker: float64 rows and P, float32 predictions
    workers = cpu_workers(
        dev,
        Lt,
        2.0 * n_h * n_f * Ld * dd,  # P @ Y_f per position
        8.0 * (2 * (n_f + n_h) * dt + n_h * n_f) + 8.0 * n_h * Ld * dd,
    )
    with ieee_float32(dev):
        cols = parallel_map(
            into, range(Lt), progress.sub(0.6, 1.0), lambda p: f"bridges into target position {p}", workers
        )
    cos_b = torch.stack([b for b, _ in cols], 1)  # (Ld, Lt)
    cos_r = torch.stack([r for _, r in cols], 1) if square else None
    cos_b, cos_r = cos_b.cpu(), None if cos_r is None else cos_r.cpu()
    eps_b = 1.0 - cos_b
    eps_r = None if cos_r is None else 1.0 - cos_r
    plausible = (
        []
        if eps_r is None
        else [[int(s), int(p)] for s, p in (eps_r < params.epsilon_threshold).nonzero().tolist()]
    )
    best = []
    for s in range(Ld):
        p = int(torch.argmin(eps_b[s]))
        best.append(
            {
                "s": s,
                "p": p,
                "epsilon_bridged": round(float(eps_b[s, p]), 6) + 0.0,
                "epsilon_raw": None if eps_r is None else round(float(eps_r[s, p]), 6) + 0.0,
            }
        )
    r = lambda M: [[round(float(v), 6) + 0.0 for v in row] for row in M]  # noqa: E731  (+ 0.0: no -0.0)
    progress(1.0, "done")
    return BridgeResult(
        donor_positions=list(range(Ld)),
        target_positions=list(range(Lt)),
        cos_raw=None if cos_r is None else r(cos_r),
        cos_bridged=r(cos_b),
        epsilon_raw=None if eps_r is None else r(eps_r),
        epsilon_bridged=r(eps_b),
        plausible_direct=plausible,
        best_target_for_donor=best,
        threshold=params.epsilon_threshold,
        alignment=al.mode,
        n_fit=int(fit_idx.numel()),
        n_heldout=int(held_idx.numel()),
        warnings=[]
        if fit_idx.numel() >= dt
        else [
            f"T4 bridges fitted on {fit_idx.numel()} rows against the target's width {dt}: the ridge "
            "shrinks every direction "
            "the rows do not reach, so the bridged epsilon is pessimistic — use a larger workload or "
            "--max-tokens"
        ],
    )
