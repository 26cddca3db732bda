"""Concept sets, retained sets and workloads: loading and strict validation.

A **concept set** is a JSONL file, one object per line:

- ``{"kind": "fact", "text": "..."}``: a statement the donor should learn;
- ``{"kind": "text", "text": "..."}``: a plain text, treated exactly like a fact (lets a retained
  set of free text use the same format);
- ``{"kind": "qa", "question": "...", "answer": "...", "split": "train" | "test"}``: an
  evaluation item; ``split`` is optional.

Blank lines are skipped. Every error is a :class:`GraftError` whose one-line message names the
file and the line, so the user can fix the file without reading a traceback.

A **workload** is a list of texts for the diagnostics: a concept-set JSONL (its
:meth:`ConceptSet.texts`), a JSONL of ``{"text": ...}`` objects, or a plain-text file with one text
per non-empty line.

A ``.json`` file holds the same objects as one JSON array (``[{"kind": ...}, ...]``, or for a
workload also ``[{"text": ...}, ...]`` or ``["text", ...]``); one saved as JSON Lines under a
``.json`` name is read as JSON Lines. Errors then name the array item (``file.json item 3``) instead
of the line.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .errors import GraftError
from .jsonio import MAX_DEPTH, nesting_depth
from .paths import data_dir

PathLike = Union[str, Path]

SPLITS = ("train", "test")
KINDS = ("fact", "text", "qa")
# Suffixes read as JSON Lines, and as one JSON array (or JSON Lines); every other suffix is read
# as plain text, one text per line.
JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
# Share of QA items without an explicit split that go to "test" (hash bucket 0 of 3).
_TEST_BUCKETS = 3


@dataclass(frozen=True)
class QAItem:
    """A question with a short reference answer; ``split`` is ``"train"`` or ``"test"``."""

    question: str
    answer: str
    split: str


@dataclass(frozen=True)
class ConceptSet:
    """A validated concept (or retained) set; ``sha256`` is the hash of the file's bytes."""

    name: str
    path: str
    sha256: str
    facts: tuple[str, ...]
    qa: tuple[QAItem, ...]

    def texts(self) -> tuple[str, ...]:
        """Facts, then every QA item rendered as ``"question answer"``: the default workload."""
        return self.facts + tuple(f"{q.question} {q.answer}" for q in self.qa)

    def train_qa(self) -> tuple[QAItem, ...]:
        return tuple(q for q in self.qa if q.split == "train")

    def test_qa(self) -> tuple[QAItem, ...]:
        return tuple(q for q in self.qa if q.split == "test")


@dataclass(frozen=True)
class Workload:
    """A named list of texts; ``sha256`` is the hash of the source file's bytes."""

    name: str
    sha256: str
    texts: tuple[str, ...]


def builtin_concept_path() -> Path:
    """The bundled concept set (a fictional island no base model can know)."""
    return data_dir() / "concept_set.jsonl"


def builtin_retained_path() -> Path:
    """The bundled retained general-knowledge set."""
    return data_dir() / "retained.jsonl"


def builtin_replay_path() -> Path:
    """The bundled replay set: general everyday English mixed into donor training against
    forgetting. Disjoint from the retained set, which stays the held-out check of forgetting."""
    return data_dir() / "replay.jsonl"


def auto_split(question: str) -> str:
    """Deterministic split for an item without one: ``test`` iff ``sha1(question) mod 3 == 0``.

    Hashing the question (not its position) keeps an item's split stable when lines are added,
    removed or reordered.
    """
    h = int(hashlib.sha1(question.encode("utf-8")).hexdigest(), 16)
    return "test" if h % _TEST_BUCKETS == 0 else "train"


# --------------------------------------------------------------------------------------------
# File reading helpers


def texts_sha256(texts: Sequence[Any]) -> str:
    """A cache key of a list of texts (or of [question, answer] pairs): the hash of its JSON, so no
    text holding a separator collides with two texts, and lone surrogates are escaped, not fatal."""
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()


def _read_bytes(path: PathLike, what: str) -> tuple[Path, bytes]:
    p = Path(path).expanduser()
    if not os.path.exists(p):  # False, not OSError, for a name too long for the file system
        raise GraftError(f"{what} file not found: {p}")
    if not p.is_file():
        raise GraftError(f"{what} path is not a file: {p}")
    try:
        return p, p.read_bytes()
    except OSError as e:
        raise GraftError(f"cannot read {what} file {p}: {e.strerror or e}") from None


def _decode(p: Path, raw: bytes) -> str:
    try:
        # utf-8-sig: tolerate a byte-order mark written by some editors.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        # Report the line of the offending byte, not a byte offset.
        line = raw[: e.start].count(b"\n") + 1
        raise GraftError(f"{p.name}:{line}: not valid UTF-8 text") from None


Records = list[
    tuple[str, Any]
]  # (where, for messages: "file.jsonl:3" or "file.json item 3"; the parsed value)


def _text_only(where: str, value: Any) -> None:
    """A ``\\ud800`` escape parses to a lone surrogate, which is not text: no tokenizer takes it."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise GraftError(
            f"{where}: a string holds a lone surrogate (an unpaired \\ud800-\\udfff "
            "escape), which is not text"
        ) from None


def _json_lines(p: Path, text: str) -> Records:
    """Parse non-blank lines as JSON objects, located by 1-based line numbers. Lines end at "\n" (and
    "\r\n") only: U+2028, U+2029 and U+0085 may stand unescaped inside JSON strings (``json.dumps``
    with ``ensure_ascii=False`` writes them so), where ``str.splitlines`` would cut the line."""
    _not_too_deep(p, text)
    out: Records = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        where = f"{p.name}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise GraftError(f"{where}: bad JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise GraftError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        _text_only(where, obj)
        out.append((where, obj))
    return out


def _not_too_deep(p: Path, text: str) -> None:
    """Python's json recurses per nesting level: refuse a deeply nested file before parsing it."""
    depth = nesting_depth(text)
    if depth > MAX_DEPTH:
        raise GraftError(
            f"{p.name} is nested {depth} levels deep: more than the {MAX_DEPTH} a Graft file may use"
        )


def _json_items(p: Path, text: str, strings: bool = False) -> Records:
    """A ``.json`` file's items: one JSON array of objects (or of strings, with ``strings``), a
    single object, or, when the file is not one JSON value, JSON Lines."""
    if not text.strip():
        return []
    _not_too_deep(p, text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # more than one value: JSON Lines under a .json name, or one value and more
            try:
                return _json_lines(p, text)
            except GraftError:
                raise GraftError(
                    f"{p.name}:{e.lineno}: bad JSON (more after the first value, at column {e.colno}; "
                    "neither one JSON value nor JSON Lines)"
                ) from None
        raise GraftError(f"{p.name}:{e.lineno}: bad JSON ({e.msg} at column {e.colno})") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise GraftError(f"{p.name}: expected a JSON array of objects, got {type(value).__name__}")
    out: Records = []
    for k, item in enumerate(value, start=1):
        where = f"{p.name} item {k}"
        if not isinstance(item, dict) and not (strings and isinstance(item, str)):
            wanted = "a JSON object or a string" if strings else "a JSON object"
            raise GraftError(f"{where}: expected {wanted}, got {type(item).__name__}")
        _text_only(where, item)
        out.append((where, item))
    return out


def _records(p: Path, raw: bytes, strings: bool = False) -> Records:
    text = _decode(p, raw)
    return _json_items(p, text, strings) if p.suffix.lower() in JSON_SUFFIXES else _json_lines(p, text)


def _field(where: str, obj: dict[str, Any], key: str, kind: str) -> str:
    """A required non-empty string field, stripped."""
    if key not in obj:
        raise GraftError(f"{where}: {kind} item is missing field '{key}'")
    value = obj[key]
    if not isinstance(value, str):
        raise GraftError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    value = value.strip()
    if not value:
        raise GraftError(f"{where}: field '{key}' is empty")
    return value


def _sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


# --------------------------------------------------------------------------------------------
# Concept sets


def _parse_concept(p: Path, raw: bytes, records: Optional[Records] = None) -> ConceptSet:
    """A concept set from a file's bytes (``records``: its objects, when already parsed)."""
    records = records if records is not None else _records(p, raw)
    facts: list[str] = []
    # (question, answer, explicit split or None)
    pending: list[tuple[str, str, str | None]] = []
    for where, obj in records:
        if not isinstance(obj, dict):
            raise GraftError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if "kind" not in obj:
            raise GraftError(f"{where}: missing field 'kind' (one of {', '.join(KINDS)})")
        kind = obj["kind"]
        if kind not in KINDS:
            raise GraftError(f"{where}: unknown kind {kind!r} (expected one of {', '.join(KINDS)})")
        if kind in ("fact", "text"):
            facts.append(_field(where, obj, "text", kind))
            continue
        question = _field(where, obj, "question", kind)
        answer = _field(where, obj, "answer", kind)
        split = obj.get("split")
        if split is not None and split not in SPLITS:
            raise GraftError(f"{where}: split must be 'train' or 'test', got {split!r}")
        pending.append((question, answer, split))

    if not facts and not pending:
        raise GraftError(f"concept set {p.name} has no items")

    splits = [s if s is not None else auto_split(q) for q, _, s in pending]
    auto = [i for i, (_, _, s) in enumerate(pending) if s is None]
    # A set whose hashed split happens to put nothing in test would make held-out evaluation
    # impossible; move the last automatically split item there. Explicit splits are respected.
    if "test" not in splits and len(pending) >= 2 and auto:
        splits[auto[-1]] = "test"

    qa = tuple(QAItem(q, a, s) for (q, a, _), s in zip(pending, splits))
    return ConceptSet(name=p.stem, path=str(p.resolve()), sha256=_sha256(raw), facts=tuple(facts), qa=qa)


def load_concept_set(path: PathLike) -> ConceptSet:
    """Load and strictly validate a concept set: JSONL, or a ``.json`` array (see the module docstring)."""
    p, raw = _read_bytes(path, "concept set")
    return _parse_concept(p, raw)


# --------------------------------------------------------------------------------------------
# Workloads


def load_workload(path: PathLike) -> Workload:
    """Load a workload: concept-set JSONL, ``{"text": ...}`` JSONL, or plain text.

    A JSONL file in which any line has a ``kind`` field is read as a concept set (and validated
    as one); otherwise every line must be an object with a non-empty ``text`` string. A ``.json``
    file is the same as one array, whose items may also be plain strings. Files with any other
    suffix are plain text: one text per non-empty line, surrounding whitespace stripped.
    """
    p, raw = _read_bytes(path, "workload")
    key = (p.name, _sha256(raw))  # the file is read every time; parsed once per content and name
    with _WORKLOADS_LOCK:
        hit = _WORKLOADS.get(key)
    if hit is None:
        hit = _parse_workload(p, raw)
        if len(raw) <= _WORKLOAD_CACHE_BYTES:
            with _WORKLOADS_LOCK:
                _WORKLOADS[key] = hit
                while len(_WORKLOADS) > _WORKLOAD_CACHE:
                    _WORKLOADS.pop(next(iter(_WORKLOADS)))
    return hit


# Parsed workloads by (file name, sha256 of its bytes), the last 8 of at most 8 MiB each: every
# tool run reads its workload, and the four diagnostics of one pair read the same file four times
# (parsing the bundled concept set took 1-2 ms each time).
_WORKLOADS: dict[tuple[str, str], Workload] = {}
_WORKLOADS_LOCK = threading.Lock()
_WORKLOAD_CACHE = 8
_WORKLOAD_CACHE_BYTES = 8 * 2**20


def _parse_workload(p: Path, raw: bytes) -> Workload:
    if p.suffix.lower() in JSONL_SUFFIXES + JSON_SUFFIXES:
        records = _records(p, raw, strings=True)
        if any(isinstance(obj, dict) and "kind" in obj for _, obj in records):
            texts = _parse_concept(p, raw, records).texts()
        else:
            texts = tuple(
                _field(where, {"text": obj} if isinstance(obj, str) else obj, "text", "text")
                for where, obj in records
            )
    else:
        texts = tuple(line.strip() for line in _decode(p, raw).splitlines() if line.strip())
    if not texts:
        raise GraftError(f"workload {p.name} has no texts")
    return Workload(name=p.stem, sha256=_sha256(raw), texts=texts)


def resolve_workload(path: str) -> "Workload":
    """The workload a run reads: the file given, or the bundled concept set when none is."""
    return load_workload(path or str(builtin_concept_path()))
