import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The suite pins the CPU: equality tests must not meet CUDA's reduction order by surprise on a GPU
# host. GRAFT_TEST_DEVICE=cuda runs the same suite on the GPU (and the CUDA-only tests); subprocesses
# inherit the choice. Set before torch is imported anywhere.
TEST_DEVICE = os.environ.get("GRAFT_TEST_DEVICE", "cpu")
if TEST_DEVICE not in ("cpu", "cuda"):
    raise pytest.UsageError(f"GRAFT_TEST_DEVICE must be cpu or cuda, not {TEST_DEVICE!r}")
if TEST_DEVICE == "cpu":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import engine.tools  # noqa: E402, F401  (registers every built-in tool, as engine.api and the CLI do)


@pytest.fixture(autouse=True)
def _graft_home(tmp_path_factory, monkeypatch):
    """Every test gets its own GRAFT_HOME (history, uploads), except real-model caches.

    Built-in real models stay in the user's cache (GRAFT_MODELS_HOME) so they are prepared once."""
    home = tmp_path_factory.mktemp("graft_home")
    monkeypatch.setenv("GRAFT_HOME", str(home))
    yield home


@pytest.fixture
def home(_graft_home):
    """This test's GRAFT_HOME (the app's history and uploads live there)."""
    return _graft_home


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and with the suite running beside other
    jobs on a 2-core machine OpenMP spin-waiting makes each small op 10x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def workload(tmp_path) -> str:
    texts = [
        "The quick brown fox jumps over the lazy dog.",
        "Water boils at one hundred degrees Celsius at sea level.",
        "Paris is the capital of France, and Berlin is the capital of Germany.",
        "The moon orbits the earth roughly once a month.",
        "Cats sleep for most of the day and hunt at night.",
        "The library opens at nine in the morning on weekdays.",
        "Light travels faster than sound, so we see lightning first.",
        "The orchestra played a symphony in four movements.",
        "Mountains and rivers shape where people choose to live.",
        "Photosynthesis turns sunlight and water into sugar.",
    ]
    p = tmp_path / "workload.txt"
    p.write_text("\n".join(texts) + "\n")
    return str(p)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Paths of a small concept set (2 facts, 2 test and 1 train question) and retained set, so
    every evaluation takes milliseconds."""
    d = tmp_path_factory.mktemp("sets")
    concept = d / "concept.jsonl"
    concept.write_text(
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
                {
                    "kind": "qa",
                    "question": "What is the capital of France?",
                    "answer": "Paris",
                    "split": "train",
                },
            ]
        )
        + "\n"
    )
    retained = d / "retained.jsonl"
    retained.write_text(
        "\n".join(
            json.dumps({"kind": "text", "text": t})
            for t in [
                "Cats and dogs are common pets; parrots can learn to speak words.",
                "Light travels faster than sound, which is why we see lightning first.",
            ]
        )
        + "\n"
    )
    return {"concept": str(concept), "retained": str(retained)}


@pytest.fixture(scope="session")
def tiny_gpt2_folder(tmp_path_factory) -> Path:
    """tiny-gpt2-a saved as a Hugging Face folder (safetensors weights + tokenizer), once per
    session. Shared: copy it before changing anything in it."""
    from engine.loading.tiny import build_tiny

    d = tmp_path_factory.mktemp("tiny") / "tiny-gpt2-a"
    model, tok = build_tiny("tiny-gpt2-a")
    model.save_pretrained(str(d), safe_serialization=True)
    tok.save_pretrained(str(d))
    return d


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory):
    """A PEFT LoRA adapter written by peft itself (not by Graft) on tiny-llama-a: rank 4,
    alpha 8, every attention and MLP projection, with seeded nonzero B (peft starts B at 0, which
    would be an empty update). ``{"path": <adapter folder>, "base": "tiny-llama-a"}``."""
    import torch
    from peft import LoraConfig, get_peft_model

    from engine.loading.tiny import build_tiny

    with torch.random.fork_rng(devices=[]):  # build_tiny and peft's init draw from the global RNG
        model, _ = build_tiny("tiny-llama-a")
        config = LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        )
        peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    out = tmp_path_factory.mktemp("tiny_adapter") / "adapter"
    peft_model.save_pretrained(str(out), safe_serialization=True)
    return {"path": str(out), "base": "tiny-llama-a"}


@pytest.fixture
def tiny_run(_graft_home, sets):
    """A finished tiny module-swap run (tiny-gpt2-b's top 2 modules into tiny-gpt2-a, the small
    sets) recorded in this test's GRAFT_HOME history, as the CLI records one: ``{"run_id": ...}``.
    Tools that read a finished transplant run (``--run``) are run on it."""

    from engine.loading.models import ModelSpec
    from engine.running.history import History, new_run_id
    from engine.running.runner import pair_labels, run_tool

    params = {"k": 2, "max_new_tokens": 4, **sets}
    env = run_tool("swap", ModelSpec.parse("tiny-gpt2-b"), ModelSpec.parse("tiny-gpt2-a"), {}, params)
    history = History()
    run_id = new_run_id("test-")
    history.create(run_id, "swap", "T11 Module swap", *pair_labels(env), {"params": params}, source="cli")
    history.start(run_id)
    env["run_id"] = run_id
    history.finish(run_id, "done", result=json.loads(json.dumps(env)))
    return {"run_id": run_id, "envelope": env}


@pytest.fixture(scope="session")
def tiny_organ(tmp_path_factory):
    """An organ checkpoint extracted by Graft from tiny-gpt2-a (blocks 1..3: s = floor(4/3), k = 3),
    so it fits the tiny GPT-2 targets of the conformance suite. ``{"path": <organ folder>,
    "source": "tiny-gpt2-a"}``."""
    from engine.loading.models import ModelSpec, load_model
    from engine.surgery.organ import extract_organ, save_organ

    out = tmp_path_factory.mktemp("tiny_organ") / "organ"
    save_organ(extract_organ(load_model(ModelSpec.parse("tiny-gpt2-a"), "cpu")), out)
    return {"path": str(out), "source": "tiny-gpt2-a"}


@pytest.fixture
def planted_rotation_t3():
    """T3 (the Procrustes tool, through its own code path) on captures whose target is the donor
    rotated and shifted at every layer: ``h_T = h_D R0 + 0.3`` (embeddings + 3 layers, 400 token
    rows in texts of 20, width 12; the shift is there because centring must remove it). Returns
    ``(result, width)``."""
    import torch

    from engine.core.progress import silent
    from engine.measure.align import Aligned
    from engine.measure.cka import cka_matrix
    from engine.measure.linalg import random_orthogonal
    from engine.tools.procrustes import ProcrustesParams, compute_procrustes

    g = torch.Generator().manual_seed(2)
    L, n, d = 3, 400, 12
    X = torch.randn(L + 1, n, d, generator=g)
    Y = X @ random_orthogonal(d, seed=5).float() + 0.3

    class Ctx:
        def aligned(self, progress):
            return Aligned(X, Y, torch.arange(n) // 20, "token")

        def cka(self, progress, include_embeddings):
            return cka_matrix(X[1:], Y[1:])

    return compute_procrustes(Ctx(), ProcrustesParams(), silent()), d
