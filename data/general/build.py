"""Rebuild the general English corpus in this folder from its two public-domain sources.

Sources (Debian packages, which carry the texts as dictd databases):

* ``dict-devil`` 1.0: *The Devil's Dictionary* by Ambrose Bierce (1911). Public domain: "A Public
  Domain Text, Copyright Expired" (the package's copyright file).
* ``dict-jargon`` 4.4.7: *The Jargon File* 4.4.7 (Eric S. Raymond, ed., 29 Dec 2003). Public domain:
  "This document (the Jargon File) is in the public domain, to be freely used, shared, and modified."

Each dictionary entry becomes one text: ``Headword: definition``, whitespace collapsed, cross-reference
braces and pronunciation lines removed, cut at the last sentence end before 700 characters. Entries
under 12 words are dropped. The texts are shuffled with a fixed seed and split 150 test, 150
validation, the rest training. Usage (``apt-get download dict-devil dict-jargon`` first, then
``dpkg-deb -x`` each into one folder)::

    python data/general/build.py EXTRACTED_FOLDER
"""

from __future__ import annotations

import gzip
import json
import random
import re
import sys
from pathlib import Path

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
HERE = Path(__file__).resolve().parent
N_TEST = N_VAL = 150
MAX_CHARS = 700


def b64(s: str) -> int:
    n = 0
    for ch in s:
        n = n * 64 + B64.index(ch)
    return n


def entries(folder: Path, name: str) -> list[tuple[str, str]]:
    data = gzip.open(folder / f"{name}.dict.dz").read()
    out = []
    for line in (folder / f"{name}.index").read_text(encoding="utf-8").splitlines():
        head, off, length = line.split("\t")[:3]
        if head.startswith("00-database") or head.startswith("00database"):
            continue
        out.append((head, data[b64(off) : b64(off) + b64(length)].decode("utf-8")))
    return out


def clean(head: str, body: str, source: str) -> str:
    lines = body.splitlines()
    if source == "devil":  # "BATH, n.  A kind of ..." : the headword opens the first line
        text = " ".join(lines)
        text = re.sub(r"^[A-Z' -]+,\s*(\w+\.\s*)*", "", text.strip())
    else:  # headword, then part of speech / pronunciation lines, then the indented definition
        body_lines = [
            l for l in lines[1:] if l.strip() and not re.fullmatch(r"\s*(/[^/]+/|[a-z.,\s]+\.)\s*", l)
        ]
        text = " ".join(body_lines)
        text = re.sub(r"\{([^}]*)\}", r"\1", text)
        text = re.sub(r"^\s*\[[^\]]*\]\s*", "", text)
    text = " ".join(text.replace("_", "").split())
    if len(text) > MAX_CHARS:
        cut = max(
            text.rfind(". ", 0, MAX_CHARS), text.rfind("? ", 0, MAX_CHARS), text.rfind("! ", 0, MAX_CHARS)
        )
        text = text[: cut + 1] if cut > 100 else text[:MAX_CHARS].rsplit(" ", 1)[0]
    return f"{head.strip().capitalize() if source == 'devil' else head.strip()}: {text}"


def main() -> None:
    folder = Path(sys.argv[1]) / "usr/share/dictd" if len(sys.argv) > 1 else Path("/usr/share/dictd")
    texts = []
    for source in ("devil", "jargon"):
        for head, body in entries(folder, source):
            t = clean(head, body, source)
            if len(t.split()) >= 12:
                texts.append({"kind": "text", "text": t, "source": source})
    seen, unique = set(), []
    for t in texts:
        if t["text"] not in seen:
            seen.add(t["text"])
            unique.append(t)
    random.Random(0).shuffle(unique)
    splits = {
        "test": unique[:N_TEST],
        "val": unique[N_TEST : N_TEST + N_VAL],
        "train": unique[N_TEST + N_VAL :],
    }
    for name, rows in splits.items():
        with open(HERE / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({"kind": "text", "text": r["text"]}, ensure_ascii=False) + "\n")
        print(name, len(rows), sum(r["source"] == "devil" for r in rows), "from the Devil's Dictionary")


if __name__ == "__main__":
    main()
