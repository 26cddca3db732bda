"""User- and model-derived text shown through Streamlit's markdown, literally.

Streamlit renders the text of ``st.markdown``, ``st.caption``, ``st.error`` and friends as
markdown with its own extensions (``:red[...]`` colours, ``:material/...:`` icons, ``$...$``
LaTeX). A model path, a workload file name, a run's donor or an error that quotes them comes from
whoever typed it, or from a link (``?donor=...``): without escaping, ``![x](http://host/t.png)``
fetches a remote image and ``[click](https://...)`` becomes a live link. :func:`md` makes such
text literal; :func:`code` puts it in a code span that no backtick in it can end. Pure Python (no
Streamlit), so it is tested without a server.
"""

from __future__ import annotations

import re
from typing import Any

# Every ASCII punctuation character: CommonMark lets each be backslash-escaped, and an escaped one
# starts no construct (emphasis, links, images, HTML, entities, GFM autolinks and tables, Streamlit
# directives and icons, math).
_PUNCT = re.compile(r"([!-/:-@\[-`{-~])")
_SPACES = re.compile(r"\s+")


# What Streamlit's GFM turns into links after parsing, escapes or not (a transform over the text):
# URLs, www. names and e-mail addresses. They go into code spans, where nothing is linked.
_LINKABLE = re.compile(r"(?:https?://|www\.)\S+|[-.\w+]+@[-\w]+(?:\.[-\w]+)+", re.IGNORECASE)


def md(text: Any) -> str:
    """``text`` as literal markdown on one line (line breaks and other whitespace runs become one
    space): punctuation backslash-escaped, URL- and e-mail-like runs shown as code."""
    s = _SPACES.sub(" ", str(text)).strip()
    out, pos = [], 0
    for m in _LINKABLE.finditer(s):
        out.append(_PUNCT.sub(r"\\\1", s[pos : m.start()]))
        out.append(code(m.group(0)))
        pos = m.end()
    out.append(_PUNCT.sub(r"\\\1", s[pos:]))
    return "".join(out)


def code(text: Any) -> str:
    """``text`` as one inline code span, fenced by more backticks than it holds in a row (CommonMark),
    so nothing inside is read as markup and a backtick in it cannot close the span early."""
    s = _SPACES.sub(" ", str(text)).strip() or "—"
    run = max((len(m) for m in re.findall(r"`+", s)), default=0)
    fence = "`" * (run + 1)
    return f"{fence} {s} {fence}" if run or s.startswith(" ") else f"{fence}{s}{fence}"
