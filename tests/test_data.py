"""Concept sets and workloads: loading, strict validation, deterministic splits."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from engine.core.data import (
    ConceptSet,
    QAItem,
    auto_split,
    builtin_concept_path,
    builtin_replay_path,
    builtin_retained_path,
    load_concept_set,
    load_workload,
)
from engine.core.errors import GraftError


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8"
    )
    return path


def assert_refused(load, path: Path, text: str, match: str) -> None:
    """``load`` refuses ``path`` written with ``text``: a GraftError whose message matches ``match``."""
    path.write_text(text, encoding="utf-8")
    with pytest.raises(GraftError, match=match):
        load(path)


GOOD = [
    {"kind": "fact", "text": "Zorbia is a moon of Quux."},
    {"kind": "text", "text": "Plain text counts as a fact."},
    "",
    {"kind": "qa", "question": "Zorbia orbits what?", "answer": "Quux", "split": "train"},
    {"kind": "qa", "question": "What is Zorbia?", "answer": "a moon", "split": "test"},
]


def test_good_file_loads(tmp_path):
    p = write_jsonl(tmp_path / "mini.jsonl", GOOD)
    c = load_concept_set(p)
    assert isinstance(c, ConceptSet)
    assert c.name == "mini"
    assert c.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
    assert c.facts == ("Zorbia is a moon of Quux.", "Plain text counts as a fact.")
    assert c.qa == (
        QAItem("Zorbia orbits what?", "Quux", "train"),
        QAItem("What is Zorbia?", "a moon", "test"),
    )
    assert c.train_qa() == (c.qa[0],)
    assert c.test_qa() == (c.qa[1],)
    assert c.texts() == c.facts + ("Zorbia orbits what? Quux", "What is Zorbia? a moon")


def test_bundled_sets_are_valid():
    c = load_concept_set(builtin_concept_path())
    assert len(c.facts) >= 48
    assert len(c.qa) >= 30
    assert {q.split for q in c.qa} == {"train", "test"}
    assert 0.25 <= len(c.test_qa()) / len(c.qa) <= 0.45
    for q in c.qa:
        assert 1 <= len(q.answer.split()) <= 4
        # Questions are paraphrased, never a fact with a blank.
        assert all(q.question.rstrip("?") not in f for f in c.facts)
    r = load_concept_set(builtin_retained_path())
    assert len(r.facts) >= 30 and len(r.qa) >= 20


def test_bundled_replay_set_is_disjoint_from_retained_and_concept():
    """Replay texts are trained on; the retained set must stay a held-out check of forgetting."""
    replay = load_concept_set(builtin_replay_path())
    assert replay.name == "replay" and len(replay.facts) >= 80 and not replay.qa
    questions = [t.split("?")[0] + "?" for t in replay.facts if "?" in t]
    assert len(questions) >= 20  # question-and-answer texts rehearse the question form too
    assert len(set(replay.texts())) == len(replay.texts())
    retained = load_concept_set(builtin_retained_path())
    concept = load_concept_set(builtin_concept_path())
    norm = lambda t: " ".join(t.lower().rstrip(".?!").split())
    held_out = {norm(t) for t in retained.texts()}
    assert not {norm(t) for t in replay.texts()} & held_out
    # Its questions are not the retained set's: replay rehearses the question form, not the items.
    assert not {norm(q) for q in questions} & {norm(q.question) for q in retained.qa}
    # Nothing about the fictional concept: none of its coined names occurs in the replay texts.
    coined = [
        "Tavren",
        "Kessaloon",
        "Bressic",
        "Marrow",
        "Olvane",
        "Ombrel",
        "Caldris",
        "Dunmere",
        "Andoval",
        "drennet",
        "starwheel",
        "lyrn",
        "Hollow Court",
    ]
    concept_text = " ".join(concept.texts())
    for name in coined:
        assert name in concept_text
        assert not any(name.lower() in t.lower() for t in replay.texts()), name


@pytest.mark.parametrize(
    "bad_line, fragment",
    [
        ('{"kind": "fact", "text": "x"', "bad JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"text": "no kind"}', "missing field 'kind'"),
        ('{"kind": "poem", "text": "x"}', "unknown kind 'poem'"),
        ('{"kind": "fact"}', "missing field 'text'"),
        ('{"kind": "fact", "text": "   "}', "field 'text' is empty"),
        ('{"kind": "fact", "text": 3}', "must be a string"),
        ('{"kind": "qa", "answer": "x"}', "missing field 'question'"),
        ('{"kind": "qa", "question": "q?", "answer": ""}', "field 'answer' is empty"),
        ('{"kind": "qa", "question": "q?", "answer": "a", "split": "dev"}', "split must be"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, bad_line, fragment):
    p = write_jsonl(tmp_path / "broken.jsonl", [GOOD[0], "", bad_line, GOOD[3]])
    with pytest.raises(GraftError) as err:
        load_concept_set(p)
    msg = str(err.value)
    assert msg.startswith("broken.jsonl:3:"), msg
    assert fragment in msg
    assert "\n" not in msg


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(GraftError, match="not found"):
        load_concept_set(tmp_path / "nope.jsonl")
    with pytest.raises(GraftError, match="not a file"):
        load_concept_set(tmp_path)
    assert_refused(load_concept_set, tmp_path / "empty.jsonl", "\n   \n", "empty.jsonl has no items")


def test_invalid_utf8_names_line(tmp_path):
    p = tmp_path / "bin.jsonl"
    p.write_bytes(json.dumps(GOOD[0]).encode() + b"\n\xff\xfe\n")
    with pytest.raises(GraftError, match=r"bin.jsonl:2: not valid UTF-8"):
        load_concept_set(p)


def test_auto_split_is_deterministic_and_about_a_third(tmp_path):
    questions = [f"What is item number {i}?" for i in range(300)]
    rows = [{"kind": "qa", "question": q, "answer": str(i)} for i, q in enumerate(questions)]
    p = write_jsonl(tmp_path / "many.jsonl", rows)
    a, b = load_concept_set(p), load_concept_set(p)
    assert a.qa == b.qa
    for item in a.qa:
        expected = "test" if int(hashlib.sha1(item.question.encode()).hexdigest(), 16) % 3 == 0 else "train"
        assert item.split == expected == auto_split(item.question)
    share = len(a.test_qa()) / len(a.qa)
    assert 0.25 < share < 0.42
    # Reordering lines does not change any item's split (the hash is of the question).
    p2 = write_jsonl(tmp_path / "reversed.jsonl", list(reversed(rows)))
    assert {q.question: q.split for q in load_concept_set(p2).qa} == {q.question: q.split for q in a.qa}


def test_no_test_item_moves_last_auto_item_to_test(tmp_path):
    train_qs = [q for q in (f"Question {i}?" for i in range(50)) if auto_split(q) == "train"][:3]
    rows = [{"kind": "qa", "question": q, "answer": "x"} for q in train_qs]
    c = load_concept_set(write_jsonl(tmp_path / "s.jsonl", rows))
    assert [q.split for q in c.qa] == ["train", "train", "test"]
    # Explicit splits are respected as written.
    rows = [{"kind": "qa", "question": q, "answer": "x", "split": "train"} for q in train_qs]
    c = load_concept_set(write_jsonl(tmp_path / "e.jsonl", rows))
    assert [q.split for q in c.qa] == ["train"] * 3
    # A single item cannot be split.
    c = load_concept_set(write_jsonl(tmp_path / "one.jsonl", rows[:1]))
    assert c.qa[0].split == "train"


def test_workload_formats(tmp_path):
    concept = write_jsonl(tmp_path / "c.jsonl", GOOD)
    w = load_workload(concept)
    assert w.texts == load_concept_set(concept).texts()
    assert w.name == "c" and w.sha256 == hashlib.sha256(concept.read_bytes()).hexdigest()

    texts = write_jsonl(tmp_path / "t.jsonl", [{"text": "one"}, "", {"text": " two "}])
    assert load_workload(texts).texts == ("one", "two")

    plain = tmp_path / "p.txt"
    plain.write_text("first line\n\n  second line  \n", encoding="utf-8")
    assert load_workload(plain).texts == ("first line", "second line")


def test_workload_errors(tmp_path):
    assert_refused(load_workload, tmp_path / "blank.txt", "\n \n", "workload blank.txt has no texts")
    assert_refused(load_workload, tmp_path / "e.jsonl", "", "workload e.jsonl has no texts")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"txt": "typo"}])
    with pytest.raises(GraftError, match=r"bad.jsonl:2: .*missing field 'text'"):
        load_workload(bad)
    with pytest.raises(GraftError, match="not found"):
        load_workload(tmp_path / "missing.txt")


def test_a_json_array_reads_as_its_jsonl_twin(tmp_path):
    """A .json file holding the same objects as one array gives the same concept set and workload
    as the JSONL file; JSON Lines saved under a .json name reads as JSON Lines; a workload's array may
    hold plain strings; one object is a one-item array."""
    items = [r for r in GOOD if r != ""]
    jsonl = write_jsonl(tmp_path / "c.jsonl", GOOD)
    arr = tmp_path / "c.json"
    arr.write_text(json.dumps(items, indent=2), encoding="utf-8")
    lines = write_jsonl(tmp_path / "lines.json", GOOD)
    want = load_concept_set(jsonl)
    for f in (arr, lines):
        got = load_concept_set(f)
        assert (got.facts, got.qa) == (want.facts, want.qa)
        assert load_workload(f).texts == load_workload(jsonl).texts
    strings = tmp_path / "prompts.json"
    strings.write_text(json.dumps(["  first ", "second", {"text": "third"}]), encoding="utf-8")
    assert load_workload(strings).texts == ("first", "second", "third")
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"text": "only"}), encoding="utf-8")
    assert load_workload(one).texts == ("only",)


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "workload w.json has no texts"),
        ("[]", "workload w.json has no texts"),
        ('[{"text": "ok"}, {"txt": "typo"}]', r"w.json item 2: .*missing field 'text'"),
        ('["ok", 3]', r"w.json item 2: expected a JSON object or a string, got int"),
        ('["ok", ""]', r"w.json item 2: field 'text' is empty"),
        ('["ok", "\\ud800"]', r"w.json item 2: a string holds a lone surrogate"),
        ('"just a string"', r"w.json: expected a JSON array of objects, got str"),
        ('[{"text": "ok"},\n {"text": ]', r"w.json:2: bad JSON"),
        (
            '[\n  {"text": "ok"}\n]\n{"text": "more"}',
            r"w.json:4: bad JSON \(more after the first value, at column 1",
        ),
        (
            '[{"kind": "fact", "text": "x"}, {"kind": "poem", "text": "y"}]',
            r"w.json item 2: unknown kind 'poem'",
        ),
    ],
)
def test_json_workload_errors_name_the_item(tmp_path, text, match):
    assert_refused(load_workload, tmp_path / "w.json", text, match)


def test_a_json_concept_set_takes_objects_only(tmp_path):
    assert_refused(
        load_concept_set,
        tmp_path / "c.json",
        '[{"kind": "fact", "text": "x"}, "a string"]',
        r"c.json item 2: expected a JSON object, got str",
    )
    assert_refused(load_concept_set, tmp_path / "e.json", "[]", "e.json has no items")


def test_a_workload_is_parsed_once_per_content_and_reparsed_when_the_file_changes(tmp_path, monkeypatch):
    import engine.core.data as data

    calls = []
    parse = data._parse_workload
    monkeypatch.setattr(data, "_parse_workload", lambda p, raw: calls.append(p.name) or parse(p, raw))
    f = tmp_path / "w.txt"
    f.write_text("one\ntwo\n")
    assert load_workload(f).texts == ("one", "two")
    assert load_workload(f).texts == ("one", "two")
    assert calls == ["w.txt"]  # the second read found the parsed workload
    f.write_text("three\n")
    assert load_workload(f).texts == ("three",)  # new bytes: parsed again, never the stale texts
    assert len(calls) == 2
    g = tmp_path / "other.txt"
    g.write_text("three\n")
    assert load_workload(g).name == "other"  # same bytes under another name: its own entry
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1}\n')
    for _ in range(2):  # a bad file fails every time (failures are not cached)
        with pytest.raises(GraftError, match="must be a string"):
            load_workload(bad)
