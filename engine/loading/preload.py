"""Load models in the background, so a page never waits for a model it only wants to show.

The app's sidebar asks for the chosen pair as soon as it is picked: :meth:`Preloader.request`
starts one daemon thread per model (at most one per model at a time) that loads it into the shared
:class:`~engine.loading.models.ModelStore`, and answers at once with the model's state. The store's per-key
lock makes a job that needs the same model meanwhile wait for this load instead of loading twice.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Optional

from ..core.errors import GraftError
from .models import ModelSpec, ModelStore, resolve_device

LOADED, LOADING, FAILED = "loaded", "loading", "failed"


@dataclass(frozen=True)
class LoadState:
    state: str  # LOADED, LOADING or FAILED
    message: str = ""  # the one-line error when FAILED
    seconds: float = 0.0  # how long the load has taken (so far)


class Preloader:
    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self._guard = threading.Lock()
        self._threads: dict[tuple, threading.Thread] = {}
        self._started: dict[tuple, float] = {}
        self._failed: dict[tuple, str] = {}

    def key(self, spec: ModelSpec, device: str, dtype: str) -> tuple:
        return (spec, str(resolve_device(device)), dtype)

    def state(self, spec: ModelSpec, device: str = "auto", dtype: str = "float32") -> Optional[LoadState]:
        """The model's state, or None when nobody asked for it and it is not in the store."""
        key = self.key(spec, device, dtype)
        if key in self.store.loaded():
            return LoadState(LOADED)
        with self._guard:
            if key in self._failed:
                return LoadState(FAILED, self._failed[key])
            if key in self._threads:
                return LoadState(LOADING, seconds=time.perf_counter() - self._started[key])
        return None

    def request(
        self, spec: ModelSpec, device: str = "auto", dtype: str = "float32", wait_s: float = 0.0
    ) -> LoadState:
        """Start loading the model unless it is loaded, loading or failed; wait up to ``wait_s``
        seconds for it (so that an instant load shows as loaded on the same run)."""
        key = self.key(spec, device, dtype)
        with self._guard:
            thread = self._threads.get(key)
            if thread is None and key not in self._failed and key not in self.store.loaded():
                thread = threading.Thread(
                    target=self._load, args=(key,), name=f"graft-preload-{spec.label}", daemon=True
                )
                self._threads[key] = thread
                self._started[key] = time.perf_counter()
                thread.start()
        if thread is not None and wait_s > 0:
            thread.join(wait_s)
        return self.state(spec, device, dtype) or LoadState(LOADED)

    def retry(self, spec: ModelSpec, device: str = "auto", dtype: str = "float32") -> None:
        """Forget a failed load, so the next request tries again."""
        with self._guard:
            self._failed.pop(self.key(spec, device, dtype), None)

    def _load(self, key: tuple) -> None:
        spec, device, dtype = key
        try:
            self.store.get(spec, device, dtype)
        except GraftError as exc:
            self._fail(key, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        except Exception as exc:  # a background load must never die silently
            self._fail(key, f"{type(exc).__name__}: {exc}".splitlines()[0])
        finally:
            with self._guard:
                self._threads.pop(key, None)
                self._started.pop(key, None)

    def _fail(self, key: tuple, message: str) -> None:
        with self._guard:
            self._failed[key] = message
