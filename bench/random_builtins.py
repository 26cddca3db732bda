"""Random-weight stand-ins for the built-in models, with their exact configs and tokenizers, for
timing on a machine that cannot get the real weights (the GPU timings in docs/measurements.md were taken on
a lent device with no network and 64 MiB of luggage; the SmolLM2 GGUF alone is 98 MB). Speed
depends on the shapes only; the numbers the tools print on such models mean nothing. Usage:

    python bench/random_builtins.py export DIR   # here: configs + tokenizers (xz) of the prepared built-ins
    GRAFT_MODELS_HOME=/tmp/models python bench/random_builtins.py build DIR [--no-gemma]   # there

``build`` writes SmolLM2-135M-shaped weights (seed 0), the demo donor as those weights plus a rank-8
change in every matrix (its card copied, so Graft takes it as built), and Gemma-3-270M-shaped
weights (seed 1). Never point GRAFT_MODELS_HOME at a cache holding the real models: they would be
replaced.
"""

from __future__ import annotations

import argparse
import lzma
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja")
MODELS = {
    "smol": "smollm2-135m-instruct",
    "donor": "smollm2-135m-instruct+concept/merged",
    "gemma": "gemma3-270m",
}


def export(out: Path) -> None:
    from engine.core.paths import models_dir

    for key, rel in MODELS.items():
        src, dst = models_dir() / rel, out / key
        dst.mkdir(parents=True, exist_ok=True)
        for f in FILES:
            if (src / f).exists():
                shutil.copy(src / f, dst / f)
        (dst / "tokenizer.json.xz").write_bytes(
            lzma.compress((src / "tokenizer.json").read_bytes(), preset=9)
        )
    shutil.copy(models_dir() / "smollm2-135m-instruct+concept" / "card.json", out / "donor" / "card.json")


def build_one(src: Path, dst: Path, seed: int, delta: float = 0.0) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    t0 = time.time()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32)
    if delta:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 2 and "embed" not in name:
                    a, b = torch.randn(p.shape[0], 8, generator=g), torch.randn(8, p.shape[1], generator=g)
                    p.add_(delta * p.std() * (a @ b) / 8**0.5)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    for f in FILES:
        if (src / f).exists():
            shutil.copy(src / f, dst / f)
    (dst / "tokenizer.json").write_bytes(lzma.decompress((src / "tokenizer.json.xz").read_bytes()))
    print(f"built {dst} in {time.time() - t0:.1f}s", flush=True)


def build(src: Path, gemma: bool) -> None:
    home = Path(os.environ["GRAFT_MODELS_HOME"])
    build_one(src / "smol", home / MODELS["smol"], 0)
    build_one(src / "donor", home / MODELS["donor"], 0, delta=0.3)
    shutil.copy(src / "donor" / "card.json", home / MODELS["donor"] / ".." / "card.json")
    if gemma:
        build_one(src / "gemma", home / MODELS["gemma"], 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("export", "build"))
    ap.add_argument("dir", type=Path)
    ap.add_argument("--no-gemma", action="store_true")
    args = ap.parse_args()
    if args.what == "export":
        export(args.dir)
    elif "GRAFT_MODELS_HOME" not in os.environ:
        sys.exit("build: set GRAFT_MODELS_HOME to an empty folder (the real models' cache would be replaced)")
    else:
        build(args.dir, not args.no_gemma)


if __name__ == "__main__":
    main()
