"""Progress reporting and cooperative cancellation for long computations."""

from __future__ import annotations

import threading
from typing import Callable, Optional, Union

from .errors import Cancelled


class Progress:
    """Callable progress sink: ``progress(fraction, message)``.

    Every call is also a cancellation point: if the job was cancelled the call raises
    :class:`Cancelled`, so compute functions stop at the next checkpoint. ``sub(a, b)`` gives a
    child that maps its own 0..1 onto ``a..b`` of the parent, so nested steps compose.
    """

    def __init__(
        self,
        callback: Optional[Callable[[float, str], None]] = None,
        cancel_event: Optional[threading.Event] = None,
        start: float = 0.0,
        end: float = 1.0,
        state: Optional[dict[str, float]] = None,
    ) -> None:
        self._callback = callback
        self.cancel_event = cancel_event or threading.Event()
        self._start = start
        self._end = end
        self._state = state if state is not None else {"fraction": 0.0}  # shared with every sub()

    def __call__(self, fraction: float, message: str = "") -> None:
        self.check()
        f = min(max(float(fraction), 0.0), 1.0)
        at = self._start + (self._end - self._start) * f
        self._state["fraction"] = at
        if self._callback is not None:
            self._callback(at, message)

    def note(self, message: str) -> None:
        """A new message at the fraction last reported anywhere in this tree (for work whose share
        is not known, such as the blocks of a streamed pass inside an evaluation); also a
        cancellation point."""
        self.check()
        if self._callback is not None:
            self._callback(self._state["fraction"], message)

    def check(self) -> None:
        if self.cancel_event.is_set():
            raise Cancelled("cancelled by user")

    def sub(self, start: float, end: float) -> "Progress":
        span = self._end - self._start
        return Progress(
            self._callback,
            self.cancel_event,
            self._start + span * start,
            self._start + span * end,
            self._state,
        )

    def cancel(self) -> None:
        self.cancel_event.set()


def silent() -> Progress:
    """A progress sink that reports nowhere and is never cancelled."""
    return Progress()


ProgressLike = Union[Progress, Callable[[float, str], None], None]
"""What a compute function accepts as its progress argument."""


def as_progress(p: ProgressLike) -> Progress:
    """``p`` as a :class:`Progress`: a silent one for None, a wrapped callback for a plain function."""
    if p is None:
        return silent()
    if isinstance(p, Progress):
        return p
    return Progress(p)
