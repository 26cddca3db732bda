"""Non-diagnostic actions shared by the CLI and the UI: preparing built-ins, making a donor."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..core.data import builtin_concept_path, builtin_replay_path, builtin_retained_path, load_concept_set
from ..core.errors import GraftError
from ..core.params import param
from ..core.progress import Progress, silent
from ..loading.builtins import DEMO_DONOR_RECIPE, SMOLLM2, demo_donor_dir, demo_donor_ready, prepare_smollm2
from ..loading.models import ModelSpec, ModelStore, load_folder

# ``replay`` / ``retained`` default of build_donor: the bundled file (data/replay.jsonl,
# data/retained.jsonl). A path picks another file in the same format; None turns it off.
BUNDLED = "bundled"
NONE = "none"

# make_donor's tuned defaults (engine/adapters/donor.py; kept equal by a test, not imported: loading the
# trainer's module for a --help would be wasted time).
_STEPS, _RANK, _LR, _REPLAY_FRACTION = 90, 8, 2e-3, 0.25


@dataclass(frozen=True)
class MakeDonorParams:
    """``make-donor``: LoRA fine-tune a base model on a concept file. Typed like the tools' params,
    so the CLI flags, their help and their checks (finite numbers, ranges, paths) come from here."""

    concept: str = param(
        "", "Concept set of facts + questions (JSONL or a .json array) to teach the donor.", path="in"
    )
    out: str = param(
        "", "Output folder: merged/ (the donor model), adapter/ (PEFT LoRA) and card.json.", path="out_dir"
    )
    steps: int = param(_STEPS, "Training steps.", min=1, max=1_000_000)
    rank: int = param(_RANK, "LoRA rank r.", min=1, max=4096)
    lr: float = param(_LR, "Peak learning rate (warm-up then cosine).", min=1e-9, max=10.0)
    replay: str = param(
        BUNDLED,
        "General text (concept-set JSONL) mixed into training against forgetting: "
        "'bundled' = data/replay.jsonl, 'none' = the concept facts only, or a file.",
    )
    replay_fraction: float = param(
        _REPLAY_FRACTION, "Share of each batch drawn from the replay set, in [0, 1).", min=0.0, max=0.99
    )
    retained: str = param(
        BUNDLED,
        "Held-out general text whose perplexity before/after goes on the card: "
        "'bundled' = data/retained.jsonl, 'none' = not measured, or a file.",
    )
    seed: int = param(0, "Seed; training is deterministic for a seed.", min=0, max=2**31 - 1)
    device: str = param(
        "auto", "Where to train: auto (CUDA when present), cpu or cuda.", choices=("auto", "cpu", "cuda")
    )


@dataclass(frozen=True)
class MakeTwinParams:
    """``make-twin``: a function-preserving rotated twin of a model, typed like make-donor's params."""

    out: str = param("", "Output folder (Hugging Face format + twin.json).", path="out_dir")
    seed: int = param(0, "Seed of the rotation.", min=0, max=2**63 - 1)
    save_rotation: bool = param(False, "Also save the rotation Q (rotation.safetensors), for verification.")
    device: str = param(
        "auto", "Where to build it: auto (CUDA when present), cpu or cuda.", choices=("auto", "cpu", "cuda")
    )


def check_make_donor(params: MakeDonorParams) -> None:
    """Every input and output of a make-donor run, checked before the base model loads."""
    from ..core.outputs import check_input_file, check_output_dir

    if not params.concept.strip():
        raise GraftError("--concept is required: a concept set JSONL")
    if not params.out.strip():
        raise GraftError("--out is required: the donor's output folder")
    check_input_file(params.concept, "--concept")
    concept = load_concept_set(params.concept)  # its format, and something to learn, before the base loads
    if not concept.facts and not concept.train_qa():
        raise GraftError(f"concept set {concept.name} has no facts or train questions to learn from")
    for flag, value in (("--replay", params.replay), ("--retained", params.retained)):
        if value not in (BUNDLED, NONE):
            check_input_file(value, flag)
    check_output_dir(params.out, "--out")
    out = Path(params.out).expanduser()
    if out.exists() and any(out.iterdir()) and not (out / "card.json").exists():
        raise GraftError(f"{out} exists and is not a Graft donor folder: choose an empty or new folder")


def build_donor_from_params(
    base: ModelSpec,
    params: MakeDonorParams,
    store: Optional[ModelStore] = None,
    progress: Optional[Progress] = None,
) -> dict[str, Any]:
    check_make_donor(params)
    as_source = lambda v: None if v == NONE else v  # noqa: E731
    return build_donor(
        base,
        params.concept,
        params.out,
        steps=params.steps,
        rank=params.rank,
        lr=params.lr,
        replay=as_source(params.replay),
        replay_fraction=params.replay_fraction,
        retained=as_source(params.retained),
        seed=params.seed,
        device=params.device,
        store=store,
        progress=progress,
    )


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
    from ..adapters.donor import make_donor

    progress = progress or silent()
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()) and not (out / "card.json").exists():
        raise GraftError(f"{out} exists and is not a Graft donor folder: choose an empty or new folder")
    concept = load_concept_set(concept_path)
    replay_set = (
        None if replay is None else load_concept_set(builtin_replay_path() if replay == BUNDLED else replay)
    )
    retained_set = (
        None
        if retained is None
        else load_concept_set(builtin_retained_path() if retained == BUNDLED else retained)
    )
    store = store or ModelStore()
    loaded = store.get(base, device, "float32", progress.sub(0, 0.05))
    kwargs: dict[str, Any] = {
        "seed": seed,
        "base_name": base.ref,
        "replay": replay_set,
        "retained": retained_set,
    }
    for key, value in (("steps", steps), ("rank", rank), ("lr", lr), ("replay_fraction", replay_fraction)):
        if value is not None:
            kwargs[key] = value
    with loaded.lock:
        card = make_donor(
            loaded.model, loaded.tokenizer, concept, out, progress=progress.sub(0.05, 1.0), **kwargs
        )
    return {"out_dir": str(out), "card": card}


def prepare_builtins(with_donor: bool = True, progress: Optional[Progress] = None) -> dict[str, str]:
    """Dequantise SmolLM2 once and build the demo donor (each skipped when already cached)."""
    progress = progress or silent()
    out = {"smollm2-135m-instruct": str(prepare_smollm2(progress.sub(0, 0.1)))}
    if with_donor:
        out["smollm2-135m-instruct+concept"] = str(prepare_demo_donor(progress.sub(0.1, 1.0)))
    return out


def prepare_demo_donor(progress: Optional[Progress] = None, steps: Optional[int] = None) -> Path:
    """Build (once) SmolLM2 + LoRA on the bundled concept set, with the bundled replay set mixed
    in against forgetting and retained perplexity measured on the bundled retained set; returns
    the merged folder. A donor built by an older recipe is rebuilt (replaced only once done)."""
    from ..adapters.donor import make_donor

    progress = progress or silent()
    out = demo_donor_dir()
    if demo_donor_ready():
        return out / "merged"
    base_dir = prepare_smollm2(progress.sub(0.0, 0.1))
    base = load_folder(ModelSpec("builtin", SMOLLM2), base_dir, torch.device("cpu"), torch.float32)
    kwargs: dict[str, Any] = {}
    if steps is not None:
        kwargs["steps"] = steps
    make_donor(
        base.model,
        base.tokenizer,
        load_concept_set(builtin_concept_path()),
        out,
        replay=load_concept_set(builtin_replay_path()),
        retained=load_concept_set(builtin_retained_path()),
        base_name=SMOLLM2,
        progress=progress.sub(0.1, 1.0),
        **kwargs,
    )
    card_path = out / "card.json"
    card = json.loads(card_path.read_text())
    card["demo_recipe"] = DEMO_DONOR_RECIPE
    tmp = card_path.with_name(".card.json.tmp")
    tmp.write_text(json.dumps(card, indent=2))
    os.replace(tmp, card_path)
    return out / "merged"
