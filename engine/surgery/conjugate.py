"""Rank-k conjugation transplant (docs/methods.md, transplant operation 3; Model Surgery).

A donor's update ``dW`` (LoRA factors, or a full fine-tune's ``W_D - W_B`` factored by
:mod:`engine.adapters.finetune_delta`) was learnt on a *base* model B. Conjugation carries it into a
*target* T whose coordinates may differ (a rotated twin, another checkpoint, another architecture):

1. **Truncate** each module's ``dW = B A`` to rank ``k`` from its factors (T6): ``dW_k = B_k A_k``.
   ``k = 0`` keeps the module's full rank; ``energy`` picks per-module ``k`` as the smallest rank
   reaching that share of ``||dW||_F^2`` (:func:`engine.adapters.lowrank.k_at_energy`); both given: the
   smaller.
2. **Match layers**: base layer ``i`` -> target layer ``j`` by T2's monotone CKA matching of the
   residual streams (or a given ``layer_map``); the module with the same canonical name in
   target layer ``j`` receives the update. A canonical name the target lacks (GPT-2's fused
   ``attn.qkv`` vs Llama's ``attn.q``) is skipped with the reason.
3. **Fit one map per side** of each module on the activations that side actually sees, rows
   aligned as everywhere in Graft (token level with one tokenizer, words mean-pooled across
   tokenizers, texts as a last resort; massive-activation rows dropped like T2/T3):

   * input side: ``X_B ~ X_T M_in`` on the module's *inputs* (after the block's norm, so two
     models' norm gains differ there even when their residual streams are a pure rotation
     apart; for ``o`` the concatenated heads, for ``down`` the MLP hidden state);
   * output side: ``O_T ~ O_B M_out`` on the module's *outputs* (q/k/v: the head spaces; gate/up:
     the MLP hidden space; o/down: the residual stream).

   Row vectors, a module computes ``o = x W^T``. Then
   ``dO_T = dO_B M_out = x_B dW^T M_out ~ x_T M_in dW^T M_out``, i.e.

       dW_T = M_out^T dW_k M_in^T = (M_out^T B_k) (A_k M_in^T) = B_T A_T,

   which stays rank ``k`` in factored form: ``B_T`` is ``(out_T, k)``, ``A_T`` is ``(k, in_T)``.
4. **Add** ``B_T A_T`` to a working copy of T (:class:`Conjugation`: reversible, bit-exact
   rollback, the cached target never written), run the interference check
   (:mod:`engine.evaluation.interference`, T12) and roll back when retained perplexity worsens past the
   user's threshold (:func:`apply_and_check`).

Where things live: :mod:`engine.surgery.conjugate_maps` fits and chooses the map of one side (how, and
what a rotated twin should give); :mod:`engine.surgery.conjugate_plan` plans a conjugation (truncation,
layer matching, module captures, fitted factors); this module holds the plan
(:class:`ConjugationPlan`) and the reversible edit that applies it (:class:`Conjugation`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..core.errors import GraftError
from ..core.jsonsafe import rnd
from ..core.progress import ProgressLike, as_progress
from ..loading.arch import LinearModule
from ..loading.models import LoadedModel
from .conjugate_maps import MAP_KINDS, SideMap
from .reversible import ReversibleEdit, working_copy
from .transplant import save_transplant

OPERATION = "rank-k conjugation"


# =============================================================================================
# The plan
# =============================================================================================


@dataclass
class ModulePlan:
    """One donor module: where it goes, its maps and its factors in the target's coordinates."""

    name: str  # base/donor module, e.g. "blocks.3.attn.q"
    layer: int
    canonical: str  # "attn.q"
    kind: str  # "attention" | "mlp"
    rank: int  # rank of the donor's factors
    k: int  # rank kept
    energy_kept: float  # ||dW_k||_F^2 / ||dW||_F^2
    delta_norm: float  # ||dW_k||_F (base coordinates)
    status: str = "skipped"  # "conjugated" | "skipped"
    reason: str = ""
    target_name: Optional[str] = None
    target_layer: Optional[int] = None
    input: Optional[SideMap] = None  # M_in: target inputs -> base inputs
    output: Optional[SideMap] = None  # M_out: base outputs -> target outputs
    B: Optional[torch.Tensor] = field(default=None, repr=False)  # (out_T, k)
    A: Optional[torch.Tensor] = field(default=None, repr=False)  # (k, in_T)
    target_delta_norm: Optional[float] = None  # ||B_T A_T||_F

    def report(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layer": self.layer,
            "canonical": self.canonical,
            "kind": self.kind,
            "target_name": self.target_name,
            "target_layer": self.target_layer,
            "status": self.status,
            "reason": self.reason,
            "rank": self.rank,
            "k": self.k,
            "energy_kept": rnd(self.energy_kept, 8),
            "delta_norm": rnd(self.delta_norm, 8),
            "target_delta_norm": rnd(self.target_delta_norm, 8),
            "input": self.input.report() if self.input else None,
            "output": self.output.report() if self.output else None,
        }


@dataclass
class ConjugationPlan:
    """Everything :class:`Conjugation` needs, and the JSON-able account of how it was decided."""

    base_label: str
    target_label: str
    modules: list[ModulePlan]
    layer_map: list[tuple[int, int]]
    layer_map_source: str  # "T2 matching" | "given" | "identity (same model)"
    alignment: dict[str, Any]  # RowAlignment.summary() + n_fit / n_heldout
    params: dict[str, Any]
    warnings: list[str]
    seconds: dict[str, float]

    @property
    def conjugated(self) -> list[ModulePlan]:
        return [m for m in self.modules if m.status == "conjugated"]

    @property
    def skipped(self) -> list[ModulePlan]:
        return [m for m in self.modules if m.status != "conjugated"]

    def target_modules(self) -> list[str]:
        """Target modules that receive an update, in order of first appearance."""
        return list(dict.fromkeys(m.target_name for m in self.conjugated if m.target_name))

    def map_counts(self) -> dict[str, dict[str, int]]:
        out = {side: {k: 0 for k in MAP_KINDS} for side in ("input", "output")}
        for m in self.conjugated:
            out["input"][m.input.kind] += 1  # type: ignore[union-attr]
            out["output"][m.output.kind] += 1  # type: ignore[union-attr]
        return out

    def report(self) -> dict[str, Any]:
        conj = self.conjugated
        return {
            "base": self.base_label,
            "target": self.target_label,
            "layer_map": [list(p) for p in self.layer_map],
            "layer_map_source": self.layer_map_source,
            **self.alignment,
            "params": dict(self.params),
            "n_modules": len(self.modules),
            "n_conjugated": len(conj),
            "n_skipped": len(self.modules) - len(conj),
            "n_target_modules": len(self.target_modules()),
            "map_counts": self.map_counts(),
            "mean_energy_kept": rnd(sum(m.energy_kept for m in conj) / len(conj), 8) if conj else None,
            "modules": [m.report() for m in self.modules],
            "skipped": [{"name": m.name, "reason": m.reason} for m in self.skipped],
            "warnings": list(self.warnings),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


# =============================================================================================
# The reversible edit
# =============================================================================================


class Conjugation(ReversibleEdit):
    """Add a plan's ``B_T A_T`` to the weights of a working copy of ``target``, reversibly.

    Like :class:`engine.surgery.transplant.ModuleSwap`: the cached target is never written; the working
    copy shares every tensor except the touched weights (biases are never touched); the original
    of a touched weight is the cached target's tensor, so recording it costs nothing and
    :meth:`rollback` is a bit-exact ``copy_``. Several base modules matched to one target module
    (more base layers than target layers) add up there. The update is summed in float64 and
    rounded once to the weight's dtype; GPT-2 ``Conv1D`` weights (stored ``(in, out)``) get its
    transpose. ``modules`` restricts the edit to some target modules (default: all of the plan's).
    """

    def __init__(
        self, target: LoadedModel, plan: ConjugationPlan, modules: Optional[Sequence[str]] = None
    ) -> None:
        if plan.target_label != target.label:
            raise GraftError(f"the plan was made for {plan.target_label}, not {target.label}")
        tmods = {m.name: m for m in target.arch.linear_modules()}
        names = plan.target_modules()
        if modules is not None:
            wanted = list(dict.fromkeys(m.strip() for m in modules if m and m.strip()))
            unknown = [m for m in wanted if m not in names]
            if unknown:
                raise GraftError(f"module {unknown[0]} receives no update in this plan")
            names = wanted
        if not names:
            raise GraftError("nothing to conjugate: the plan has no conjugated module")
        self.target = target
        self.plan = plan
        self.modules: tuple[str, ...] = tuple(names)
        self.linear: dict[str, LinearModule] = {n: tmods[n] for n in names}
        self.sources: dict[str, list[ModulePlan]] = {n: [] for n in names}
        for mp in plan.conjugated:
            if mp.target_name in self.sources:
                self.sources[mp.target_name].append(mp)  # type: ignore[index]
        for n, lm in self.linear.items():
            out_t, in_t = lm.shape
            for mp in self.sources[n]:
                if mp.B is None or mp.A is None or mp.B.shape[0] != out_t or mp.A.shape[1] != in_t:
                    raise GraftError(
                        f"the plan's update for {n} does not fit the target's ({out_t}, {in_t}) weight"
                    )
        self._working: Optional[nn.Module] = None
        self._saved: dict[str, torch.Tensor] = {}  # module -> original weight (the cached target's tensor)
        self._hash_before: Optional[str] = None
        self._check_not_tied()

    def _weight(self, root_is_target: bool, name: str) -> torch.Tensor:
        path = self.linear[name].path
        return (self.target.arch.module(path) if root_is_target else self.working.get_submodule(path)).weight

    def _check_not_tied(self) -> None:
        counts: dict[int, int] = {}
        for _, p in self.target.model.named_parameters(remove_duplicate=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
        for n in self.modules:
            if counts.get(id(self._weight(True, n)), 0) > 1:
                raise GraftError(f"cannot conjugate into {n}: its weight is tied to another parameter")

    @property
    def applied(self) -> tuple[str, ...]:
        return tuple(m for m in self.modules if m in self._saved)

    @property
    def touched_bytes(self) -> int:
        return sum(self._weight(True, n).nbytes for n in self.modules)

    @property
    def swapped_bytes(self) -> int:
        """Bytes of the weights this edit holds copies of (the name the live-transplant view reads)."""
        return self.touched_bytes

    def materialise(self) -> nn.Module:
        """The working model (idempotent); extra memory = :attr:`touched_bytes`."""
        if self._working is None:
            self._working = working_copy(self.target, [self._weight(True, n) for n in self.modules])
            for n in self.modules:
                if self._weight(False, n).data_ptr() == self._weight(True, n).data_ptr():  # pragma: no cover
                    raise GraftError(f"internal: {n} still shares storage with the cached target")
        return self._working

    def delta(self, name: str) -> torch.Tensor:
        """The summed update of one target module, ``(out, in)`` float64 on the CPU."""
        out = None
        for mp in self.sources[name]:
            d = mp.B.double() @ mp.A.double()  # type: ignore[union-attr]
            out = d if out is None else out + d
        assert out is not None
        return out

    @torch.no_grad()
    def apply(self, modules: Optional[Sequence[str]] = None) -> tuple[str, ...]:
        """Add the update to ``modules`` (default all); already applied ones are left alone."""
        self.materialise()
        chosen = self.modules if modules is None else tuple(modules)
        unknown = [m for m in chosen if m not in self.linear]
        if unknown:
            raise GraftError(f"module {unknown[0]} is not part of this conjugation")
        done = []
        for n in chosen:
            if n in self._saved:
                continue
            dst = self._weight(False, n)
            orig = self._weight(True, n)
            dW = self.delta(n).to(dst.device)
            if self.linear[n].conv1d:
                dW = dW.T
            new = (orig.double() + dW).to(dst.dtype)
            if not torch.isfinite(new).all():
                raise GraftError(f"the conjugated update makes {n} non-finite")
            self._saved[n] = orig
            dst.copy_(new)
            done.append(n)
        return tuple(done)

    @torch.no_grad()
    def rollback(self) -> int:
        """Restore every touched weight, bit-exactly. Returns how many."""
        if self._working is None:
            return 0
        n = 0
        for name in list(self._saved):
            self._weight(False, name).copy_(self._saved.pop(name))
            n += 1
        return n

    def report(self) -> dict[str, Any]:
        return {
            "target_modules": [
                {
                    "name": n,
                    "sources": [mp.name for mp in self.sources[n]],
                    "rank": sum(int(mp.B.shape[1]) for mp in self.sources[n]),
                }  # type: ignore[union-attr]
                for n in self.modules
            ],
            "applied": list(self.applied),
            "n_tensors": len(self.modules),
            "touched_bytes": self.touched_bytes,
            "weight_hash_before": self.hash_before(),
        }

    def card(self, **extra: Any) -> dict[str, Any]:
        """A ``surgery.json`` card (:func:`engine.surgery.transplant.save_transplant` adds the saved hash)."""
        return {
            "operation": OPERATION,
            "base": self.plan.base_label,
            "target": self.target.spec.ref,
            "target_modules": list(self.applied or self.modules),
            "weight_hash_before": self.hash_before(),
            "weight_hash_after": self.weight_hash() if self._working is not None else None,
            "plan": {k: v for k, v in self.plan.report().items() if k != "seconds"},
            **extra,
        }

    def save(self, out_dir: str, **card: Any) -> str:
        """Save the working copy (with what is applied now) as a Hugging Face folder + surgery.json."""
        return str(save_transplant(self.materialise(), self.target.tokenizer, out_dir, self.card(**card)))


def apply_and_check(
    conj: Conjugation,
    retained_texts: Sequence[str],
    *,
    max_ppl_increase: Optional[float] = 0.05,
    min_locality: Optional[float] = None,
    max_new_tokens: int = 16,
    prompt_tokens: int = 16,
    batch_size: int = 8,
    progress: ProgressLike = None,
) -> dict[str, Any]:
    """Apply ``conj``, run the interference check (T12) of T' against T on ``retained_texts`` and
    roll back automatically when :func:`engine.evaluation.interference.should_roll_back` says so.

    Returns ``{interference, rolled_back, roll_back_reason, weight_hash_before, weight_hash_after,
    rollback_bit_exact (None unless rolled back), target_untouched}``."""
    from ..evaluation.interference import interference, should_roll_back

    progress = as_progress(progress)
    h0 = conj.hash_before()
    progress(0.0, "adding the conjugated update to the working copy")
    conj.apply()
    h1 = conj.weight_hash()
    with conj.target.lock:  # the cached target is evaluated: no capture may hook it meanwhile
        rep = interference(
            conj.target.model,
            conj.working,
            conj.target.tokenizer,
            retained_texts,
            max_new_tokens=max_new_tokens,
            prompt_tokens=prompt_tokens,
            batch_size=batch_size,
            progress=progress.sub(0.05, 0.95),
        )
    roll, why = should_roll_back(rep, max_ppl_increase, min_locality=min_locality)
    exact = None
    if roll:
        progress(0.96, "rolling back: " + why)
        conj.rollback()
        exact = conj.weight_hash() == h0 and conj.verify_rollback()
    progress(1.0, "interference checked")
    return {
        "interference": rep,
        "rolled_back": roll,
        "roll_back_reason": why,
        "weight_hash_before": h0,
        "weight_hash_after": h1,
        "rollback_bit_exact": exact,
        "target_untouched": conj.target.state_hash() == h0,
    }
