"""What a tool's compute function receives (:class:`ToolContext`). The tools import this module;
:mod:`engine.running.runner` builds a context and runs a tool, so nothing here imports the registry."""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..core.data import Workload
from ..core.errors import GraftError
from ..core.params import RunOptions
from ..core.progress import Progress
from ..loading.models import LoadedModel, ModelStore
from ..measure.align import Aligned, align, drop_outliers
from ..measure.budget import MAX_TOKENS_PER_TEXT, per_text_limit
from ..measure.capture import Capture
from ..measure.capture_cache import DEFAULT_CACHE, CaptureCache
from ..measure.cka import choose_estimator, cka_matrix
from ..measure.linalg import compute_device, ieee_float32

MIN_CKA_ROWS = 3  # below this the centred rows span at most one direction: every CKA is 0 / 0 or 1


@dataclass
class ToolContext:
    """Donor, target, workload and run options for one tool run.

    ``aligned()`` and ``cka()`` are memoised on the captures so tools run on the same models
    and workload share one forward pass per model and one CKA matrix.
    """

    donor: Optional[LoadedModel]
    target: Optional[LoadedModel]
    workload: Optional[Workload]  # None for a tool that reads no texts (Tool.uses_workload False)
    options: RunOptions
    captures: CaptureCache = field(default_factory=lambda: DEFAULT_CACHE)
    meta: dict[str, Any] = field(default_factory=dict)
    # engine.running.live.LiveTransplants: the app keeps transplants applied (engine/running/live.py)
    live: Any = None
    base: Optional[LoadedModel] = None  # the model an adapter / a full fine-tune was trained from
    adapter: Optional[str] = None  # adapter as the user gave it (PEFT folder, make-donor folder, demo name)
    organ: Optional[str] = None  # organ checkpoint folder as the user gave it
    run: Optional[str] = None  # run id of a finished run in the history (the tool loads that run's models)
    store: Optional[ModelStore] = None  # where a tool loads further models from (a run's models)
    memo: dict[Any, Any] = field(default_factory=dict, repr=False)  # per-run results (lean statistics)
    tool: str = ""  # the registered tool's name (Ray workers rebuild the run from it: running/cells.py)

    def texts(self) -> list[str]:
        limit = per_text_limit([self.donor, self.target])
        unique = list(dict.fromkeys(self.workload.texts))
        if len(unique) < len(self.workload.texts):
            n_dup = len(self.workload.texts) - len(unique)
            self.meta["n_texts_duplicate"] = n_dup
            self._note(
                f"{n_dup} repeated workload text(s) were dropped: a copy adds no information, and copies "
                "on both "
                "sides of the fit / held-out split would make held-out scores look better than they are"
            )
        texts, cut = self.captures.budget(
            unique, [self.donor.tokenizer, self.target.tokenizer], self.options.max_tokens, limit
        )
        if cut:
            self.meta["n_texts_cut"] = len(cut)
            why = (
                "Graft's per-text cap"
                if limit == MAX_TOKENS_PER_TEXT
                else "the shorter model's context, less 2 positions for special tokens"
            )
            self._note(
                f"{len(cut)} workload text(s) were cut to their first {limit} tokens ({why}); "
                f"the longest had {max(c[1] for c in cut):,} tokens"
            )
        return texts

    def _note(self, note: str) -> None:
        notes = self.meta.setdefault("notes", [])
        if note not in notes:
            notes.append(note)

    def capture_pair(self, progress: Progress, modules: tuple[str, ...] = ()) -> tuple[Capture, Capture]:
        texts = self.texts()
        t0 = time.perf_counter()
        cd = self.captures.get(
            self.donor,
            texts,
            modules=modules,
            batch_size=self.options.batch_size,
            progress=progress.sub(0, 0.5),
        )
        ct = self.captures.get(
            self.target,
            texts,
            modules=modules,
            batch_size=self.options.batch_size,
            progress=progress.sub(0.5, 1),
        )
        self._add_seconds("capture_seconds", t0)
        self.meta["n_texts"] = len(texts)
        self.meta["n_tokens_donor"] = cd.n
        self.meta["n_tokens_target"] = ct.n
        return cd, ct

    def aligned(self, progress: Progress) -> Aligned:
        cd, ct = self.capture_pair(progress)
        key = ("aligned", id(ct), self.options.outlier_factor)
        hit = cd.derived.get(key)
        if hit is None or hit[0] is not ct:
            t0 = time.perf_counter()
            hit = (ct, drop_outliers(align(cd, ct), self.options.outlier_factor))
            cd.derived[key] = hit
            self._add_seconds("align_seconds", t0)
        al = hit[1]
        self.meta.update(al.summary())
        return al

    def lean(self) -> bool:
        """T2 and T3 run on the lean route (:mod:`engine.running.lean_stats`): ``--stats streamed``,
        or ``auto`` when the memory plan found every layer's rows too large for the budget."""
        stats = getattr(self.options, "stats", "rows")
        streamed = all(getattr(m, "streamed", False) for m in (self.donor, self.target))
        if stats == "streamed" and not streamed:
            raise GraftError(
                "--stats streamed needs both models streamed block by block (--stream on, model folders)"
            )
        if stats == "auto":
            return streamed and (self.meta.get("memory_plan") or {}).get("stats") == "streamed"
        return stats == "streamed"

    def lean_stats(self, progress: Progress) -> Any:
        """Row alignment, norms and minibatch Gram matrices of a streamed pair, once per run."""
        from .lean_stats import lean_stats

        hit = self.memo.get("lean")
        if hit is None:
            texts = self.texts()
            t0 = time.perf_counter()
            hit = lean_stats(
                self.donor,
                self.target,
                texts,
                batch_size=self.options.batch_size,
                outlier_factor=self.options.outlier_factor,
                progress=progress,
            )
            self._add_seconds("capture_seconds", t0)
            self.memo["lean"] = hit
            self.meta.update(
                n_texts=len(texts), n_tokens_donor=hit.n_tokens_donor, n_tokens_target=hit.n_tokens_target
            )
        self.meta.update(hit.summary())
        self.meta["stats"] = "streamed"
        return hit

    def cka(self, progress: Progress, include_embeddings: bool) -> torch.Tensor:
        """CKA matrix over donor x target layers (blocks, optionally with h_{-1} first)."""
        if self.lean():
            key = ("lean cka", include_embeddings)
            if key not in self.memo:
                ls = self.lean_stats(progress.sub(0, 0.9))
                if ls.ra.n < MIN_CKA_ROWS:
                    raise GraftError(f"too few aligned rows for CKA ({ls.ra.n}; at least {MIN_CKA_ROWS})")
                t0 = time.perf_counter()
                self.memo[key] = ls.cka(include_embeddings, progress.sub(0.9, 1.0))
                self._add_seconds("cka_seconds", t0)
            self.meta["cka_estimator"], self.meta["cka_form"] = "debiased", "minibatch"
            return self.memo[key]
        al = self.aligned(progress.sub(0, 0.7))
        cd, ct = self.capture_pair(progress.sub(0.7, 0.7))
        key = ("cka", id(ct), include_embeddings, self.options.outlier_factor)
        hit = cd.derived.get(key)
        if hit is None or hit[0] is not ct:
            if al.X.shape[1] < MIN_CKA_ROWS:  # centred columns of one row are all zero: CKA is 0 / 0
                raise GraftError(
                    f"too few aligned rows for CKA ({al.X.shape[1]}; at least {MIN_CKA_ROWS}): "
                    "use a larger workload or --max-tokens"
                )
            s = 0 if include_embeddings else 1
            t0 = time.perf_counter()
            rows, dev = device_rows(self, al)
            info: dict[str, Any] = {}
            estimator = choose_estimator(al.n, int(al.X.shape[2]), int(al.Y.shape[2]))
            with ieee_float32(dev):
                M = cka_matrix(rows.X[s:], rows.Y[s:], progress.sub(0.7, 1.0), estimator=estimator, info=info)
            hit = (ct, M.cpu(), info)
            cd.derived[key] = hit
            self._add_seconds("cka_seconds", t0)
        self.meta["cka_estimator"], self.meta["cka_form"] = hit[2]["estimator"], hit[2]["form"]
        return hit[1]

    def _add_seconds(self, key: str, t0: float) -> None:
        """Seconds spent on shared work (capture, row alignment, CKA), for bench/alignment.py."""
        self.meta[key] = self.meta.get(key, 0.0) + time.perf_counter() - t0


def linalg_device(ctx: "ToolContext", al: Aligned) -> torch.device:
    """Where T2-T4 compute on the aligned rows: the models' CUDA device when there is one and the rows
    fit (:func:`engine.measure.linalg.compute_device`), else the CPU. On CUDA the float64 products run on the
    GPU rather than on the host's cores, which the forward passes there would otherwise wait on."""
    cuda = [
        m.device
        for m in (getattr(ctx, "donor", None), getattr(ctx, "target", None))
        if m is not None and getattr(m, "device", None) is not None and m.device.type == "cuda"
    ]
    if not cuda:
        return torch.device("cpu")
    return compute_device(cuda[0], al.X.numel() * al.X.element_size() + al.Y.numel() * al.Y.element_size())


class _DeviceRows:
    """Aligned rows copied to a CUDA device, shared by CKA, T3 and T4 (each copied every layer on its
    own before). One copy is kept, the latest pair's, so nothing pins more than one pair's rows on
    the GPU; the next pair's copy replaces it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: Optional[tuple[weakref.ref, str]] = None
        self._rows: Optional[Aligned] = None

    def get(self, al: Aligned, dev: torch.device) -> Aligned:
        if al.X.device == torch.empty(0, device=dev).device:  # there already (captured there)
            return al
        if dev.type == "cpu":
            return Aligned(al.X.cpu(), al.Y.cpu(), al.group, al.mode, al.n_outliers)
        with self._lock:
            if self._key is not None and self._key[0]() is al and self._key[1] == str(dev):
                return self._rows
            self._key = self._rows = None  # freed before the next copy is made
            rows = Aligned(al.X.to(dev), al.Y.to(dev), al.group, al.mode, al.n_outliers)
            self._key, self._rows = (weakref.ref(al), str(dev)), rows
            return rows


DEVICE_ROWS = _DeviceRows()


def device_rows(ctx: "ToolContext", al: Aligned) -> tuple[Aligned, torch.device]:
    """``al`` where T2-T4 compute on it (:func:`linalg_device`), and that device."""
    dev = linalg_device(ctx, al)
    return DEVICE_ROWS.get(al, dev), dev
