"""Reversible transplants (docs/methods.md, "Transplant operations" 1: module swap).

A :class:`ModuleSwap` copies the weights (and biases) of chosen linear modules from the donor D
into a *working copy* of the target T. The cached target is shared by every page and job and is
never written:

* :meth:`ModuleSwap.materialise` builds the working model with ``copy.deepcopy`` and a memo that
  maps every parameter, buffer and tensor attribute of T to itself, so the copy shares all of
  T's tensors except the swapped ones, which are deep-copied into new storage. Extra memory =
  bytes of the swapped tensors (measured by :meth:`ModuleSwap.extra_bytes`).
* :meth:`ModuleSwap.apply` records the original value of each tensor it touches, then copies
  the donor's tensor in place. The original of a swapped tensor is, by construction, the value
  of the cached target's tensor (the working tensor was cloned from it, and the cached model is
  immutable), so the record is a reference to that tensor, not a second copy.
* :meth:`ModuleSwap.rollback` copies the recorded originals back: bit-exact (same dtype, plain
  ``copy_``), checked by :meth:`ModuleSwap.verify_rollback` (``torch.equal`` on every tensor)
  and by equal :func:`engine.loading.models.state_dict_hash`.

GPT-2 ``Conv1D`` weights are copied as stored (``(in, out)``); donor and target must store every
swapped tensor with exactly the same shape and layout, otherwise the swap is refused.

:func:`save_transplant` writes a Hugging Face folder plus a ``surgery.json`` card. TIR and Recovery
(docs/methods.md T8) are :func:`engine.evaluation.beforeafter.transfer_metrics`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from ..core.errors import GraftError
from ..core.paths import check_writable_parent, discard_staging, replace_dir, staging_dir
from ..loading.arch import LinearModule
from ..loading.model_folders import SURGERY_CARD
from ..loading.models import LoadedModel, state_dict_hash
from ..loading.tokens import same_tokenizer
from .reversible import ReversibleEdit, working_copy

SURGERY_FORMAT = "graft-surgery/1"
_TENSORS = ("weight", "bias")


# --------------------------------------------------------------------------------------------
# Which modules can be swapped


def check_swap_pair(donor: LoadedModel, target: LoadedModel) -> None:
    """Refuse, in one line, a pair whose modules cannot be compared token by token or swapped.

    Module ranking compares module outputs row by row, so both models must read the same tokens
    (same tokenizer); a swapped weight means the same thing only within one architecture family.
    """
    reasons = []
    if donor.arch.family != target.arch.family:
        reasons.append(
            f"families differ ({donor.label}: {donor.arch.family}, {target.label}: {target.arch.family})"
        )
    if not same_tokenizer(donor.tokenizer, target.tokenizer):
        reasons.append("tokenizers differ")
    if reasons:
        raise GraftError(
            "module ranking and swapping need donor and target of the same family with the same tokenizer: "
            + "; ".join(reasons)
        )


def _tensor_shapes(mod: nn.Module) -> dict[str, Optional[tuple[int, ...]]]:
    out: dict[str, Optional[tuple[int, ...]]] = {}
    for t in _TENSORS:
        v = getattr(mod, t, None)
        out[t] = tuple(v.shape) if isinstance(v, torch.Tensor) else None
    return out


def swap_mismatch(
    donor: LoadedModel, target: LoadedModel, dm: LinearModule, tm: LinearModule
) -> Optional[str]:
    """Why the donor module ``dm`` cannot replace the target module ``tm`` (None when it can)."""
    if dm.conv1d != tm.conv1d:
        return "stored differently (Conv1D vs Linear)"
    ds = _tensor_shapes(donor.arch.module(dm.path))
    ts = _tensor_shapes(target.arch.module(tm.path))
    if ds["weight"] != ts["weight"]:
        return f"weight shapes differ (donor {list(ds['weight'] or [])}, target {list(ts['weight'] or [])})"
    if (ds["bias"] is None) != (ts["bias"] is None):
        return "only one of them has a bias"
    if ds["bias"] != ts["bias"]:
        return f"bias shapes differ (donor {list(ds['bias'] or [])}, target {list(ts['bias'] or [])})"
    return None


def swappable_modules(
    donor: LoadedModel, target: LoadedModel
) -> tuple[list[LinearModule], list[dict[str, str]]]:
    """Target linear modules present in the donor with identical stored tensors, in block order,
    and the skipped ones with the reason."""
    dmods = {m.name: m for m in donor.arch.linear_modules()}
    ok: list[LinearModule] = []
    skipped: list[dict[str, str]] = []
    for tm in target.arch.linear_modules():
        dm = dmods.get(tm.name)
        if dm is None:
            skipped.append({"name": tm.name, "reason": "not in the donor"})
            continue
        why = swap_mismatch(donor, target, dm, tm)
        if why:
            skipped.append({"name": tm.name, "reason": why})
        else:
            ok.append(tm)
    tnames = {m.name for m in target.arch.linear_modules()}
    skipped += [{"name": n, "reason": "not in the target"} for n in dmods if n not in tnames]
    return ok, skipped


# --------------------------------------------------------------------------------------------
# Module swap


@dataclass(frozen=True)
class _Slot:
    module: str  # canonical module name, e.g. "blocks.3.attn.q"
    tensor: str  # "weight" | "bias"
    path: str  # HF dotted path of the owning nn.Module

    @property
    def key(self) -> str:
        return f"{self.module}.{self.tensor}"


class ModuleSwap(ReversibleEdit):
    """Copy chosen linear modules of ``donor`` into a working copy of ``target``, reversibly.

    ``modules`` are canonical names (``blocks.3.attn.q``). Validation happens here, before any
    copy: every module must exist in both models with identical stored weight (and bias) shapes.
    The cached ``target.model`` is never written; use :attr:`working` (after :meth:`materialise`).
    """

    def __init__(self, target: LoadedModel, donor: LoadedModel, modules: Sequence[str]) -> None:
        names = list(dict.fromkeys(m.strip() for m in modules if m and m.strip()))
        if not names:
            raise GraftError("no modules to swap")
        tmods = {m.name: m for m in target.arch.linear_modules()}
        dmods = {m.name: m for m in donor.arch.linear_modules()}
        slots: list[_Slot] = []
        for n in names:
            if n not in tmods:
                example = next(iter(tmods), "blocks.0.attn.o")
                raise GraftError(
                    f"module {n} is not a linear module of the target {target.label} (names look like "
                    f"{example})"
                )
            if n not in dmods:
                raise GraftError(f"module {n} is not a linear module of the donor {donor.label}")
            why = swap_mismatch(donor, target, dmods[n], tmods[n])
            if why:
                raise GraftError(f"cannot swap {n}: {why}")
            mod = target.arch.module(tmods[n].path)
            dmod = donor.arch.module(dmods[n].path)
            for t in _TENSORS:
                if isinstance(getattr(mod, t, None), torch.Tensor):
                    if getattr(mod, t).dtype != getattr(dmod, t).dtype:
                        raise GraftError(
                            f"cannot swap {n}: donor {t} is {getattr(dmod, t).dtype}, target "
                            f"{getattr(mod, t).dtype}; "
                            "load both models with the same dtype"
                        )
                    slots.append(_Slot(n, t, tmods[n].path))
        self.target = target
        self.donor = donor
        self.modules: tuple[str, ...] = tuple(names)
        self.linear: dict[str, LinearModule] = {n: tmods[n] for n in names}
        self._donor_paths = {n: dmods[n].path for n in names}
        self._slots = slots
        self._working: Optional[nn.Module] = None
        self._saved: dict[str, torch.Tensor] = {}  # slot key -> original value (see module docstring)
        self._hash_before: Optional[str] = None
        self._check_not_tied()

    # -- bookkeeping --------------------------------------------------------------------------
    def _check_not_tied(self) -> None:
        """A swapped tensor shared with another parameter (tied) would silently change that one too."""
        counts: dict[int, int] = {}
        for _, p in self.target.model.named_parameters(remove_duplicate=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
        for s in self._slots:
            t = getattr(self.target.arch.module(s.path), s.tensor)
            if counts.get(id(t), 0) > 1:
                raise GraftError(f"cannot swap {s.module}: its {s.tensor} is tied to another parameter")

    @property
    def swapped_bytes(self) -> int:
        """Bytes of the tensors a full :meth:`apply` replaces (weights and biases)."""
        return sum(getattr(self.target.arch.module(s.path), s.tensor).nbytes for s in self._slots)

    def tensor_names(self) -> list[tuple[str, str]]:
        """(target parameter name, donor parameter name) of every tensor a full :meth:`apply` copies:
        what a swap written from the files reads and writes (engine/running/stream_surgery.py)."""
        return [(f"{s.path}.{s.tensor}", f"{self._donor_paths[s.module]}.{s.tensor}") for s in self._slots]

    @property
    def n_tensors(self) -> int:
        return len(self._slots)

    @property
    def applied(self) -> tuple[str, ...]:
        """Modules whose donor weights are currently in the working copy (in swap order)."""
        done = {k.rsplit(".", 1)[0] for k in self._saved}
        return tuple(m for m in self.modules if m in done)

    # -- the operation --------------------------------------------------------------------------
    def materialise(self) -> nn.Module:
        """The working model: a structural copy of the target sharing every tensor except the
        swapped ones, which get new storage holding the target's values. Idempotent."""
        if self._working is not None:
            return self._working
        working = working_copy(
            self.target, [getattr(self.target.arch.module(s.path), s.tensor) for s in self._slots]
        )
        for s in self._slots:
            new = getattr(working.get_submodule(s.path), s.tensor)
            old = getattr(self.target.arch.module(s.path), s.tensor)
            if new.data_ptr() == old.data_ptr():  # pragma: no cover - deepcopy semantics guard
                raise GraftError(f"internal: {s.key} still shares storage with the cached target")
        self._working = working
        return working

    def apply(self, modules: Optional[Sequence[str]] = None) -> tuple[str, ...]:
        """Copy the donor's tensors of ``modules`` (default: all of this swap's modules) into the
        working copy; modules already applied are left as they are. Returns the modules applied now."""
        working = self.materialise()
        chosen = self.modules if modules is None else tuple(modules)
        unknown = [m for m in chosen if m not in self.linear]
        if unknown:
            raise GraftError(f"module {unknown[0]} is not part of this swap")
        chosen_set = set(chosen)
        done: list[str] = []
        with torch.no_grad():
            for s in self._slots:
                if s.module not in chosen_set or s.key in self._saved:
                    continue
                dst = getattr(working.get_submodule(s.path), s.tensor)
                src = getattr(self.donor.arch.module(self._donor_paths[s.module]), s.tensor)
                # The original value of dst is the cached target's tensor (dst was cloned from it
                # and only ever restored to it), so recording costs no memory.
                self._saved[s.key] = getattr(self.target.arch.module(s.path), s.tensor)
                dst.copy_(src)
                if s.module not in done:
                    done.append(s.module)
        return tuple(done)

    def rollback(self) -> int:
        """Restore every tensor touched since the last rollback, bit-exactly. Returns their number."""
        if self._working is None:
            return 0
        n = 0
        with torch.no_grad():
            for s in self._slots:
                orig = self._saved.pop(s.key, None)
                if orig is None:
                    continue
                getattr(self._working.get_submodule(s.path), s.tensor).copy_(orig)
                n += 1
        return n


# --------------------------------------------------------------------------------------------
# Saving


def check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise GraftError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / SURGERY_CARD).is_file():
        raise GraftError(
            f"refusing to write into {out}: the folder is not empty and is not a Graft transplant (no "
            f"{SURGERY_CARD})"
        )
    check_writable_parent(out)


def save_transplant(
    working_model: nn.Module, tokenizer: Any, out_dir: Union[str, Path], card: dict[str, Any]
) -> Path:
    """Write ``working_model`` as a Hugging Face folder (safetensors, config, tokenizer) plus
    ``surgery.json`` (``card`` + format, time and the saved weight hash).

    ``card`` should say the operation, donor, target, modules, parameters, measured results and
    hashes. The folder is written to a temporary sibling and renamed into place; an existing
    folder is replaced only if it is empty or is itself a Graft transplant (has ``surgery.json``),
    so user files are never destroyed.
    """
    out = Path(out_dir).expanduser()
    if not str(out_dir).strip():
        raise GraftError("no output folder given")
    out = out.resolve()
    check_out_dir(out)
    payload = {
        "format": SURGERY_FORMAT,
        **card,
        "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "saved_weight_hash": state_dict_hash(working_model.state_dict()),
    }
    try:
        text = json.dumps(payload, indent=2, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise GraftError(f"surgery card is not strict JSON: {e}") from None
    tmp = staging_dir(out)  # registered: a later start removes it if this process is killed
    try:
        working_model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / SURGERY_CARD).write_text(text)
        check_out_dir(out)  # again: the folder may have changed while we wrote
        replace_dir(tmp, out)
    finally:
        discard_staging(tmp)  # no-op once replace_dir moved it into place
    return out
