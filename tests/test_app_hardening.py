"""App hardening, driven headless with AppTest: a link never turns on remote code, the trust switch
lists the files that would run and holds for one pair, and a result is never shown as if it were
for a pair other than the sidebar's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest
from test_app import picker, run_until, shown  # noqa: E402  (tests/ is on sys.path under pytest)

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")


@pytest.fixture(scope="module")
def code_folder(tmp_path_factory, tiny_gpt2_folder) -> Path:
    """A tiny GPT-2 folder whose config names custom code, with the .py file that would run."""
    d = tmp_path_factory.mktemp("remote") / "custom-model"
    shutil.copytree(tiny_gpt2_folder, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomModel"}
    (d / "config.json").write_text(json.dumps(cfg))
    marker = d.parent / "EXECUTED"
    (d / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return d


def open_app(query: dict[str, str], page: str = "pages/home.py") -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    for k, v in query.items():
        at.query_params[k] = v
    at.run()
    if page != "pages/home.py":
        at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def sidebar_text(at: AppTest) -> str:
    return "\n".join(
        str(e.value) for e in list(at.sidebar.markdown) + list(at.sidebar.caption) + list(at.sidebar.code)
    )


@pytest.mark.parametrize("flag", ["1", "true", "yes", "on"])
def test_a_link_cannot_turn_on_remote_code(home, code_folder, flag):
    at = open_app({"donor": str(code_folder), "target": "tiny-gpt2-b", "trust_remote_code": flag})
    assert at.session_state["_selection"].trust_remote_code is False
    box = [c for c in at.sidebar.checkbox if c.key == "trust_remote_code"]
    assert box and box[0].value is False
    assert not (code_folder.parent / "EXECUTED").exists()


def test_trust_switch_lists_the_files_and_holds_for_one_pair(home, code_folder):
    at = open_app({"donor": str(code_folder), "target": "tiny-gpt2-b"})
    text = sidebar_text(at)
    assert "modeling_custom.py" in text and "modeling_custom.CustomModel" in text
    at.sidebar.checkbox(key="trust_remote_code").check().run()
    sel = at.session_state["_selection"]
    assert sel.trust_remote_code is True and sel.donor.trust_remote_code is True
    # Another target: the grant is gone, and must be given again deliberately.
    picker(at, "target").set_value("tiny-llama-b").run()
    assert at.session_state["_selection"].trust_remote_code is False
    assert at.sidebar.checkbox(key="trust_remote_code").value is False
    assert not (code_folder.parent / "EXECUTED").exists(), "listing the files must not import them"


def test_no_trust_switch_when_no_model_ships_code(home):
    at = open_app({"donor": "tiny-gpt2-a", "target": "tiny-gpt2-b", "trust_remote_code": "1"})
    assert not [c for c in at.sidebar.checkbox if c.key == "trust_remote_code"]
    assert at.session_state["_selection"].trust_remote_code is False


def test_run_submits_the_pair_on_the_screen_and_flags_a_stale_result(home):
    at = open_app({"donor": "tiny-gpt2-a", "target": "tiny-gpt2-b"}, "pages/alignment.py")
    # Change the target and click Run in the same interaction, as a quick user would: the job
    # must be for the pair the sidebar now shows.
    picker(at, "target").set_value("tiny-llama-b")
    at.button(key="run-cka").click().run()
    run_until(at, lambda a: len(a.get("plotly_chart")) > 0)
    caption = shown("\n".join(str(c.value) for c in at.caption))
    assert "donor **tiny-gpt2-a** → target **tiny-llama-b**" in caption
    assert not at.warning
    # Now the sidebar shows another pair: the old result is flagged, not shown as this pair's.
    at.sidebar.button(key="swap-models").click().run()
    warnings = shown("\n".join(str(w.value) for w in at.warning))
    assert "This result is for **tiny-gpt2-a → tiny-llama-b**" in warnings
    assert "tiny-llama-b → tiny-gpt2-a" in warnings
    assert any("anyway" in e.label for e in at.expander)


HOSTILE_LINK = "![x](http://127.0.0.1:9/track.png) [click](https://example.invalid/p) **b** :red[r] $x^2$"


@pytest.mark.parametrize("page", ["pages/home.py", "pages/models.py", "pages/alignment.py", "pages/runs.py"])
def test_a_crafted_link_shows_its_model_text_literally(home, page):
    """?donor= is whatever a link says: it is shown as escaped markdown (no image fetched, no live
    link, no colour or LaTeX), and a name too long for the file system is an ordinary error."""
    at = open_app({"donor": HOSTILE_LINK, "target": "A" * 300}, page)
    shown = [
        str(e.value)
        for e in list(at.error)
        + list(at.sidebar.error)
        + list(at.info)
        + list(at.caption)
        + list(at.markdown)
        + list(at.sidebar.caption)
        + list(at.sidebar.markdown)
    ]
    mentions = [s for s in shown if "track" in s or "AAAA" in s]
    assert any("track" in s for s in mentions) and any("AAAA" in s for s in mentions), shown
    # Each mention is a code span (shows its text as written) or escaped markdown source (every
    # bracket, bang, colon, dollar and star escaped); the escaped form is checked wherever it appears,
    # and it does appear: the sidebar's error names the model in prose.
    track = [s for s in mentions if "track" in s]
    prose = [s for s in track if f"`{HOSTILE_LINK}`" not in s]
    assert prose, track
    for s in prose:
        assert r"\!\[x\]\(`http://127.0.0.1:9/track.png)`" in s and r"\[click\]\(`https" in s, s
        assert r"\*\*b\*\*" in s and r"\:red\[r\]" in s and r"\$x\^2\$" in s, s


def test_a_picker_whose_widget_state_is_dropped_keeps_the_pair(home):
    """Streamlit may drop a keyed widget's state between runs (a browser run once showed the demo
    donor in both pickers after a swap): each picker's own default is the pair in
    ``donor``/``target``, never the first model in the list, so a lost state changes nothing."""
    at = open_app({"donor": "tiny-gpt2-a", "target": "tiny-gpt2-b"}, "pages/alignment.py")
    at.sidebar.button(key="swap-models").click().run()
    for role, want in (("donor", "tiny-gpt2-b"), ("target", "tiny-gpt2-a")):
        box = picker(at, role)  # the widget's own default, not only its state
        assert box.options[box.proto.default].split(" ")[1] == want
    from streamlit.proto.WidgetStates_pb2 import WidgetStates

    ids = {picker(at, role).id for role in ("donor", "target")}
    sent = WidgetStates()
    sent.widgets.extend(w for w in at._tree.get_widget_states().widgets if w.id not in ids)
    for wid in ids:
        key = wid.split("-", 2)[2]  # "$$ID-<hash>-<user key>"
        assert key.split("_pick-")[0] in ("donor", "target") and key in at.session_state
        del at.session_state[key]
    at._run(sent)
    assert not at.exception, [e.value for e in at.exception]
    assert (picker(at, "donor").value, picker(at, "target").value) == ("tiny-gpt2-b", "tiny-gpt2-a")
    assert (at.session_state["donor"], at.session_state["target"]) == ("tiny-gpt2-b", "tiny-gpt2-a")


def test_a_run_click_from_the_page_before_a_swap_runs_the_swapped_pair(home):
    """The browser's Run click can come from the page drawn before the swap's rerun reached it:
    its pickers still hold the old pair. Those stale values must not undo the swap."""
    at = open_app({"donor": "tiny-gpt2-a", "target": "tiny-gpt2-b"}, "pages/alignment.py")
    before = at._tree  # the page the browser still shows while the swap's rerun is under way
    at.sidebar.button(key="swap-models").click().run()
    before.sidebar.button(key="swap-models").set_value(False)  # that trigger was sent once already
    for role, old in (("donor", "tiny-gpt2-a"), ("target", "tiny-gpt2-b")):  # the old page's pickers
        picker(before, role).set_value(old)
    before.button(key="run-cka").click()
    at._run(before.get_widget_states())  # what the browser sends: the old page's widgets + Run
    assert not at.exception, [e.value for e in at.exception]
    assert (at.session_state["donor"], at.session_state["target"]) == ("tiny-gpt2-b", "tiny-gpt2-a")
    run_until(at, lambda a: len(a.get("plotly_chart")) > 0)
    caption = shown("\n".join(str(c.value) for c in at.caption))
    assert "donor **tiny-gpt2-b** → target **tiny-gpt2-a**" in caption
    assert not at.warning
