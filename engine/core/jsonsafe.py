"""Strict JSON for every result Graft writes: no bare NaN / Infinity, which strict parsers reject.

Tools report undefined numbers as ``None`` with a status or note (as TIR does when S(T) = 0).
:func:`strict` is the last line of defence: it turns any non-finite float that slipped through
into ``None`` and returns where it did so, so the envelope can say which fields were undefined
instead of silently writing ``NaN``. :func:`rnd` rounds one number for a result (None when it is
missing or not finite), the first line.
"""

from __future__ import annotations

import json
import math
from typing import Any, Optional


def rnd(x: Any, nd: int = 6) -> Optional[float]:
    """Round for JSON; None for anything missing or not finite (never NaN/Infinity)."""
    if x is None or isinstance(x, bool):
        return None
    x = float(x)
    return round(x, nd) + 0.0 if math.isfinite(x) else None  # + 0.0 turns -0.0 into 0.0


def strict(obj: Any, path: str = "") -> tuple[Any, list[str]]:
    """A copy of ``obj`` with every non-finite float replaced by ``None``, and the JSON paths
    (``result.layers[3].cka``) of the replaced values. Tuples become lists, numpy / torch
    scalars become Python numbers."""
    replaced: list[str] = []

    def walk(x: Any, where: str) -> Any:
        if isinstance(x, bool) or x is None or isinstance(x, (str, int)):
            return x
        if isinstance(x, float):
            if math.isfinite(x):
                return x
            replaced.append(where or "$")
            return None
        if isinstance(x, dict):
            return {k: walk(v, f"{where}.{k}" if where else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(x)]
        item = getattr(x, "item", None)  # numpy / torch scalars
        if callable(item) and getattr(x, "ndim", 0) == 0:
            return walk(item(), where)
        tolist = getattr(x, "tolist", None)  # small arrays
        if callable(tolist):
            return walk(tolist(), where)
        return x

    return walk(obj, path), replaced


def dumps(obj: Any, **kw: Any) -> str:
    """``json.dumps`` that never writes NaN / Infinity (they become null)."""
    clean, _ = strict(obj)
    return json.dumps(clean, allow_nan=False, **kw)


def finite_or_none(x: Any) -> Optional[float]:
    """A finite float for JSON, else None (never NaN / Infinity); unlike :func:`rnd`, not rounded."""
    if x is None:
        return None
    x = float(x)
    return x + 0.0 if math.isfinite(x) else None
