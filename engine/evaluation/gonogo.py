"""Pre-surgery go / no-go (issue 9, part 3): from the numbers of T1-T4 (and T7, T5/T6 where they
apply), one recommendation per transplant operation, each with the evidence behind it.

Pure decision logic over the tools' result dicts (``engine/tools/gonogo.py`` runs the tools). The
rules, with the thresholds the user sets (:class:`Thresholds`):

* **Module swap** copies donor weights into the target as they are, so it needs T1's verdict
  (same family, equal shapes) *and* the two models in the same coordinates: the median over T2's
  matched layers of T3's held-out residual of the identity map stays below ``identity_max``. A
  fine-tune of the target passes; a rotated twin (same function, other coordinates) does not,
  however equal its shapes. Suggested K: the smallest K whose top-K T7 scores hold ``swap_mass``
  of the total activation-difference score (ranking concentration).
* **Organ transplant** (default organ: ``k = 3`` blocks from ``s = floor(L_D / 3)``, docs/methods.md T9):
  *direct* where T1 allows it and T4's raw epsilon at some valid position ``p`` is below
  ``epsilon_direct``; else *bridged* where T1 allows it and the bridged epsilon is below
  ``epsilon_bridged``. Suggested positions: the ``positions`` smallest epsilons.
* **Rank-k conjugation** maps every layer through the best linear map T3 found (identity,
  Procrustes or ridge, by held-out residual): go when the mean ``1 - residual`` over matched
  layers reaches ``min_map_alignment``. A plain merge (identity maps) is advised only when the
  models share coordinates (the swap's test). Rank k: T6's k at ``rank_energy`` when an adapter
  was given.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Optional

from ..core.jsonsafe import rnd

OPERATIONS = ("module_swap", "organ", "conjugation")
TITLES = {"module_swap": "Module swap", "organ": "Organ transplant", "conjugation": "Rank-k conjugation"}
ORGAN_LENGTH = 3  # docs/methods.md T9's default organ: k = 3 contiguous blocks
MAP_TOLERANCE = 0.01  # a simpler map is preferred when its held-out residual is within this of a richer one


@dataclass(frozen=True)
class Thresholds:
    identity_max: float
    swap_mass: float
    epsilon_direct: float
    epsilon_bridged: float
    min_map_alignment: float
    rank_energy: float
    positions: int


def _median(xs: list[float]) -> Optional[float]:
    return float(statistics.median(xs)) if xs else None


def _ev(check: str, label: str, value: Any) -> dict[str, Any]:
    return {"check": check, "label": label, "value": value}


def _op(
    name: str, go: bool, settings: dict[str, Any], reasons: list[str], evidence: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "operation": name,
        "title": TITLES[name],
        "go": bool(go),
        "verdict": "go" if go else "no-go",
        "settings": settings,
        "reasons": reasons,
        "evidence": evidence,
    }


# ------------------------------------------------------------------------------------------ shared
def coordinates(procrustes: dict[str, Any]) -> dict[str, Optional[float]]:
    """Medians over T2's matched layers of T3's held-out residuals: identity map (None when the
    widths differ), orthogonal map, ridge map."""
    layers = procrustes.get("layers") or []
    ident = [l["residual_identity"] for l in layers if l.get("residual_identity") is not None]
    return {
        "identity": _median(ident) if len(ident) == len(layers) and layers else None,
        "procrustes": _median([l["residual_heldout"] for l in layers]),
        "ridge": _median([l["residual_ridge"] for l in layers]),
    }


def layer_maps(procrustes: dict[str, Any]) -> list[dict[str, Any]]:
    """Per matched layer, the simplest map whose held-out residual is within MAP_TOLERANCE of the best."""
    out = []
    for l in procrustes.get("layers") or []:
        cands = [
            ("identity", l.get("residual_identity")),
            ("procrustes", l["residual_heldout"]),
            ("ridge", l["residual_ridge"]),
        ]
        cands = [(n, v) for n, v in cands if v is not None]
        best = min(v for _, v in cands)
        name, res = next((n, v) for n, v in cands if v <= best + MAP_TOLERANCE)
        out.append(
            {
                "donor_layer": l["donor_layer"],
                "target_layer": l["target_layer"],
                "map": name,
                "residual_heldout": rnd(res, 4),
                "alignment": rnd(1.0 - res, 4),
            }
        )
    return out


def same_coordinates(coords: dict[str, Optional[float]], th: Thresholds) -> tuple[bool, str]:
    ident = coords["identity"]
    if ident is None:
        return False, "hidden sizes differ, so the two models cannot share coordinates"
    proc = coords["procrustes"]
    if ident <= th.identity_max:
        return True, f"same coordinates: median T3 identity residual {ident:.3f} ≤ {th.identity_max:g}"
    return False, (
        f"other coordinates: median T3 held-out residual of the identity map is {ident:.3f} "
        f"(> {th.identity_max:g}) while a rotation leaves {proc:.3f}: weights copied as they are "
        "would read and write the wrong basis"
    )


# ------------------------------------------------------------------------------------- module swap
def suggest_k(modules: list[dict[str, Any]], mass: float) -> tuple[int, Optional[float]]:
    """Smallest K whose top-K T7 scores hold ``mass`` of the total score; (all, None) when every
    score is 0 (donor and target compute the same: any K is a no-op)."""
    scores = [float(m.get("score") or 0.0) for m in modules]
    total = sum(scores)
    if total <= 0:
        return len(scores), None
    acc = 0.0
    for k, s in enumerate(scores, 1):
        acc += s
        if acc >= mass * total - 1e-12:
            return k, acc / total
    return len(scores), 1.0


def module_swap(
    compat: dict[str, Any],
    coords: dict[str, Optional[float]],
    rank: Optional[dict[str, Any]],
    rank_error: str,
    th: Thresholds,
) -> dict[str, Any]:
    t1_reasons = list(compat["reasons"].get("module_swap") or [])
    ev = [
        _ev("T1", "verdict", "possible" if compat["verdicts"]["module_swap"] else "impossible"),
        _ev("T1", "swappable modules", f"{compat['swappable_modules']} of {compat['shared_modules']} shared"),
        _ev("T1", "tokenizer overlap (Jaccard)", rnd(compat["tokenizer_overlap"], 4)),
    ]
    if not compat["verdicts"]["module_swap"]:
        return _op("module_swap", False, {}, ["T1: " + (t1_reasons[0] if t1_reasons else "not possible")], ev)
    ev.append(_ev("T3", "median identity residual (held-out)", rnd(coords["identity"], 4)))
    ev.append(_ev("T3", "median Procrustes residual (held-out)", rnd(coords["procrustes"], 4)))
    same, why = same_coordinates(coords, th)
    if not same:
        return _op("module_swap", False, {}, ["T3: " + why + "; use rank-k conjugation"], ev)
    if rank is None:
        return _op("module_swap", False, {}, ["T7: " + (rank_error or "no module ranking")], ev)
    mods = rank["modules"]
    k, share = suggest_k(mods, th.swap_mass)
    top = mods[:k]
    ev += [
        _ev("T7", "ranked modules", rank["n_modules"]),
        _ev("T7", f"K holding {th.swap_mass:.0%} of the score", k),
        _ev("T7", "top module", f"{mods[0]['name']} (score {mods[0]['score']:.3g})" if mods else None),
        _ev(
            "T7",
            "attention / MLP in the top K",
            f"{sum(m['kind'] == 'attention' for m in top)} / {sum(m['kind'] == 'mlp' for m in top)}",
        ),
        _ev(
            "T7",
            "mean consistency of the top K",
            rnd(sum(m["consistency"] for m in top) / max(len(top), 1), 4),
        ),
    ]
    if share is None:
        reasons = [
            why,
            "T7: every module scores 0 (the donor computes what the target computes): any K is a no-op; K "
            f"= {k}",
        ]
    else:
        reasons = [
            why,
            f"T7: the top {k} of {len(mods)} modules hold {share:.0%} of the activation difference",
        ]
    reasons += [r for r in t1_reasons[1:] if "tokenizers differ" in r or "layer counts" in r]
    return _op(
        "module_swap", True, {"k": k, "score_share": rnd(share, 4), "n_modules": len(mods)}, reasons, ev
    )


# ------------------------------------------------------------------------------------------- organ
def organ(compat: dict[str, Any], bridge: dict[str, Any], th: Thresholds) -> dict[str, Any]:
    Ld, Lt = len(bridge["donor_positions"]), len(bridge["target_positions"])
    s = Ld // 3
    k = max(1, min(ORGAN_LENGTH, Ld - s, Lt))
    valid = list(range(0, Lt - k + 1))
    settings: dict[str, Any] = {"organ_start": s, "organ_length": k}
    raw, bri = bridge.get("epsilon_raw"), bridge["epsilon_bridged"]

    def best(M: Optional[list[list[float]]]) -> list[tuple[int, float]]:
        if M is None:
            return []
        return sorted(((p, float(M[s][p])) for p in valid), key=lambda t: (t[1], t[0]))[: th.positions]

    b_raw, b_br = best(raw), best(bri)
    ev = [
        _ev("T1", "organ direct", "possible" if compat["verdicts"]["organ_direct"] else "impossible"),
        _ev("T1", "organ bridged", "possible" if compat["verdicts"]["organ_bridged"] else "impossible"),
        _ev("T4", f"organ = donor blocks {s}..{s + k - 1}", f"{k} blocks"),
        _ev(
            "T4",
            "smallest raw epsilon",
            f"{b_raw[0][1]:.3f} at p={b_raw[0][0]}" if b_raw else "widths differ",
        ),
        _ev("T4", "smallest bridged epsilon", f"{b_br[0][1]:.3f} at p={b_br[0][0]}" if b_br else None),
    ]
    t1 = compat["reasons"]
    if compat["verdicts"]["organ_direct"] and b_raw and b_raw[0][1] < th.epsilon_direct:
        settings.update(mode="direct", positions=[p for p, _ in b_raw], epsilon=[rnd(e, 4) for _, e in b_raw])
        return _op(
            "organ",
            True,
            settings,
            [
                f"T4: direct replacement plausible: epsilon {b_raw[0][1]:.3f} < "
                f"{th.epsilon_direct:g} at target block {b_raw[0][0]}"
            ],
            ev,
        )
    if compat["verdicts"]["organ_bridged"] and b_br and b_br[0][1] < th.epsilon_bridged:
        why = (
            f"T4: raw epsilon {b_raw[0][1]:.3f} ≥ {th.epsilon_direct:g}"
            if b_raw and compat["verdicts"]["organ_direct"]
            else "T1: " + ((t1.get("organ_direct") or ["direct replacement impossible"])[0])
        )
        settings.update(mode="bridged", positions=[p for p, _ in b_br], epsilon=[rnd(e, 4) for _, e in b_br])
        return _op(
            "organ",
            True,
            settings,
            [
                why + "; direct replacement not advised",
                f"T4: through a linear bridge epsilon {b_br[0][1]:.3f} < "
                f"{th.epsilon_bridged:g} at target block {b_br[0][0]}",
            ],
            ev,
        )
    if not compat["verdicts"]["organ_bridged"]:
        return _op(
            "organ",
            False,
            settings,
            ["T1: " + ((t1.get("organ_bridged") or ["block internals differ"])[-1])],
            ev,
        )
    return _op(
        "organ",
        False,
        settings,
        [
            f"T4: even through a linear bridge epsilon stays ≥ {th.epsilon_bridged:g} "
            f"(best {b_br[0][1]:.3f} at p={b_br[0][0]})"
            if b_br
            else "T4: no valid position"
        ],
        ev,
    )


# ------------------------------------------------------------------------------------- conjugation
def conjugation(
    compat: dict[str, Any],
    cka: dict[str, Any],
    procrustes: dict[str, Any],
    coords: dict[str, Optional[float]],
    spectrum: Optional[dict[str, Any]],
    cartography: Optional[dict[str, Any]],
    th: Thresholds,
) -> dict[str, Any]:
    maps = layer_maps(procrustes)
    mean_al = sum(m["alignment"] for m in maps) / max(len(maps), 1)
    counts = {n: sum(m["map"] == n for m in maps) for n in ("identity", "procrustes", "ridge")}
    same, why_same = same_coordinates(coords, th)
    settings: dict[str, Any] = {
        "map": "identity" if same else "auto",
        "plain_merge_advised": same,
        "layers": maps,
        "mean_map_alignment": rnd(mean_al, 4),
    }
    ev = [
        _ev("T2", "mean CKA along the matching", rnd(cka["mean_matched_cka"], 4)),
        _ev("T3", "mean alignment of the best map per layer", rnd(mean_al, 4)),
        _ev(
            "T3",
            "maps (identity / Procrustes / ridge)",
            f"{counts['identity']} / {counts['procrustes']} / {counts['ridge']}",
        ),
        _ev("T3", "median identity residual (held-out)", rnd(coords["identity"], 4)),
    ]
    reasons = []
    if spectrum is not None:
        sm = spectrum["summary"]
        settings.update(energy=th.rank_energy, k_median=sm.get("median_k"), k_max=sm.get("max_k"))
        ev.append(
            _ev(
                "T6",
                f"k at {th.rank_energy:.0%} energy (median / max)",
                f"{sm.get('median_k')} / {sm.get('max_k')}",
            )
        )
        reasons.append(
            f"T6: rank k = {sm.get('median_k')} (median; at most {sm.get('max_k')}) keeps "
            f"{th.rank_energy:.0%} of each module's update"
        )
    else:
        reasons.append("rank k: give an adapter to read it from T6 (without one, the full rank is carried)")
    if cartography is not None:
        ks = cartography.get("kind_shares") or {}
        ev.append(
            _ev(
                "T5",
                "share of the update in attention / MLP",
                f"{(ks.get('attention') or 0):.0%} / {(ks.get('mlp') or 0):.0%}",
            )
        )
    if not compat["verdicts"].get("conjugation", True):
        return _op("conjugation", False, settings, ["T1: " + compat["reasons"]["conjugation"][0]], ev)
    # In the same coordinates the identity is the map (a plain merge is exact there): where the
    # donor's own update moved its activations away from the target's is what is being carried,
    # not a misalignment, so the alignment floor below applies only to other coordinates.
    if not same and mean_al < th.min_map_alignment:
        return _op(
            "conjugation",
            False,
            settings,
            [
                f"T3: the best linear map per layer explains {_share(mean_al)} of the "
                f"target's held-out activations on average (< {th.min_map_alignment:.0%}): "
                "the update would land in the wrong place"
            ]
            + reasons,
            ev,
        )
    lead = (
        f"T3: {why_same}; a plain merge (identity maps) is enough"
        if same
        else f"T3: {why_same.split(':', 1)[-1].strip()}; plain merge not advised, conjugate through fitted "
        "maps"
    )
    return _op(
        "conjugation",
        True,
        settings,
        [lead, f"T3: the best map per layer explains {_share(mean_al)} on held-out rows"] + reasons,
        ev,
    )


# ----------------------------------------------------------------------------------------- overall
def overall(ops: list[dict[str, Any]]) -> tuple[list[str], str]:
    viable = [o["operation"] for o in ops if o["go"]]
    if not viable:
        return [], "no-go: no operation is viable for this pair. " + " ".join(
            f"{o['title']}: {o['reasons'][0]}." for o in ops if o["reasons"]
        )
    parts = []
    for o in ops:
        if not o["go"]:
            continue
        s = o["settings"]
        if o["operation"] == "module_swap":
            parts.append(f"module swap of the top K = {s['k']}")
        elif o["operation"] == "organ":
            parts.append(
                f"organ transplant ({s['mode']}) of donor blocks {s['organ_start']}.."
                f"{s['organ_start'] + s['organ_length'] - 1} at target block {s['positions'][0]}"
            )
        else:
            k = f", k = {s['k_median']}" if s.get("k_median") is not None else ""
            parts.append(
                f"rank-k conjugation ({'identity maps' if s['plain_merge_advised'] else 'fitted maps'}{k})"
            )
    return viable, "go: " + "; ".join(parts)


def _share(alignment: float) -> str:
    """T3's mean alignment (1 - held-out residual) as a share explained; below 0 the maps do worse
    than predicting the mean, which explains nothing (not "-2%")."""
    return (
        f"{alignment:.0%}"
        if alignment >= 0
        else f"nothing (alignment {alignment:.2f}: worse than predicting the mean)"
    )
