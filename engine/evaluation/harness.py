"""T and T' judged by EleutherAI's lm-evaluation-harness (docs/methods.md, "lm-evaluation-harness").

Nothing can be downloaded, and no built-in lm-eval task ships its data, so Graft writes its own
task definitions into a folder for each run (:func:`write_tasks`), from the run's concept set and
retained set and the bundled general corpus:

* ``graft_retained_ppl``, ``graft_general_ppl``: ``loglikelihood_rolling`` over every text, with
  lm-eval's word and byte perplexity, bits per byte, and a token perplexity (each text's token
  count under the run's tokenizer, written into the task's data, aggregated by lm-eval's
  ``weighted_perplexity``);
* ``graft_concept_ll``: ``loglikelihood`` of each held-out test answer after its prompt: a token
  perplexity of the answers (``weighted_perplexity`` over their token counts) and ``acc`` (the whole
  answer is the greedy continuation);
* ``graft_concept_gen``: ``generate_until`` on the same questions, scored by Graft's own answer
  match (``exact``, :func:`engine.evaluation.scoring.answer_matches`).

A user's own tasks come in through ``include_path`` (lm-eval's ``--include_path``), by name.
:func:`run_harness` runs ``lm_eval.simple_evaluate`` on a model object (lm-eval's ``HFLM`` takes
one), offline, and returns every metric with the harness's standard error.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

from ..core.data import ConceptSet, load_workload
from ..core.errors import GraftError
from ..core.paths import data_dir

GRAFT_TASKS = ("graft_retained_ppl", "graft_general_ppl", "graft_concept_ll", "graft_concept_gen")

_UTILS = '''"""Written by Graft (engine/evaluation/harness.py): the metrics of Graft's lm-eval tasks."""

import re

from engine.evaluation.scoring import answer_matches


def rolling_all(doc, results):
    (ll,) = results
    text = doc["text"]
    words, nbytes = len(re.split(r"\\s+", text)), len(text.encode("utf-8"))
    return {
        "word_perplexity": (ll, words),
        "byte_perplexity": (ll, nbytes),
        "bits_per_byte": (ll, nbytes),
        "token_perplexity": (ll, doc["n_tokens"]),
    }


def answer_ll(doc, results):
    ll, greedy = results[0] if isinstance(results[0], (tuple, list)) else results
    return {"token_perplexity": (ll, doc["n_tokens"]), "acc": float(greedy)}


def exact(doc, results):
    return {"exact": float(answer_matches(results[0], doc["answer"]))}
'''


def _rolling_yaml(name: str, data: Path) -> str:
    return f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data))}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
process_results: !function utils.rolling_all
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
  - metric: token_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
metadata:
  version: 1.0
"""


def _qa_yaml(name: str, data: Path, kind: str, max_new_tokens: int) -> str:
    head = f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data))}
test_split: test
doc_to_text: "{{{{prompt}}}}"
"""
    if kind == "ll":
        return (
            head
            + """output_type: loglikelihood
doc_to_target: "{{target}}"
process_results: !function utils.answer_ll
metric_list:
  - metric: token_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
        )
    return (
        head
        + f"""output_type: generate_until
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: {int(max_new_tokens)}
  do_sample: false
process_results: !function utils.exact
metric_list:
  - metric: exact
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
    )


def _jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_tasks(
    folder: Path, tokenizer: Any, concept: ConceptSet, retained: ConceptSet, max_new_tokens: int = 16
) -> Path:
    """Graft's four lm-eval tasks, with their data, in ``folder`` (returned)."""
    from ..loading.tokens import format_prompt

    folder.mkdir(parents=True, exist_ok=True)

    def counted(texts: Sequence[str]) -> list[dict[str, Any]]:
        rows = []
        for t in texts:
            n = len(tokenizer(t, add_special_tokens=False)["input_ids"])
            if n:
                rows.append({"text": t, "n_tokens": n})
        return rows

    general = list(load_workload(str(data_dir() / "general" / "test.jsonl")).texts)
    qa = []
    for item in concept.test_qa():
        prompt = format_prompt(tokenizer, item.question)
        sep = "" if (not prompt or prompt[-1].isspace()) else " "
        n = len(tokenizer(sep + item.answer, add_special_tokens=False)["input_ids"])
        qa.append(
            {"prompt": prompt, "target": sep + item.answer, "answer": item.answer, "n_tokens": max(n, 1)}
        )
    if not qa:
        raise GraftError(f"concept set {concept.name!r} has no held-out test questions for the harness")
    files = {
        "graft_retained_ppl": _jsonl(folder / "retained.jsonl", counted(retained.texts())),
        "graft_general_ppl": _jsonl(folder / "general.jsonl", counted(general)),
        "graft_concept_ll": _jsonl(folder / "concept_qa.jsonl", qa),
    }
    for name in ("graft_retained_ppl", "graft_general_ppl"):
        (folder / f"{name}.yaml").write_text(_rolling_yaml(name, files[name]))
    (folder / "graft_concept_ll.yaml").write_text(
        _qa_yaml("graft_concept_ll", files["graft_concept_ll"], "ll", 0)
    )
    (folder / "graft_concept_gen.yaml").write_text(
        _qa_yaml("graft_concept_gen", files["graft_concept_ll"], "gen", max_new_tokens)
    )
    (folder / "utils.py").write_text(_UTILS)
    return folder


def _offline() -> dict[str, Optional[str]]:
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_EVALUATE_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ[k] = "1"
    return old


def run_harness(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    task_folder: Path,
    *,
    include_path: str = "",
    limit: int = 0,
    batch_size: int = 8,
    bootstrap_iters: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """``{task: {metric: value, metric + "_stderr": value}}`` from ``lm_eval.simple_evaluate`` on
    ``model`` (a transformers model object; never a path, so T' needs no folder), offline."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:  # pragma: no cover - it is in requirements.txt
        raise GraftError(f"lm-evaluation-harness is not installed ({exc}): pip install -r requirements.txt")
    import sys

    from ..core.paths import repo_root

    if str(repo_root()) not in sys.path:  # the tasks' utils.py imports Graft's answer match
        sys.path.insert(0, str(repo_root()))
    paths = [str(task_folder)] + ([include_path] if include_path.strip() else [])
    for p in paths[1:]:
        if not Path(p).is_dir():
            raise GraftError(f"--include-path {p!r} is not a folder of lm-eval task definitions")
    old = _offline()
    try:
        manager = TaskManager(include_path=paths, include_defaults=False)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise GraftError(
                f"unknown lm-eval task(s): {', '.join(unknown)}; Graft's are {', '.join(GRAFT_TASKS)}"
                + (", plus those under --include-path" if include_path.strip() else "")
            )
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=False)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=manager,
            limit=limit or None,
            bootstrap_iters=bootstrap_iters,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    results: dict[str, Any] = {}
    for task, metrics in (out or {}).get("results", {}).items():
        row: dict[str, Any] = {}
        for key, value in metrics.items():
            if key == "alias" or "," not in key:
                continue
            name, _filter = key.split(",", 1)
            row[name] = value if isinstance(value, (int, float)) else None
        results[task] = row
    return {
        "results": results,
        "versions": (out or {}).get("versions", {}),
        "n_samples": (out or {}).get("n-samples", {}),
    }


def task_folder() -> Path:
    """A fresh temporary folder for one run's task definitions (removed by :func:`drop_folder`)."""
    return Path(tempfile.mkdtemp(prefix="graft-lmeval-"))


def drop_folder(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
