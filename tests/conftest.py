import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _graft_home(tmp_path_factory, monkeypatch):
    """Every test gets its own GRAFT_HOME (history, uploads), except real-model caches.

    Built-in real models stay in the user's cache (GRAFT_MODELS_HOME) so they are prepared once."""
    home = tmp_path_factory.mktemp("graft_home")
    monkeypatch.setenv("GRAFT_HOME", str(home))
    yield home


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
