"""Transplants kept applied after a swap run, so the app can roll back or save them in one click.

The CLI's ``swap`` rolls back before it returns. The app instead hands its runs a
:class:`LiveTransplants`: the swap is verified (rolled back, checked bit-exact, hashed), applied
again, and kept here under an id that goes into the result. The working copy shares every tensor
with the cached target except the swapped ones, so a live transplant holds only the bytes of the
tensors it changed; at most ``capacity`` are kept and the oldest is rolled back and dropped first.

A run whose live transplant is gone (the server restarted, or it was evicted) can be rebuilt
from its result: :func:`rebuild` re-applies the recorded edit to the same models
(:func:`engine.running.rebuild.rebuild_transplant`), and checks that the weight hash equals the one the run
recorded before anything is saved from it.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from ..core.errors import GraftError
from ..loading.models import ModelStore
from ..surgery.transplant import ModuleSwap, save_transplant


@dataclass
class LiveTransplant:
    id: str
    swap: ModuleSwap
    card: dict[str, Any]  # surgery card of the run (operation, models, parameters, results, hashes)
    events: list[dict[str, Any]] = field(default_factory=list)
    # One operation at a time: a save (background job) must never see a half-done rollback.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def applied(self) -> bool:
        return bool(self.swap.applied)


class LiveTransplants:
    def __init__(self, capacity: int = 4) -> None:
        self.capacity = capacity
        self._items: "OrderedDict[str, LiveTransplant]" = OrderedDict()
        self._lock = threading.Lock()

    def keep(self, swap: ModuleSwap, card: dict[str, Any]) -> str:
        """Keep an applied transplant (a ModuleSwap, or anything with its apply / rollback /
        weight_hash / hash_before / verify_rollback / working / target, such as a conjugation or an
        organ insertion); returns its id. Evicts (rolls back) the oldest beyond capacity."""
        live = LiveTransplant(uuid.uuid4().hex[:12], swap, card)
        with self._lock:
            self._items[live.id] = live
            while len(self._items) > self.capacity:
                _, old = self._items.popitem(last=False)
                with old.lock:
                    old.swap.rollback()
        return live.id

    def keep_reapplied(self, swap: ModuleSwap, card: dict[str, Any]) -> str:
        """Apply a transplant again after its run rolled it back and verified it, and keep it
        (:meth:`keep`)."""
        swap.apply()  # the app keeps T' applied: roll back and save are then one click each
        return self.keep(swap, card)

    def get(self, live_id: Optional[str]) -> Optional[LiveTransplant]:
        if not live_id:
            return None
        with self._lock:
            return self._items.get(live_id)

    def rollback(self, live_id: str) -> dict[str, Any]:
        """Restore the target's values; reports the restored tensors and the bit-exact check."""
        live = self._need(live_id)
        with live.lock:
            n = live.swap.rollback()
            h = live.swap.weight_hash()
            exact = bool(h == live.swap.hash_before() and live.swap.verify_rollback())
        out = {"restored_tensors": n, "weight_hash": h, "bit_exact": exact, "applied": False}
        live.events.append({"event": "rollback", **out})
        return out

    def reapply(self, live_id: str) -> dict[str, Any]:
        live = self._need(live_id)
        with live.lock:
            return self._reapply_locked(live)

    def _reapply_locked(self, live: LiveTransplant) -> dict[str, Any]:
        live.swap.apply()
        h = live.swap.weight_hash()
        expected = (live.card.get("hashes") or {}).get("transplanted")
        out = {"weight_hash": h, "matches_run": expected is None or h == expected, "applied": True}
        live.events.append({"event": "apply", **out})
        return out

    def save(self, live_id: str, out_dir: Union[str, Path]) -> Path:
        """Save T' (applied) as a Hugging Face folder with surgery.json; re-applies if rolled back."""
        live = self._need(live_id)
        with live.lock:
            if not live.applied:
                self._reapply_locked(live)
            if hasattr(live.swap, "save_card"):  # an organ insertion saves its bridges beside the HF folder
                return live.swap.save_card(out_dir, live.card)
            return save_transplant(live.swap.working, live.swap.target.tokenizer, out_dir, live.card)

    def drop(self, live_id: str) -> None:
        with self._lock:
            live = self._items.pop(live_id, None)
        if live is not None:
            with live.lock:
                live.swap.rollback()

    def drop_model(self, model: Any) -> None:
        """Drop the transplants made on ``model`` (a LoadedModel the store evicted): each held the
        evicted model alive with it, a whole second copy once the model is loaded again. Their
        runs can be rebuilt."""
        with self._lock:
            ids = [i for i, live in self._items.items() if getattr(live.swap, "target", None) is model]
        for i in ids:
            self.drop(i)

    def _need(self, live_id: str) -> LiveTransplant:
        live = self.get(live_id)
        if live is None:
            raise GraftError(
                "this transplant is no longer held in memory (the server restarted or it was evicted); "
                "rebuild it from the run first"
            )
        return live


def rebuild(envelope: dict[str, Any], store: ModelStore, live: LiveTransplants) -> str:
    """Re-apply a finished transplant run's edit to the same models and keep it live; returns the
    live id. The rebuild itself (and its hash checks) is :func:`engine.running.rebuild.rebuild_transplant`."""
    from .rebuild import rebuild_transplant

    rebuilt = rebuild_transplant(envelope, store)
    return live.keep(rebuilt.edit, (envelope.get("result") or {}).get("card") or {})


LIVE = LiveTransplants()
