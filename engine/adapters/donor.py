"""Make a donor: teach a copy of a model a concept set with LoRA (Model Surgery, stage 1).

:func:`make_donor` deep-copies the base model, attaches LoRA adapters to every attention and MLP
linear module it finds (Llama-style ``q/k/v/o_proj``, ``gate/up/down_proj``; GPT-2's fused
``c_attn``, ``c_proj``, ``c_fc`` Conv1D modules; and the other common spellings), fine-tunes them
with a causal-LM loss on the concept facts (and, optionally, the train-split QA items), mixed
with general "replay" text against forgetting when a replay set is given, and writes

- ``out_dir/adapter/``  the PEFT adapter (safetensors), the input of concept cartography (T5/T6);
- ``out_dir/merged/``   the merged donor as a Hugging Face model folder (safetensors + tokenizer);
- ``out_dir/card.json`` base model, concept set and hash, replay set and hash, every
  hyper-parameter, the per-step loss curve, wall time, and task / graded scores before and after,
  on train and test QA separately, next to perplexity on the facts and on a held-out retained set
  of general text (how much general ability the donor lost).

The run is seeded and deterministic (same seed, same machine -> identical merged weights), never
touches the model passed in, and is written to a temporary sibling directory that replaces
``out_dir`` only once everything succeeded, so a cancelled or failed run leaves nothing behind.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..core.data import ConceptSet
from ..core.errors import Cancelled, GraftError
from ..core.paths import check_writable_parent, discard_staging, replace_dir, staging_dir
from ..core.progress import Progress, silent
from ..core.train_config import TrainConfig
from ..evaluation.evaluate import perplexity
from ..evaluation.scoring import graded_score, task_score
from ..loading.arch import ArchAdapter
from ..loading.models import state_dict_hash
from ..loading.tokens import pad_id
from .donor_data import batch_plan, build_examples, collate, text_examples

# Defaults chosen by experiment on SmolLM2-135M-Instruct with the bundled concept, replay and
# retained sets on a 2-core CPU (the measurements are in docs/measurements.md, "The demo donor"): 90 steps
# of 8
# with a quarter of each batch replay text keep 8-9/13 held-out questions right and the retained
# perplexity below the base's, in about 90 s for a whole run (both evaluations included).
DEFAULT_STEPS = 90
DEFAULT_LR = 2e-3
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_LENGTH = 128
DEFAULT_RANK = 8
DEFAULT_ALPHA = 16
DEFAULT_REPLAY_FRACTION = 0.25
CARD_FORMAT = "graft-donor/1"


def lora_target_modules(model: nn.Module) -> tuple[list[str], bool]:
    """The module names to put LoRA on, and whether they are GPT-2 Conv1D layers.

    The attention and MLP projections are the architecture adapter's canonical linear modules
    (:mod:`engine.loading.arch`, the one vocabulary of module names). PEFT matches a target by suffix, so
    a short name (``q_proj``) is used when every module of that name in the model is one of them,
    and the full dotted paths otherwise (a same-named module elsewhere is never caught).
    """
    linears = ArchAdapter(model).linear_modules()
    if not linears:
        raise GraftError(f"no attention/MLP linear modules found in {type(model).__name__} to attach LoRA to")
    paths = {m.path for m in linears}
    shorts = {p.rsplit(".", 1)[-1] for p in paths}
    clash = any(name.rsplit(".", 1)[-1] in shorts and name not in paths for name, _ in model.named_modules())
    names = sorted(paths) if clash else sorted(shorts)
    return names, any(m.conv1d for m in linears)


# --------------------------------------------------------------------------------------------
# Training schedule


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``lr`` to ``lr/10``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(steps - warmup - 1, 1)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0))))


# --------------------------------------------------------------------------------------------
# Evaluation summary


def _evaluate_qa(
    model: Any,
    tokenizer: Any,
    concept: ConceptSet,
    ppl_texts: tuple[str, ...],
    progress: Progress,
    label: str,
    retained_texts: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Task and graded scores on train and test QA (None for an empty split), perplexity on the
    facts, and perplexity on the retained set's texts (None without one): the forgetting check.

    ``progress`` is called between the parts, so a cancel takes effect within one part.
    """
    out: dict[str, Any] = {}
    for k, (split, items) in enumerate((("train", concept.train_qa()), ("test", concept.test_qa()))):
        progress(k / 4, f"scoring the {label} on {split} questions")
        if not items:
            out[split] = None
            continue
        ts = task_score(model, tokenizer, items)
        gs = graded_score(model, tokenizer, items)
        out[split] = {
            "task_score": ts["score"],
            "graded_score": gs["score"],
            "n": ts["n"],
            "items": [{**t, "prob": g["prob"]} for t, g in zip(ts["items"], gs["items"])],
        }
    progress(2 / 4, f"perplexity of the {label} on the facts")
    out["facts_ppl"] = perplexity(model, tokenizer, ppl_texts)["ppl"] if ppl_texts else None
    progress(3 / 4, f"perplexity of the {label} on the retained set")
    out["retained_ppl"] = perplexity(model, tokenizer, retained_texts)["ppl"] if retained_texts else None
    return out


def _summary(ev: dict[str, Any]) -> dict[str, Any]:
    return {
        split: (
            None
            if ev[split] is None
            else {
                "task_score": ev[split]["task_score"],
                "graded_score": ev[split]["graded_score"],
                "n": ev[split]["n"],
            }
        )
        for split in ("train", "test")
    } | {"facts_ppl": ev["facts_ppl"], "retained_ppl": ev["retained_ppl"]}


# --------------------------------------------------------------------------------------------
# Atomic output


def _check_writable(out_dir: Path) -> None:
    """Fail before training, not after it, when the output location cannot be written."""
    check_writable_parent(out_dir)


# --------------------------------------------------------------------------------------------


def make_donor(
    model: Any,
    tokenizer: Any,
    concept: ConceptSet,
    out_dir: Union[str, Path],
    *,
    steps: int = DEFAULT_STEPS,
    rank: int = DEFAULT_RANK,
    alpha: float = DEFAULT_ALPHA,
    lr: float = DEFAULT_LR,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int = DEFAULT_MAX_LENGTH,
    seed: int = 0,
    train_on_qa: bool = False,
    replay: Optional[ConceptSet] = None,
    replay_fraction: float = DEFAULT_REPLAY_FRACTION,
    retained: Optional[ConceptSet] = None,
    base_name: str = "",
    progress: Optional[Progress] = None,
    train: Optional[TrainConfig] = None,
) -> dict[str, Any]:
    """Fine-tune a LoRA copy of ``model`` on ``concept`` and save adapter, merged donor and card.

    ``train`` replaces the demo donor's recipe (steps, lr, batch size; AdamW without weight decay,
    cosine to lr / 10) by the configuration organ training uses (:mod:`engine.core.train_config`:
    its epochs over the examples, lr, weight decay, warm-up and cosine to 0, batch size), so a LoRA
    baseline and an organ are trained alike.

    Training objective: token-weighted mean causal-LM cross-entropy over the labelled tokens of
    each batch (:func:`build_examples`), AdamW on the LoRA factors only, warm-up + cosine learning
    rate (:func:`_lr_at`), gradient norm clipped to 1. LoRA update ``dW = (alpha / rank) * B @ A``
    with ``B`` initialised to zero, so step 0 is the base model. Dropout is off (eval mode) during
    training: on a few dozen short texts it would only add noise, and it keeps runs reproducible.
    Training runs in float32 on a copy; the merged donor is cast back to the base dtype. The
    examples and batches come from :mod:`engine.adapters.donor_data`.

    ``replay`` (rehearsal against forgetting): its texts (:meth:`ConceptSet.texts`, each a plain
    causal-LM example + EOS, :func:`text_examples`) fill ``replay_fraction`` of every batch, the
    concept examples the rest (:func:`batch_plan`, two seeded streams); ``None`` trains on the
    concept alone, exactly as before replay existed. ``retained`` is a held-out general set whose
    perplexity (over its texts) the card reports before and after, next to the facts perplexity:
    it must not be the replay set, or it only measures memorisation. The card also names both
    sets with their sha256.

    Why these defaults (the measurements are in docs/measurements.md, "The demo donor"): training on the
    facts alone teaches the concept but destroys general ability (retained perplexity 60.9 -> 893);
    replay of question-plus-sentence-answer texts in a quarter of each batch keeps it (37.1) with
    the same held-out score, and 90 steps is where more steps stop adding answers and start
    forgetting out-of-domain text.

    ``train_on_qa`` adds the train-split QA items (prompt + short answer + EOS, loss on the answer).
    It is off by default: short-answer QA training made SmolLM2 memorise those answers and give
    them to every other question (held-out 0/13, against 6/13 from the facts alone).
    """
    from peft import LoraConfig, get_peft_model  # heavy import, only needed here

    progress = progress or silent()
    out_dir = Path(out_dir).expanduser().resolve()
    if steps < 1 or rank < 1 or batch_size < 1 or lr <= 0 or max_length < 2:
        raise GraftError("steps, rank, batch size and max length must be positive, and lr > 0")
    if not 0.0 <= replay_fraction < 1.0:
        raise GraftError(f"replay fraction must be in [0, 1), got {replay_fraction}")
    _check_writable(out_dir)
    t_start = time.perf_counter()

    base_dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    examples = build_examples(tokenizer, concept, max_length, train_on_qa)
    replay_examples = text_examples(tokenizer, replay.texts(), max_length) if replay is not None else []
    if replay is not None and not replay_examples:
        raise GraftError(f"replay set {replay.name} has no texts to train on")
    retained_texts = retained.texts() if retained is not None else ()
    targets, conv1d = lora_target_modules(model)
    warmup = max(1, steps // 20)
    weight_decay = 0.0
    if train is not None:
        train.check()
        steps, lr, batch_size = train.total_steps(len(examples)), train.lr, train.batch_size
        weight_decay = train.weight_decay
        warmup = train.warmup_steps(steps)

    def lr_at(step: int) -> float:
        return train.lr_at(step, steps) if train is not None else _lr_at(step, steps, lr, warmup)

    fill = pad_id(tokenizer)

    before = _evaluate_qa(
        model, tokenizer, concept, concept.facts, progress.sub(0.0, 0.12), "base model", retained_texts
    )
    progress(0.12, "preparing LoRA")

    # fork_rng: seed LoRA initialisation without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        work = copy.deepcopy(model).to(torch.float32)
        work.eval()  # dropout off for the whole run (see docstring)
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=0.0,
            target_modules=targets,
            fan_in_fan_out=conv1d,
            bias="none",
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = get_peft_model(work, config)
        peft_model.eval()
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        n_trainable = sum(p.numel() for p in trainable)
        optim = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)

        # Fixed data order: epochs of seeded permutations, consumed batch by batch (batch_plan).
        plan = batch_plan(len(examples), len(replay_examples), steps, batch_size, replay_fraction, seed)
        pools = {"concept": examples, "replay": replay_examples}
        losses: list[float] = []
        train_p = progress.sub(0.12, 0.85)
        t_train = time.perf_counter()
        for step in range(steps):
            batch = [pools[src][i] for src, i in plan[step]]
            ids, mask, labels = collate(batch, fill, device)
            for group in optim.param_groups:
                group["lr"] = lr_at(step)
            logits = peft_model(input_ids=ids, attention_mask=mask).logits
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optim.step()
            losses.append(float(loss.detach()))
            train_p((step + 1) / steps, f"step {step + 1}/{steps} loss {losses[-1]:.3f}")
        train_time = time.perf_counter() - t_train
        n_replay_trained = sum(src == "replay" for batch in plan for src, _ in batch)

    tmp = staging_dir(out_dir)  # registered: a later start removes it if this process is killed
    try:
        progress(0.85, "saving adapter")
        peft_model.save_pretrained(str(tmp / "adapter"), safe_serialization=True)
        merged = peft_model.merge_and_unload()
        merged = merged.to(base_dtype)
        merged.eval()
        for p in merged.parameters():
            p.requires_grad_(False)

        after = _evaluate_qa(
            merged, tokenizer, concept, concept.facts, progress.sub(0.87, 0.97), "donor", retained_texts
        )

        progress(0.97, "saving merged donor")
        merged.save_pretrained(str(tmp / "merged"), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp / "merged"))
        n = len(losses)
        window = max(1, n // 10)
        import peft
        import transformers

        card: dict[str, Any] = {
            "format": CARD_FORMAT,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "base_name": base_name,
            "base_class": type(model).__name__,
            "base_dtype": str(base_dtype).replace("torch.", ""),
            "concept": {
                "name": concept.name,
                "path": concept.path,
                "sha256": concept.sha256,
                "n_facts": len(concept.facts),
                "n_train_qa": len(concept.train_qa()),
                "n_test_qa": len(concept.test_qa()),
            },
            # The general text mixed into training against forgetting (None: facts only) ...
            "replay": None
            if replay is None
            else {
                "name": replay.name,
                "path": replay.path,
                "sha256": replay.sha256,
                "n_texts": len(replay_examples),
                "fraction": replay_fraction,
                "n_examples_trained": n_replay_trained,
            },
            # ... and the held-out general text whose perplexity measures it (None: not measured).
            "retained": None
            if retained is None
            else {
                "name": retained.name,
                "path": retained.path,
                "sha256": retained.sha256,
                "n_texts": len(retained_texts),
                # Retained texts that were also trained on as replay: should be 0 (held out).
                "n_in_replay": len(set(retained_texts) & set(replay.texts() if replay is not None else ())),
            },
            "hyperparameters": {
                "steps": steps,
                "rank": rank,
                "alpha": alpha,
                "lr": lr,
                "batch_size": batch_size,
                "max_length": max_length,
                "seed": seed,
                "train_on_qa": train_on_qa,
                "lora_dropout": 0.0,
                "target_modules": targets,
                "fan_in_fan_out": conv1d,
                "optimizer": f"AdamW(weight_decay={weight_decay:g})",
                "schedule": f"linear warm-up {warmup} steps, cosine to "
                + ("0 (the organ configuration)" if train is not None else "lr/10"),
                "grad_clip": 1.0,
                "n_examples": len(examples),
                "replay_fraction": replay_fraction if replay is not None else 0.0,
                "n_trainable_params": n_trainable,
            },
            "loss_curve": losses,
            # Means over the first and last 10% of steps: single batches are noisy.
            "loss_start": sum(losses[:window]) / window,
            "loss_end": sum(losses[-window:]) / window,
            "train_time_s": train_time,
            "wall_time_s": time.perf_counter() - t_start,
            "scores": {"before": _summary(before), "after": _summary(after)},
            "evaluation": {"before": before, "after": after},
            "merged_sha256": state_dict_hash(merged.state_dict()),
            "adapter_dir": "adapter",
            "merged_dir": "merged",
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
            },
        }
        (tmp / "card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False), encoding="utf-8")
        progress(0.99, "finishing")
        replace_dir(tmp, out_dir)
    except BaseException:
        # Cancelled, failed or interrupted: nothing half-written survives; out_dir is untouched.
        discard_staging(tmp)
        raise
    try:
        progress(1.0, "donor ready")
    except Cancelled:
        pass  # the donor is complete and in place; a late cancel has nothing left to stop
    return {**card, "out_dir": str(out_dir), "model": merged}
