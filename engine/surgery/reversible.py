"""What the reversible edits share (:class:`engine.surgery.transplant.ModuleSwap`,
:class:`engine.surgery.conjugate.Conjugation`, :class:`engine.surgery.organ_surgery.OrganInsertion`).

Each edits a *working copy* of a cached target (:func:`working_copy`: a structural copy that shares
every tensor of the target except the touched ones), never the target itself. :class:`ReversibleEdit`
holds the checks they have in common: the target's weight hash before the edit, the working copy's
hash now, a tensor-by-tensor comparison with the target after a rollback, and the extra memory the
working copy holds (:func:`extra_storage_bytes`).
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Optional

import torch
from torch import nn

from ..core.errors import GraftError
from ..loading.models import LoadedModel, state_dict_hash


def _module_tensors(model: nn.Module) -> Iterable[torch.Tensor]:
    """Every parameter, buffer and plain tensor attribute of every submodule (with repeats)."""
    for mod in model.modules():
        for v in vars(mod).values():
            if isinstance(v, torch.Tensor):
                yield v
        yield from mod._parameters.values()
        yield from mod._buffers.values()


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def extra_storage_bytes(model: nn.Module, reference: nn.Module) -> int:
    """Bytes of the distinct storages held by ``model`` that ``reference`` does not hold."""
    shared = {_storage_key(t) for t in _module_tensors(reference) if t is not None}
    seen: set[tuple[str, int]] = set()
    total = 0
    for t in _module_tensors(model):
        if t is None:
            continue
        key = _storage_key(t)
        if key in shared or key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def working_copy(target: LoadedModel, touched: Iterable[torch.Tensor]) -> nn.Module:
    """A structural copy of ``target.model`` sharing every tensor except ``touched``, which get new
    storage holding the target's values (the mechanism of
    :meth:`engine.surgery.transplant.ModuleSwap.materialise`)."""
    ids = {id(t) for t in touched}
    # inference_mode(False): new tensors made under inference mode could not be written later.
    with target.lock, torch.inference_mode(False):  # a capture holds the lock while its hooks are attached
        memo: dict[int, Any] = {
            id(t): t for t in _module_tensors(target.model) if t is not None and id(t) not in ids
        }
        working = copy.deepcopy(target.model, memo)
    working.eval()
    return working


class ReversibleEdit:
    """Base of an edit made on a working copy of ``self.target``.

    A subclass sets ``self.target`` (a :class:`LoadedModel`), ``self._working = None`` and
    ``self._hash_before = None`` in its constructor, builds ``self._working`` in ``materialise()``
    and restores it in ``rollback()``.
    """

    target: LoadedModel
    _working: Optional[nn.Module]
    _hash_before: Optional[str]

    @property
    def working(self) -> nn.Module:
        if self._working is None:
            raise GraftError("internal: call materialise() before using the working model")
        return self._working

    def hash_before(self) -> str:
        """Weight hash of the target (= of the working copy with nothing applied)."""
        if self._hash_before is None:
            self._hash_before = self.target.state_hash()
        return self._hash_before

    def weight_hash(self) -> str:
        """Weight hash of the working copy as it computes now (submodules it gained included)."""
        return state_dict_hash(self.working.state_dict())

    def verify_rollback(self) -> bool:
        """True when the working copy equals the cached target tensor by tensor (``torch.equal``)."""
        a, b = self.working.state_dict(), self.target.model.state_dict()
        if a.keys() != b.keys():
            return False
        return all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)

    def matches_target(self) -> bool:
        """True when the working copy is the target again (after a rollback): the same weight hash
        and, tensor by tensor, the same values."""
        return self.weight_hash() == self.hash_before() and self.verify_rollback()

    def extra_bytes(self) -> int:
        """Bytes the working copy holds beyond the cached target."""
        return extra_storage_bytes(self.working, self.target.model)
