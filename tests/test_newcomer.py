"""docs/adding-a-tool.md works as written: its three files, copied into a clean copy of the
repository, give a tool that the conformance suite, its own test and the CLI accept."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WALKTHROUGH = ROOT / "docs" / "adding-a-tool.md"
# A file block: a bold numbered path (**1. `engine/tools/norms.py`**), then the first python block after it.
FILE_BLOCK = re.compile(r"\*\*\d\. `([^`]+)`\*\*.*?```python\n(.*?)```", re.S)


def walkthrough_files() -> dict[str, str]:
    """Every file block of the walkthrough: the whole page is read, whatever its headings say."""
    return dict(FILE_BLOCK.findall(WALKTHROUGH.read_text(encoding="utf-8")))


def test_the_walkthrough_gives_three_files_and_only_new_ones():
    files = walkthrough_files()
    assert sorted(files) == ["engine/tools/norms.py", "tests/test_norms.py", "viz/norms.py"]
    assert not any((ROOT / f).exists() for f in files)  # the walkthrough adds; it edits nothing


def test_a_newcomer_following_the_walkthrough_gets_a_working_tool(tmp_path):
    repo = tmp_path / "repo"
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / rel)
    for rel, code in walkthrough_files().items():
        (repo / rel).write_text(code)
    env = {**os.environ, "GRAFT_HOME": str(tmp_path / "home")}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600
        )

    tests = run(
        "-m",
        "pytest",
        "-v",
        "-p",
        "no:cacheprovider",
        "tests/test_norms.py",
        "tests/test_conformance.py",
        "-k",
        "norms or registers_a_tool",
    )
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    passed = [line.split(" ")[0] for line in tests.stdout.splitlines() if " PASSED" in line]
    assert {
        "tests/test_norms.py::test_a_model_against_itself_has_one_profile",
        "tests/test_norms.py::test_scaled_embeddings_show_at_layer_minus_one",
        "tests/test_conformance.py::test_every_module_in_engine_tools_registers_a_tool",
    } <= set(passed)
    conformance = [p for p in passed if p.startswith("tests/test_conformance.py") and "norms" in p]
    assert len(conformance) >= 5, passed  # every per-tool conformance check ran on the new tool

    cli = run(
        "-m",
        "engine",
        "norms",
        "--donor",
        "tiny-gpt2-a",
        "--target",
        "tiny-gpt2-b",
        "--quiet",
        "--json",
        str(tmp_path / "norms.json"),
    )
    assert cli.returncode == 0, cli.stderr[-2000:]
    env_json = json.loads((tmp_path / "norms.json").read_text())
    assert env_json["tool"] == "norms" and env_json["meta"]["code"] == "T99"
    assert len(env_json["result"]["donor"]) == len(env_json["result"]["layers"])
