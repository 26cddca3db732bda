"""Non-diagnostic actions shared by the CLI and the UI: preparing built-ins, making a donor."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from .data import builtin_replay_path, builtin_retained_path, load_concept_set
from .errors import GraftError
from .models import ModelSpec, ModelStore, prepare_demo_donor, prepare_smollm2
from .progress import Progress, silent

# ``replay`` / ``retained`` default of build_donor: the bundled file (data/replay.jsonl,
# data/retained.jsonl). A path picks another file in the same format; None turns it off.
BUNDLED = "bundled"


def build_donor(
    base: ModelSpec,
    concept_path: str,
    out_dir: str,
    *,
    steps: Optional[int] = None,
    rank: Optional[int] = None,
    lr: Optional[float] = None,
    replay: Union[str, Path, None] = BUNDLED,
    replay_fraction: Optional[float] = None,
    retained: Union[str, Path, None] = BUNDLED,
    seed: int = 0,
    device: str = "auto",
    store: Optional[ModelStore] = None,
    progress: Optional[Progress] = None,
) -> dict[str, Any]:
    """LoRA fine-tune ``base`` on any concept file and write merged model, adapter and card.

    ``replay`` is general text mixed into training against forgetting (default: the bundled
    ``data/replay.jsonl``; a path: that file, concept-set format; None: train on the concept facts
    only). ``retained`` is the held-out general text whose perplexity before and after the card
    reports (default: the bundled ``data/retained.jsonl``; None: not measured). ``steps``,
    ``rank``, ``lr`` and ``replay_fraction`` left at None take make_donor's tuned defaults.

    Refuses to write into a non-empty folder that is not a previous donor, so nothing the user
    already has on disk is lost.
    """
    from .donor import make_donor

    progress = progress or silent()
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()) and not (out / "card.json").exists():
        raise GraftError(f"{out} exists and is not a Graft donor folder: choose an empty or new folder")
    concept = load_concept_set(concept_path)
    replay_set = None if replay is None else load_concept_set(builtin_replay_path() if replay == BUNDLED else replay)
    retained_set = None if retained is None else load_concept_set(
        builtin_retained_path() if retained == BUNDLED else retained)
    store = store or ModelStore()
    loaded = store.get(base, device, "float32", progress.sub(0, 0.05))
    kwargs: dict[str, Any] = {"seed": seed, "base_name": base.ref, "replay": replay_set, "retained": retained_set}
    for key, value in (("steps", steps), ("rank", rank), ("lr", lr), ("replay_fraction", replay_fraction)):
        if value is not None:
            kwargs[key] = value
    with loaded.lock:
        card = make_donor(loaded.model, loaded.tokenizer, concept, out, progress=progress.sub(0.05, 1.0), **kwargs)
    return {"out_dir": str(out), "card": card}


def prepare_builtins(with_donor: bool = True, progress: Optional[Progress] = None) -> dict[str, str]:
    """Dequantise SmolLM2 once and build the demo donor (each skipped when already cached)."""
    progress = progress or silent()
    out = {"smollm2-135m-instruct": str(prepare_smollm2(progress.sub(0, 0.1)))}
    if with_donor:
        out["smollm2-135m-instruct+concept"] = str(prepare_demo_donor(progress.sub(0.1, 1.0)))
    return out
