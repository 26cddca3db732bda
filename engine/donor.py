"""Make a donor: teach a copy of a model a concept set with LoRA (Model Surgery, stage 1).

:func:`make_donor` deep-copies the base model, attaches LoRA adapters to every attention and MLP
linear module it finds (Llama-style ``q/k/v/o_proj``, ``gate/up/down_proj``; GPT-2's fused
``c_attn``, ``c_proj``, ``c_fc`` Conv1D modules; and the other common spellings), fine-tunes them
with a causal-LM loss on the concept facts (and, optionally, the train-split QA items), and
writes

- ``out_dir/adapter/``  the PEFT adapter (safetensors), the input of concept cartography (T5/T6);
- ``out_dir/merged/``   the merged donor as a Hugging Face model folder (safetensors + tokenizer);
- ``out_dir/card.json`` base model, concept set and hash, every hyper-parameter, the per-step loss
  curve, wall time, and task / graded scores before and after, on train and test QA separately.

The run is seeded and deterministic (same seed, same machine -> identical merged weights), never
touches the model passed in, and is written to a temporary sibling directory that replaces
``out_dir`` only once everything succeeded, so a cancelled or failed run leaves nothing behind.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .data import ConceptSet
from .errors import Cancelled, GraftError
from .evaluate import answer_ids, encode_prompt, encode_text, graded_score, pad_id, perplexity, task_score
from .progress import Progress, silent
from .paths import replace_dir

# Defaults measured on SmolLM2-135M-Instruct with the bundled concept set on a 2-core CPU: the
# fact loss plateaus (~0.3) after about 60 steps of 8; 120 steps leave margin and take about
# 0.8-1.2 s each on an idle machine, so a whole run (with both evaluations) is 3-4 minutes.
DEFAULT_STEPS = 120
DEFAULT_LR = 2e-3
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_LENGTH = 128
CARD_FORMAT = "graft-donor/1"

# Last path component of linear modules that carry attention or MLP weights, across the common
# decoder families. Anything else (embeddings, lm_head, norms, classifier heads) is left alone.
ATTENTION_NAMES = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "c_attn", "query_key_value", "Wqkv",
     "out_proj", "dense", "query", "key", "value", "wq", "wk", "wv", "wo"}
)
MLP_NAMES = frozenset(
    {"up_proj", "gate_proj", "down_proj", "gate_up_proj", "c_fc", "c_proj", "fc1", "fc2", "fc_in",
     "fc_out", "dense_h_to_4h", "dense_4h_to_h", "w1", "w2", "w3"}
)
_EXCLUDED = frozenset({"lm_head", "embed_out", "score", "classifier"})


def _is_conv1d(mod: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D: a linear layer whose weight is stored (in, out).
    return type(mod).__name__ == "Conv1D"


def _in_block(name: str) -> bool:
    """True for modules inside a numbered transformer block (``...layers.3.mlp.up_proj``)."""
    return any(part.isdigit() for part in name.split(".")[:-1])


def lora_target_modules(model: nn.Module) -> tuple[list[str], bool]:
    """The short module names to put LoRA on, and whether they are GPT-2 Conv1D layers.

    A short name qualifies when it is a known attention/MLP projection name and every module
    with that name is an ``nn.Linear`` or ``Conv1D`` inside a numbered block, so that PEFT's
    suffix matching cannot catch a same-named module elsewhere.
    """
    known = ATTENTION_NAMES | MLP_NAMES
    seen: dict[str, bool] = {}  # short name -> all occurrences are eligible
    conv = False
    for name, mod in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if short not in known:
            continue
        eligible = isinstance(mod, nn.Linear) or _is_conv1d(mod)
        eligible = eligible and _in_block(name) and not (set(name.split(".")) & _EXCLUDED)
        seen[short] = seen.get(short, True) and eligible
        if eligible and _is_conv1d(mod):
            conv = True
    names = sorted(s for s, ok in seen.items() if ok)
    if not names:
        raise GraftError(f"no attention/MLP linear modules found in {type(model).__name__} to attach LoRA to")
    return names, conv


# --------------------------------------------------------------------------------------------
# Training data


def build_examples(
    tokenizer: Any, concept: ConceptSet, max_length: int, train_on_qa: bool = False
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) pairs: every fact, then (if ``train_on_qa``) every train-split QA item.

    Facts are plain causal-LM texts followed by EOS (loss on every predicted token). A QA item is
    ``format_prompt(question)`` + answer + EOS with the loss only on the answer and the EOS (the
    prompt is label -100), which teaches answering without teaching the model to reproduce the
    prompt. The answer tokens are exactly those the graded score measures.
    """
    eos = tokenizer.eos_token_id
    tail = [int(eos)] if eos is not None else []
    examples: list[tuple[list[int], list[int]]] = []
    for fact in concept.facts:
        ids = (encode_text(tokenizer, fact, max_length) + tail)[:max_length]
        examples.append((ids, list(ids)))
    for item in concept.train_qa() if train_on_qa else ():
        prompt = encode_prompt(tokenizer, item.question)
        answer = answer_ids(tokenizer, item.question, item.answer) + tail
        ids = (prompt + answer)[:max_length]
        labels = ([-100] * len(prompt) + answer)[:max_length]
        examples.append((ids, labels))
    examples = [e for e in examples if sum(l != -100 for l in e[1][1:]) > 0]
    if not examples:
        what = "facts or train questions" if train_on_qa else "facts"
        raise GraftError(f"concept set {concept.name} has no {what} to learn from")
    return examples


def _collate(batch: list[tuple[list[int], list[int]]], fill: int, device: torch.device):
    width = max(len(ids) for ids, _ in batch)
    ids_t = torch.full((len(batch), width), fill, dtype=torch.long)
    lab_t = torch.full((len(batch), width), -100, dtype=torch.long)
    mask_t = torch.zeros((len(batch), width), dtype=torch.long)
    for r, (ids, labels) in enumerate(batch):
        ids_t[r, : len(ids)] = torch.tensor(ids)
        lab_t[r, : len(labels)] = torch.tensor(labels)
        mask_t[r, : len(ids)] = 1
    return ids_t.to(device), mask_t.to(device), lab_t.to(device)


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``lr`` to ``lr/10``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(steps - warmup - 1, 1)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0))))


# --------------------------------------------------------------------------------------------
# Evaluation summary


def _evaluate_qa(
    model: Any, tokenizer: Any, concept: ConceptSet, ppl_texts: tuple[str, ...], progress: Progress, label: str
) -> dict[str, Any]:
    """Task and graded scores on train and test QA (None for an empty split), and fact perplexity.

    ``progress`` is called between the parts, so a cancel takes effect within one part.
    """
    out: dict[str, Any] = {}
    for k, (split, items) in enumerate((("train", concept.train_qa()), ("test", concept.test_qa()))):
        progress(k / 3, f"scoring the {label} on {split} questions")
        if not items:
            out[split] = None
            continue
        ts = task_score(model, tokenizer, items)
        gs = graded_score(model, tokenizer, items)
        out[split] = {
            "task_score": ts["score"],
            "graded_score": gs["score"],
            "n": ts["n"],
            "items": [
                {**t, "prob": g["prob"]} for t, g in zip(ts["items"], gs["items"])
            ],
        }
    progress(2 / 3, f"perplexity of the {label} on the facts")
    out["facts_ppl"] = perplexity(model, tokenizer, ppl_texts)["ppl"] if ppl_texts else None
    return out


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 over the state dict (sorted names, dtype, shape and raw bytes): a weight identity."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _summary(ev: dict[str, Any]) -> dict[str, Any]:
    return {
        split: (None if ev[split] is None else {"task_score": ev[split]["task_score"], "graded_score": ev[split]["graded_score"], "n": ev[split]["n"]})
        for split in ("train", "test")
    } | {"facts_ppl": ev["facts_ppl"]}


# --------------------------------------------------------------------------------------------
# Atomic output


def _check_writable(out_dir: Path) -> None:
    """Fail before training, not after it, when the output location cannot be written."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GraftError(f"cannot create {out_dir.parent}: {e.strerror or e}") from None
    if not os.access(out_dir.parent, os.W_OK):
        raise GraftError(f"output folder {out_dir.parent} is not writable")
    if out_dir.exists() and not out_dir.is_dir():
        raise GraftError(f"output path {out_dir} exists and is not a folder")


# --------------------------------------------------------------------------------------------


def make_donor(
    model: Any,
    tokenizer: Any,
    concept: ConceptSet,
    out_dir: Union[str, Path],
    *,
    steps: int = DEFAULT_STEPS,
    rank: int = 8,
    alpha: float = 16,
    lr: float = DEFAULT_LR,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int = DEFAULT_MAX_LENGTH,
    seed: int = 0,
    train_on_qa: bool = False,
    base_name: str = "",
    progress: Optional[Progress] = None,
) -> dict[str, Any]:
    """Fine-tune a LoRA copy of ``model`` on ``concept`` and save adapter, merged donor and card.

    Training objective: token-weighted mean causal-LM cross-entropy over the labelled tokens of
    each batch (:func:`build_examples`), AdamW on the LoRA factors only, warm-up + cosine learning
    rate (:func:`_lr_at`), gradient norm clipped to 1. LoRA update ``dW = (alpha / rank) * B @ A``
    with ``B`` initialised to zero, so step 0 is the base model. Dropout is off (eval mode) during
    training: on a few dozen short texts it would only add noise, and it keeps runs reproducible.
    Training runs in float32 on a copy; the merged donor is cast back to the base dtype.

    ``train_on_qa`` adds the train-split QA items (prompt + short answer + EOS, loss on the
    answer) to the facts. It is off by default because, measured on SmolLM2-135M-Instruct with
    the bundled set, short-answer QA training makes the model memorise those answers and answer
    every other question with one of them: train exact score 1.0 but held-out 0/13. Facts alone
    let the model answer unseen questions in its own words (held-out 6/13, all 38 paraphrased
    questions 24/38). With it off, train and test questions are both unseen, and the split only
    says which ones ``train_on_qa`` would use.

    Returns the card (as written to ``card.json``) plus ``"model"``: the merged donor in memory,
    in eval mode, identical to what ``merged/`` reloads to.
    """
    from peft import LoraConfig, get_peft_model  # heavy import, only needed here

    progress = progress or silent()
    out_dir = Path(out_dir).expanduser().resolve()
    if steps < 1 or rank < 1 or batch_size < 1 or lr <= 0 or max_length < 2:
        raise GraftError("steps, rank, batch size and max length must be positive, and lr > 0")
    _check_writable(out_dir)
    t_start = time.perf_counter()

    base_dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    examples = build_examples(tokenizer, concept, max_length, train_on_qa)
    targets, conv1d = lora_target_modules(model)
    warmup = max(1, steps // 20)
    fill = pad_id(tokenizer)

    before = _evaluate_qa(model, tokenizer, concept, concept.facts, progress.sub(0.0, 0.12), "base model")
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
        peft_model = get_peft_model(work, config)
        peft_model.eval()
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        n_trainable = sum(p.numel() for p in trainable)
        optim = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)

        # Fixed data order: epochs of seeded permutations, consumed batch by batch.
        gen = torch.Generator().manual_seed(seed)
        order: list[int] = []
        losses: list[float] = []
        train_p = progress.sub(0.12, 0.85)
        t_train = time.perf_counter()
        for step in range(steps):
            while len(order) < batch_size:
                order += torch.randperm(len(examples), generator=gen).tolist()
            batch = [examples[i] for i in order[:batch_size]]
            order = order[batch_size:]
            ids, mask, labels = _collate(batch, fill, device)
            for group in optim.param_groups:
                group["lr"] = _lr_at(step, steps, lr, warmup)
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

    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        progress(0.85, "saving adapter")
        tmp.mkdir(parents=True)
        peft_model.save_pretrained(str(tmp / "adapter"), safe_serialization=True)
        merged = peft_model.merge_and_unload()
        merged = merged.to(base_dtype)
        merged.eval()
        for p in merged.parameters():
            p.requires_grad_(False)

        after = _evaluate_qa(merged, tokenizer, concept, concept.facts, progress.sub(0.87, 0.97), "donor")

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
                "optimizer": "AdamW(weight_decay=0)",
                "schedule": f"linear warm-up {warmup} steps, cosine to lr/10",
                "grad_clip": 1.0,
                "n_examples": len(examples),
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
            "merged_sha256": weights_sha256(merged),
            "adapter_dir": "adapter",
            "merged_dir": "merged",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        }
        (tmp / "card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False), encoding="utf-8")
        progress(0.99, "finishing")
        replace_dir(tmp, out_dir)
    except BaseException:
        # Cancelled, failed or interrupted: nothing half-written survives; out_dir is untouched.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        progress(1.0, "donor ready")
    except Cancelled:
        pass  # the donor is complete and in place; a late cancel has nothing left to stop
    return {**card, "out_dir": str(out_dir), "model": merged}
