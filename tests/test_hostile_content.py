"""Hostile content shown back to the user: markdown in the app, HTML in figures and the report,
control characters and endless names in one-line errors. A model name, a folder, a workload
file or a link's ``?donor=`` is whatever someone typed; it must be shown as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_app import shown  # noqa: E402  (tests/ is on sys.path under pytest)

from engine.core.errors import GraftError, printable_line
from ui.text import code, md

ROOT = Path(__file__).resolve().parent.parent

HOSTILE = (
    "![x](http://127.0.0.1:9/track.png) [click](https://example.invalid/p) **b** :red[r] $x^2$ "
    "<img src=x onerror=alert(1)> `t` :material/home: &amp; a_b_ ~~s~~ | c |"
)


_SPAN = re.compile(r"(?<!\\)(`+)(.+?)\1(?!`)")  # an escaped backtick opens nothing


def test_md_escapes_every_construct_and_shows_the_text_unchanged():
    out = md(HOSTILE)
    # no construct can start: outside code spans (URLs, which GFM would link), every ASCII
    # punctuation character comes escaped
    assert "`http://127.0.0.1:9/track.png)`" in out and "`https://example.invalid/p)`" in out
    plain = _SPAN.sub("", out)
    i = 0
    while i < len(plain):
        if plain[i] == "\\":
            assert re.match(r"[!-/:-@\[-`{-~]", plain[i + 1]), (i, plain)
            i += 2
        else:
            assert not re.match(r"[!-/:-@\[-`{-~]", plain[i]), (i, plain)
            i += 1
    assert shown(out) == HOSTILE
    assert md("a\nb\r\n\tc  d") == "a b c d"  # one line
    assert md("mail me@example.org or www.example.org") == "mail `me@example.org` or `www.example.org`"


def test_code_span_cannot_be_closed_by_a_backtick_in_the_name():
    assert code("plain/path") == "`plain/path`"
    s = code("a `tick` and ``two`` b")
    fence = re.match(r"`+", s).group(0)
    assert len(fence) == 3 and s.endswith(" " + fence) and "a `tick` and ``two`` b" in s
    assert code("") == "`—`"


def test_error_messages_are_one_printable_bounded_line():
    assert printable_line("a\nb\x1b[31mc\u202ed\u200b") == "a\\nb\\x1b[31mc\\u202ed\\u200b"
    long = printable_line("A" * 5000)
    assert len(long) <= 1003 and " … " in long
    assert str(GraftError("unknown model 'x\ny'")) == "unknown model 'x\\ny'"


@pytest.mark.parametrize(
    "donor", ["A" * 5000, "/tmp/" + "A" * 5000, "tiny-gpt2-a\nFAKE: second line", "\x1b[31mred"]
)
def test_cli_refuses_hostile_model_names_in_one_line(donor):
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "compat", "--donor", donor, "--target", "tiny-gpt2-b", "--quiet"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("error: ") and "\x1b" not in lines[0] and len(lines[0]) < 1100
    )
    assert "internal" not in lines[0]


def test_cli_output_path_too_long_is_bad_input_not_a_bug(tmp_path):
    out = tmp_path / ("A" * 300) / "x.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            "compat",
            "--donor",
            "tiny-gpt2-a",
            "--target",
            "tiny-gpt2-b",
            "--json",
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "internal" not in proc.stderr


def test_figure_titles_show_folder_names_not_markup():
    from viz.common import display_name, download_filename, envelope_title

    env = {"donor": "/m/p<b>B<a href='mailto:x@y.z'>m", "target": "tiny-gpt2-b", "meta": {"code": "T2"}}
    title = envelope_title(env, "T2", "Layer similarity")
    assert "<b>" not in title and "<a " not in title and "p&lt;b&gt;B&lt;a href='mailto:x@y.z'&gt;m" in title
    assert display_name("tiny-gpt2-a", "d") == "tiny-gpt2-a"
    assert download_filename(env, "T2", "cka") == "graft_T2_cka_p-b-B-a-href-mailto-x-y.z-m_vs_tiny-gpt2-b"


def test_the_compare_page_draws_at_most_its_limit_of_answers():
    from viz.compare import generations_html

    gens = [
        {
            "question": f"q{i}",
            "reference": "r",
            "target": "a",
            "transplanted": "b",
            "donor": "c",
            "changed": True,
        }
        for i in range(1200)
    ]
    env = {"tool": "swap", "result": {"generations": gens}}
    page = generations_html(env, limit=500)
    assert page.count("<tr>") == 501 and "The first 500 of 1,200 answers" in page  # header + 500 rows
    assert generations_html(env).count("<tr>") == 1201  # the report: every answer
