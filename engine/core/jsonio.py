"""One reader for every JSON file a user brings (model configs, adapter configs, organ, surgery and
donor cards, concept sets in .json): a size cap, a nesting-depth cap, finite numbers only, and one
named line (:class:`~engine.core.errors.GraftError`) for every way a file can be wrong.

Python's ``json`` module recurses once per nesting level, so a file nested 100,000 arrays deep ends
in an internal ``RecursionError``; the depth is checked on the raw text first, in one linear scan
that skips strings. ``1e999`` parses to ``inf``: such a number is refused by name, as is NaN."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Union

from .errors import GraftError

MAX_BYTES = 64 << 20  # 64 MiB: far above any config or card; a tokenizer.json is read by tokenizers itself
MAX_DEPTH = 64


def nesting_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in a JSON text (strings skipped, escapes honoured)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite(value: Any, where: str) -> None:
    stack = [(value, where)]
    while stack:
        v, at = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            raise GraftError(f"{at} holds a number too large for a float ({v}): every number must be finite")
        if isinstance(v, dict):
            stack += [(x, f"{at}.{k}") for k, x in v.items()]
        elif isinstance(v, list):
            stack += [(x, f"{at}[{i}]") for i, x in enumerate(v)]


def loads_checked(text: str, label: str, max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``text`` (from ``label``) with the depth and finiteness checks; GraftError on any problem."""
    depth = nesting_depth(text)
    if depth > max_depth:
        raise GraftError(
            f"{label} is nested {depth} levels deep: more than the {max_depth} a Graft file may use"
        )
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:
        raise GraftError(
            f"{label} is not valid JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    _finite(value, label)
    return value


def read_json_file(
    path: Union[str, Path], label: str = "", *, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH
) -> Any:
    """Read and parse one JSON file that a user brought, checked (see the module's docstring)."""
    path = Path(path)
    label = label or str(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise GraftError(
                f"{label} is {size:,} bytes: more than the {max_bytes:,} Graft reads from a JSON file"
            )
        raw = path.read_bytes()
    except OSError as e:
        raise GraftError(f"{label} cannot be read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise GraftError(f"{label} is not UTF-8 text (byte {e.start})") from None
    return loads_checked(text, label, max_depth)


def inside(folder: Union[str, Path], rel: Any, what: str) -> Path:
    """``folder / rel`` when ``rel`` (a path read from a card in ``folder``) is a plain relative path that
    resolves inside the folder, links followed; else GraftError naming the field and the path."""
    base = Path(folder).resolve()
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise GraftError(f"{what} in {folder} is not a file name ({rel!r})")
    target = (base / rel).resolve()
    if Path(rel).is_absolute() or (target != base and base not in target.parents):
        raise GraftError(f"{what} in {folder} points outside its folder ({rel}): refused")
    return target
