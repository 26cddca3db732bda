"""A PEFT LoRA adapter: resolve what the user gave to a checked adapter folder (:class:`AdapterRef`).

* **A PEFT LoRA folder** (``adapter_config.json`` + ``adapter_model.safetensors``), any target
  modules, any rank: :func:`resolve_adapter`; :func:`engine.adapters.lora_factors.adapter_deltas` then reads
  its factors as :class:`engine.adapters.lowrank.ModuleDelta`. A ``make-donor`` folder (its ``adapter/``)
  and the built-in demo donor name resolve to their adapter.
* A pickled weight file, a corrupt safetensors header or a config that is not a LoRA config is a
  one-line :class:`engine.core.errors.GraftError`, before any tensor is read.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..core.errors import GraftError
from ..core.jsonio import inside, loads_checked, read_json_file
from ..loading.modelfiles import check_safetensors, first_line

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ADAPTER_PICKLES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")


@dataclass
class AdapterRef:
    """A resolved PEFT LoRA adapter folder."""

    path: Path  # the folder holding adapter_config.json and adapter_model.safetensors
    config: dict[str, Any]
    base_hint: str = ""  # base_model_name_or_path, or the make-donor card's base name
    label: str = ""  # what the user gave, for display
    card: Optional[dict[str, Any]] = None  # the make-donor card.json, when the adapter is a Graft donor's

    @property
    def weights(self) -> Path:
        return self.path / ADAPTER_WEIGHTS

    def describe(self) -> dict[str, Any]:
        """JSON-safe summary of the adapter's configuration (for results and exports)."""
        c = self.config
        keep = (
            "peft_type",
            "r",
            "lora_alpha",
            "use_rslora",
            "use_dora",
            "fan_in_fan_out",
            "target_modules",
            "rank_pattern",
            "alpha_pattern",
            "base_model_name_or_path",
            "task_type",
            "peft_version",
        )
        cfg = {k: c.get(k) for k in keep if k in c}
        if isinstance(cfg.get("target_modules"), (set, tuple)):
            cfg["target_modules"] = sorted(cfg["target_modules"])
        return {
            "path": str(self.path),
            "label": self.label or str(self.path),
            "base_hint": self.base_hint,
            "config": json.loads(json.dumps(cfg, default=str)),
        }


def _read_json_file(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise GraftError(f"cannot read {path}: {first_line(exc)}") from None
    except UnicodeDecodeError:
        raise GraftError(f"{path} is not a valid {what} (not UTF-8 text)") from None
    return loads_checked(text, f"{path} ({what})")


def _donor_card(folder: Path) -> Optional[dict[str, Any]]:
    try:
        card = read_json_file(folder / "card.json")
    except GraftError:
        return None
    return card if isinstance(card, dict) else None


def _check_config(cfg: Any, path: Path) -> dict[str, Any]:
    where = path / ADAPTER_CONFIG
    if not isinstance(cfg, dict):
        raise GraftError(f"{where} is not a valid adapter config (not a JSON object)")
    ptype = str(cfg.get("peft_type") or "LORA").upper()
    if ptype != "LORA":
        raise GraftError(
            f"{where}: peft_type {ptype} is not LoRA; concept cartography reads LoRA adapters only"
        )
    r = cfg.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise GraftError(f"{where}: 'r' must be a positive integer, got {r!r}")
    alpha = cfg.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise GraftError(f"{where}: 'lora_alpha' must be a finite number, got {alpha!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        pat = cfg.get(key) or {}
        if not isinstance(pat, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
            for v in pat.values()
        ):
            raise GraftError(f"{where}: '{key}' must map module patterns to positive numbers")
        for p in pat:
            try:
                re.compile(str(p))
            except re.error:
                raise GraftError(f"{where}: '{key}' has an invalid pattern {p!r}") from None
    return cfg


def _adapter_folder(
    folder: Path, label: str, card: Optional[dict[str, Any]] = None, base_hint: str = ""
) -> AdapterRef:
    cfg_path = folder / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise GraftError(f"{folder} is not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    cfg = _check_config(_read_json_file(cfg_path, "adapter config"), folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        for name in _ADAPTER_PICKLES:
            if (folder / name).is_file():
                src, dst = folder / name, weights
                raise GraftError(
                    f"{src} holds the adapter as a Python pickle, which can run arbitrary code when it is "
                    "loaded, so "
                    "Graft reads only safetensors; where you trust the file, convert it with: python -c "
                    '"import torch; from safetensors.torch import save_file; '
                    f"save_file(torch.load('{src}', "
                    f"weights_only=True), '{dst}')\""
                )
        raise GraftError(f"{folder} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    check_safetensors(weights)
    if not base_hint:
        base_hint = str(cfg.get("base_model_name_or_path") or "")
    return AdapterRef(path=folder, config=cfg, base_hint=base_hint, label=label, card=card)


def resolve_adapter(text: str) -> AdapterRef:
    """Resolve what the user gave as an adapter:

    * a PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``), or its
      ``adapter_model.safetensors`` file;
    * a ``make-donor`` folder (``card.json`` + ``adapter/``; the card names the base model);
    * the built-in demo donor name ``smollm2-135m-instruct+concept`` (its ``adapter/``; it must
      have been built: ``python -m engine prepare``).

    Anything else, a missing or pickled weight file, a corrupt safetensors header or a config
    that is not a LoRA config, is one-line :class:`GraftError`."""
    from ..loading.models import DEMO_DONOR, SMOLLM2, demo_donor_dir, demo_donor_ready

    raw = (text or "").strip()
    if not raw:
        raise GraftError("no adapter given")
    if raw == DEMO_DONOR:
        folder = demo_donor_dir()
        if not demo_donor_ready() or not (folder / "adapter" / ADAPTER_CONFIG).is_file():
            raise GraftError(
                f"the demo donor {DEMO_DONOR} is not built yet: run `python -m engine prepare` "
                "(or build it on the Models page)"
            )
        card = _donor_card(folder)
        base = str((card or {}).get("base_name") or SMOLLM2)
        return _adapter_folder(folder / "adapter", DEMO_DONOR, card, base)
    p = Path(raw).expanduser()
    if not os.path.exists(p):  # False, not OSError, for a name too long for the file system
        raise GraftError(
            f"adapter not found: {raw} (give a PEFT adapter folder, a make-donor folder or {DEMO_DONOR})"
        )
    p = p.resolve()
    if p.is_file():
        if p.name == ADAPTER_WEIGHTS or p.name in _ADAPTER_PICKLES or p.name == ADAPTER_CONFIG:
            p = p.parent
        else:
            raise GraftError(
                f"{p} is a file, not a PEFT adapter folder (adapter_config.json + {ADAPTER_WEIGHTS})"
            )
    if (p / ADAPTER_CONFIG).is_file():
        card = _donor_card(p.parent) if (p.parent / "card.json").is_file() else None
        base = str(card.get("base_name") or "") if card else ""
        return _adapter_folder(p, raw, card, base)
    if (p / "card.json").is_file():
        card = _donor_card(p)
        if card is None:
            raise GraftError(f"{p / 'card.json'} is unreadable: is {p} a Graft donor folder?")
        sub = "adapter"
        if card.get("adapter_dir") not in (None, ""):  # a path read from a card stays inside its folder
            inside(p, card["adapter_dir"], "card.json adapter_dir")
            sub = card["adapter_dir"]
        if not (p / sub).is_dir():
            raise GraftError(
                f"{p} is a Graft donor folder without its {sub}/ adapter: was make-donor interrupted?"
            )
        return _adapter_folder(p / sub, raw, card, str(card.get("base_name") or ""))
    if (p / "config.json").is_file():
        raise GraftError(
            f"{p} is a full model folder, not a LoRA adapter: for a full fine-tune give it as "
            "--donor with its --base"
        )
    raise GraftError(
        f"{p} is not a PEFT adapter folder (no {ADAPTER_CONFIG}) nor a Graft donor folder (no card.json)"
    )
