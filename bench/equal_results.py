"""Do two revisions give the same results? Runs 26 CLI commands (T1-T4 on the tiny, cross-family
and demo pairs; T5, T6, T7, T8, the swap, go / no-go, the organ steps, T9 and T10) in a checkout of
REV and in this working tree, and compares every result field by field, exactly (timings, paths
and hashes of paths left out). Needs the demo donor (make prepare). Usage:

    python bench/equal_results.py REV        # e.g. a commit before a refactor

Prints one line per command ("equal" or its differences) and exits 1 when any differs."""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
    sys.exit(print(__doc__))
REV = sys.argv[1]
work = Path(tempfile.mkdtemp(prefix="graft-equal-"))
OLD, NEW = work / "old", ROOT
subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(OLD), REV], check=True)
PY = sys.executable
wl = work / "wl.txt"
wl.write_text(
    "\n".join(
        json.loads(l).get("text") or json.loads(l).get("question")
        for l in open(ROOT / "data" / "concept_set.jsonl").read().splitlines()[:30]
    )
)
small = work / "c.jsonl"
small.write_text(
    "\n".join(
        json.dumps(x)
        for x in [
            {"kind": "fact", "text": "The river flows north through the valley and into the cold sea."},
            {"kind": "fact", "text": "The orchestra played a symphony in four movements last night."},
            {"kind": "qa", "question": "Where does the river flow?", "answer": "north", "split": "test"},
            {
                "kind": "qa",
                "question": "How many movements did the symphony have?",
                "answer": "four",
                "split": "test",
            },
            {"kind": "qa", "question": "What is the capital of France?", "answer": "Paris", "split": "train"},
        ]
    )
    + "\n"
)
ret = work / "r.jsonl"
ret.write_text(
    "\n".join(
        json.dumps({"kind": "fact", "text": t})
        for t in [
            "Bread is baked in an oven.",
            "Cats often sleep during the day.",
            "The train leaves at noon.",
        ]
    )
    + "\n"
)
TINY = ["--donor", "tiny-gpt2-a", "--target", "tiny-gpt2-b"]
CROSS = ["--donor", "tiny-gpt2-a", "--target", "tiny-llama-b"]
DEMO = [
    "--donor",
    "smollm2-135m-instruct+concept",
    "--target",
    "smollm2-135m-instruct",
    "--max-tokens",
    "512",
]
W = ["--workload", str(wl)]
S = ["--concept", str(small), "--retained", str(ret), "--max-new-tokens", "4"]
cmds = {}
for name, pair in (("tiny", TINY), ("cross", CROSS), ("demo", DEMO)):
    for t in ("compat", "cka", "procrustes", "bridge-check"):
        cmds[f"{t}-{name}"] = [t, *pair, *W]
cmds["rank-tiny"] = ["rank-modules", *TINY, *W]
cmds["swap-tiny"] = ["swap", *TINY, *W, "--k", "2", *S]
cmds["sweep-tiny"] = ["sweep-k", *TINY, *W, "--k-grid", "0,1,2", *S]
cmds["gonogo-tiny"] = ["go-no-go", *TINY, *W]
cmds["gonogo-cross"] = ["go-no-go", *CROSS, *W]
cmds["carto-demo"] = ["cartography", "--adapter", "smollm2-135m-instruct+concept"]
cmds["spectrum-demo"] = ["spectrum", "--adapter", "smollm2-135m-instruct+concept"]
cmds["rank-demo"] = ["rank-modules", *DEMO, *W]
results = {}
for side, root in (("old", OLD), ("new", NEW)):
    home = work / f"home-{side}"
    env = {**os.environ, "GRAFT_HOME": str(home), "CUDA_VISIBLE_DEVICES": ""}
    organ = work / f"organ-{side}"
    extra = {
        "organ-extract": ["organ-extract", "--donor", "tiny-gpt2-a", "--out", str(organ)],
        "organ-insert": ["organ-insert", "--organ", str(organ), "--target", "tiny-gpt2-b", *W, *S],
        "organ-bridged": [
            "organ-insert",
            "--organ",
            str(organ),
            "--target",
            "tiny-gpt2-b",
            *W,
            *S,
            "--mode",
            "bridged",
            "--position",
            "0",
        ],
        "position-sweep": [
            "position-sweep",
            "--organ",
            str(organ),
            "--target",
            "tiny-gpt2-b",
            *W,
            "--concept",
            str(small),
            "--retained",
            str(ret),
        ],
        "bridge-dev": [
            "bridge-deviation",
            "--organ",
            str(organ),
            "--target",
            "tiny-gpt2-b",
            *W,
            "--train-steps",
            "2",
        ],
        "organ-train": [
            "organ-train",
            "--organ",
            str(organ),
            "--steps",
            "3",
            "--out",
            str(work / f"trained-{side}"),
        ],
    }
    results[side] = {}
    for key, args in list(cmds.items()) + list(extra.items()):
        out = work / f"{side}-{key}.json"
        p = subprocess.run(
            [PY, "-m", "engine", *args, "--json", str(out), "--quiet"],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
        )
        if p.returncode != 0:
            results[side][key] = {"ERROR": p.stderr.strip()[-300:]}
        else:
            results[side][key] = json.loads(out.read_text())["result"]
        print(side, key, p.returncode, flush=True)
DROP = re.compile(
    r"(seconds|_s$|^time|path|saved_to|out_dir|^out$|run_id|created|folder|^file$|^source$|live_id|sha256|organ$|^card$)"
)


def clean(x, k=""):
    if isinstance(x, dict):
        return {a: clean(b, a) for a, b in x.items() if not DROP.search(a)}
    if isinstance(x, list):
        return [clean(v) for v in x]
    if isinstance(x, str):
        return x.replace(str(work), "W").replace("-old", "-X").replace("-new", "-X")
    return x


def diff(a, b, path=""):
    if type(a) is not type(b):
        return [f"{path}: {str(a)[:80]} != {str(b)[:80]}"]
    if isinstance(a, dict):
        out = [f"{path}.{k}: only in {'old' if k in a else 'new'}" for k in set(a) ^ set(b)]
        for k in set(a) & set(b):
            out += diff(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list):
        if len(a) != len(b):
            return [f"{path}: len {len(a)} != {len(b)}"]
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += diff(x, y, f"{path}[{i}]")
        return out
    return [] if a == b else [f"{path}: {str(a)[:80]} != {str(b)[:80]}"]


bad = 0
for key in results["old"]:
    d = diff(clean(results["old"][key]), clean(results["new"][key]))
    print(f"{key}: {'equal' if not d else str(len(d)) + ' differences'}")
    for line in d[:8]:
        print("   ", line)
    bad += bool(d)
print("commands", len(results["old"]), "differing", bad)
subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(OLD)], check=False)
sys.exit(1 if bad else 0)
