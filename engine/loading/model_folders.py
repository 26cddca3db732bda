"""Graft's own model folders on disk and their provenance cards: a make-donor folder (``card.json``
+ the merged model in ``merged/``), a saved transplant (``surgery.json``), a rotated twin
(``twin.json``); and the local folder a model spec loads from, read without running anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ..core.errors import GraftError
from ..core.jsonio import inside, read_json_file
from .hf_folder import cached_hub_folder

if TYPE_CHECKING:  # pragma: no cover
    from .models import ModelSpec

# A make-donor folder (engine/adapters/donor.py): DONOR_CARD plus the merged model in DONOR_MERGED/.
DONOR_CARD = "card.json"
DONOR_MERGED = "merged"
SURGERY_CARD = "surgery.json"  # the card of a saved transplant (written by engine/surgery/transplant.py)
TWIN_CARD = "twin.json"  # a rotated twin (engine/surgery/twin.py writes it)


def donor_merged_dir(folder: Path) -> Optional[Path]:
    """The merged model of a make-donor folder (``card.json`` + ``merged/config.json``), else None.

    The card's ``merged_dir`` names the subfolder (default ``merged``); a name that leaves the
    folder is ignored. A donor folder whose merged model is missing is an error, not None."""
    card_path = folder / DONOR_CARD
    if not card_path.is_file():
        return None
    name = DONOR_MERGED
    try:
        card = read_json_file(card_path)
    except GraftError:
        card = None
    if isinstance(card, dict) and card.get("merged_dir") not in (None, ""):
        inside(
            folder, card["merged_dir"], "card.json merged_dir"
        )  # refused, with the field and path, if it leaves
        name = str(card["merged_dir"])
    merged = folder / name
    if (merged / "config.json").is_file():
        return merged
    if merged.exists() or (folder / "adapter").is_dir():
        raise GraftError(
            f"{folder} is a Graft donor folder but {name}/ holds no model (no config.json): "
            "was make-donor interrupted? build it again"
        )
    return None


def read_json(path: Path) -> Optional[Any]:
    """A JSON file's value, or None when it is missing or not valid (checked: size, depth, finite numbers)."""
    if not path.is_file():
        return None
    try:
        return read_json_file(path)
    except GraftError:
        return None


def local_folder(spec: "ModelSpec") -> Optional[Path]:
    """The folder a spec loads from, when it exists already; never builds, converts or downloads."""
    if spec.kind == "path":
        return Path(spec.ref)
    if spec.kind == "hub":
        return cached_hub_folder(spec.ref)  # not cached: nothing would run either
    return None  # built-ins are Graft's own folders; GGUF caches are written by Graft


def _donor_summary(card: dict[str, Any]) -> str:
    hp = card.get("hyperparameters") if isinstance(card.get("hyperparameters"), dict) else {}
    concept = card.get("concept") if isinstance(card.get("concept"), dict) else {}
    parts = [
        f"Graft donor: {card.get('base_name') or card.get('base_class') or 'base model'} + LoRA"
        + (f" rank {hp['rank']}" if "rank" in hp else "")
        + (f", {hp['steps']} steps" if "steps" in hp else "")
        + (f" on {concept['name']}" if concept.get("name") else "")
    ]
    try:
        before = card["scores"]["before"]["test"]["task_score"]
        after = card["scores"]["after"]["test"]["task_score"]
        parts.append(f"test score {before:.2f} -> {after:.2f}")
    except (KeyError, TypeError, ValueError):
        pass
    if card.get("created"):
        parts.append(f"built {card['created']}")
    return "; ".join(parts)


def _surgery_summary(card: dict[str, Any]) -> str:
    def short(x: Any) -> str:
        return Path(str(x)).name if x else "?"

    mods = card.get("modules") if isinstance(card.get("modules"), list) else []
    res = card.get("results") if isinstance(card.get("results"), dict) else {}
    text = (
        f"Graft transplant: {card.get('operation', 'surgery')} of {len(mods)} module(s) from "
        f"{short(card.get('donor'))} into {short(card.get('target'))}"
    )
    extra = []
    for key, label in (("tir", "TIR"), ("recovery", "recovery")):
        if isinstance(res.get(key), (int, float)):
            extra.append(f"{label} {res[key]:.3f}")
    if card.get("saved_at"):
        extra.append(f"saved {card['saved_at']}")
    return text + ("; " + "; ".join(extra) if extra else "")


def donor_card(folder: Path) -> dict[str, Any]:
    """The provenance card of a make-donor folder (see :func:`engine.loading.models.model_card`)."""
    card = read_json(folder / DONOR_CARD)
    if not isinstance(card, dict):
        return {
            "kind": "make-donor",
            "path": str(folder),
            "summary": f"Graft donor ({DONOR_CARD} is unreadable)",
            "card": {},
        }
    return {"kind": "make-donor", "path": str(folder), "summary": _donor_summary(card), "card": card}


def folder_card(p: Path) -> Optional[dict[str, Any]]:
    """The provenance card of model folder ``p`` when Graft made it (a saved transplant, a rotated
    twin, a make-donor folder's merged model); None otherwise (see
    :func:`engine.loading.models.model_card`)."""
    if (p / SURGERY_CARD).is_file():
        card = read_json(p / SURGERY_CARD)
        if not isinstance(card, dict):
            return {
                "kind": "transplant",
                "path": str(p),
                "summary": f"Graft transplant ({SURGERY_CARD} is unreadable)",
                "card": {},
            }
        return {"kind": "transplant", "path": str(p), "summary": _surgery_summary(card), "card": card}
    if (p / TWIN_CARD).is_file():
        card = read_json(p / TWIN_CARD)
        card = card if isinstance(card, dict) else {}
        base = card.get("base", {}) if isinstance(card.get("base"), dict) else {"ref": card.get("base")}
        return {
            "kind": "twin",
            "path": str(p),
            "card": card,
            "summary": f"Graft rotated twin of {base.get('ref') or '?'} (seed {card.get('seed', '?')}): "
            "same function, rotated residual stream",
        }
    if (p.parent / DONOR_CARD).is_file():
        try:
            if donor_merged_dir(p.parent) == p:
                return donor_card(p.parent)
        except GraftError:
            return None
    return None


def model_path_kind(p: Path) -> tuple[str, str]:
    """``(kind, ref)`` of an existing resolved path given as a model (see
    :meth:`engine.loading.models.ModelSpec.parse`): a ``.gguf`` file or a folder holding exactly one, a
    Hugging Face folder, or a make-donor folder (its merged model). An adapter folder or anything
    else is a one-line GraftError."""
    if p.is_file() and p.suffix.lower() == ".gguf":
        return "gguf", str(p)
    if p.is_dir():
        if not (p / "config.json").exists():
            merged = donor_merged_dir(p)
            if merged is not None:
                return "path", str(merged)
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return "gguf", str(ggufs[0])
            if (p / "adapter_config.json").is_file():
                if donor_merged_dir(p.parent) is not None:
                    raise GraftError(
                        f"{p} is the LoRA adapter of a Graft donor, not a full model: "
                        f"pass the donor folder {p.parent} (its merged model)"
                    )
                raise GraftError(
                    f"{p} is a PEFT adapter (adapter_config.json), not a full model: "
                    "merge it into its base model first (merge_and_unload + save_pretrained)"
                )
            raise GraftError(f"{p} is not a Hugging Face model folder (no config.json)")
        return "path", str(p)
    raise GraftError(f"{p} is neither a model folder nor a .gguf file")
