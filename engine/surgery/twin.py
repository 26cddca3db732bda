"""Rotated twin: a function-preserving copy of a model whose residual stream is rotated.

The twin is the ground truth for rank-k conjugation (docs/methods.md, operation 3): it computes the
same function as its base model, but every residual-stream coordinate is mixed by a random
orthogonal matrix ``Q``. A LoRA update ``dW`` learnt on the base, merged into the twin as if the
coordinates matched ("plain merge"), lands in the wrong basis and does not carry the base's
behaviour change; the same update conjugated into the twin's coordinates does. The twin's card
records a hash of ``Q`` but not ``Q`` itself, so a tool must recover the alignment from
activations, as it would between two unrelated models.

Convention (row vectors, as everywhere in Graft): the twin's residual stream is ``h' = h @ Q``.
A linear layer stores ``W`` as ``(out, in)`` and computes ``y = x @ W.T``.

Construction, for pre-norm RMSNorm decoders (Llama layout: Llama / SmolLM2, Mistral, Qwen2,
Qwen3, SmolLM3; and Gemma 1, whose RMSNorm multiplies by ``1 + w``):

1. **Fold the norms.** RMSNorm is ``x / rms(x) * g``; ``rms(x @ Q) == rms(x)``, but the
   per-channel gain ``g`` does not commute with ``Q``. Every linear that reads a normed stream
   absorbs it: ``W <- W diag(g)`` (``input_layernorm`` into q, k, v; ``post_attention_layernorm``
   into gate, up; the final ``norm`` into ``lm_head``), then ``g = 1`` (Gemma: ``w = 0``).
2. **Untie** ``lm_head`` from the embeddings when they share a tensor (the head now holds
   ``E diag(g_final) Q``, the embedding ``E Q``): ``config.tie_word_embeddings = False``.
3. **Rotate.** Embeddings ``E <- E Q`` (Gemma's scalar embedding scale ``sqrt(d)`` commutes);
   every linear reading the residual ``W <- W Q`` (``x' W'^T = x Q Q^T W^T = x W^T``); every
   linear writing into it ``W <- Q^T W`` and its bias ``b <- b Q`` (o_proj, down_proj).
   Biases of readers (Qwen2's q/k/v) are unchanged. Per-head norms (Qwen3's q_norm / k_norm)
   act inside attention, not on the residual, and are unchanged.

All products are computed in float64 and cast back to the model's dtype once. :func:`make_twin`
saves a twin after the function-preservation check of :mod:`engine.surgery.twin_check`.

Ground truth for conjugating a base-model update ``dW`` into the twin: for a module reading the
residual through norm gain ``g``, ``dW' = dW diag(g) Q``; for ``lm_head``, ``dW' = dW
diag(g_final) Q``; for a module writing into the residual, ``dW' = Q^T dW``; modules inside a
block (nothing residual on either side) need no change.

Unsupported, with a one-line :class:`GraftError`: LayerNorm families (GPT-2, GPT-NeoX, Phi):
LayerNorm subtracts the per-token mean, i.e. projects out the all-ones direction, which a rotation
moves; Gemma 2 / Gemma 3: their ``post_attention_layernorm`` / ``post_feedforward_layernorm``
normalise each block's output *before* the residual add, so their per-channel gains sit on the
residual side with no linear layer after them to absorb them (``Q^T diag(g) Q`` is not diagonal
unless ``Q`` is a signed permutation); multimodal wrappers; any block holding a parameter the
construction does not know.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from ..core.errors import GraftError
from ..core.progress import Progress, silent
from ..loading.model_folders import TWIN_CARD
from .twin_check import DEFAULT_N_TEXTS, default_check_texts, twin_report
from .twin_plan import (  # noqa: F401  (check_supported: part of the twin API)
    NORM_ATTN,
    NORM_MLP,
    READERS_ATTN,
    READERS_MLP,
    WRITER_ATTN,
    WRITER_MLP,
    TwinPlan,
    check_supported,
)

TWIN_FORMAT = "graft-twin/1"
ROTATION_FILE = "rotation.safetensors"


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    """A Haar-random ``d x d`` orthogonal matrix (float64, CPU), reproducible from ``seed``: QR of a
    standard Gaussian matrix drawn from its own generator, columns sign-fixed so ``diag(R) > 0``."""
    if d < 1:
        raise GraftError(f"rotated twin: width must be positive, got {d}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    s = torch.sign(torch.diagonal(r))
    s[s == 0] = 1.0
    return q * s[None, :]


def rotation_sha256(q: torch.Tensor) -> str:
    """SHA-256 of ``Q``'s dtype, shape and raw bytes (row-major)."""
    h = hashlib.sha256()
    h.update(str(q.dtype).encode())
    h.update(json.dumps(list(q.shape)).encode())
    h.update(q.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def norm_gain(norm: nn.Module, gemma: bool) -> torch.Tensor:
    """The per-channel gain ``g`` a norm multiplies by, in float64 (Gemma: ``1 + weight``)."""
    w = norm.weight.detach().to(torch.float64)
    return 1.0 + w if gemma else w


def _seed_int(seed: Any) -> int:
    try:
        if isinstance(seed, bool):
            raise TypeError
        value = int(seed)
        if value != seed and not isinstance(seed, str):
            raise ValueError
    except (TypeError, ValueError):
        raise GraftError(f"rotated twin: seed must be an integer, got {seed!r}") from None
    if not 0 <= value < 2**63:
        raise GraftError(f"rotated twin: seed must be in 0 .. 2^63-1, got {value}")
    return value


@torch.no_grad()
def rotate_model(
    model: nn.Module, seed: int, *, progress: Optional[Progress] = None
) -> tuple[nn.Module, torch.Tensor]:
    """A NEW model (deep copy; ``model`` is never touched) computing the same function as ``model``
    whose residual stream is ``h' = h @ Q``, and ``Q`` (``d x d``, the model's dtype and device).

    ``Q = random_orthogonal(d, seed)``. Norms are folded into the linears that read them, the head
    is untied when tied, then embeddings and residual readers are right-multiplied by ``Q`` and
    residual writers left-multiplied by ``Q^T`` (module docstring). Raises a one-line GraftError
    for an unsupported architecture before copying anything."""
    progress = progress or silent()
    seed = _seed_int(seed)
    plan = TwinPlan(model)
    progress(0.0, f"rotated twin: copying {type(model).__name__}")
    twin = copy.deepcopy(model)
    inner, head = twin.model, twin.lm_head
    ref_param = inner.embed_tokens.weight
    dtype, device = ref_param.dtype, ref_param.device
    q64 = random_orthogonal(plan.d, seed).to(device)

    def put(mod: nn.Module, name: str, value: torch.Tensor) -> None:
        old = getattr(mod, name)
        setattr(
            mod, name, nn.Parameter(value.to(dtype=old.dtype).contiguous(), requires_grad=old.requires_grad)
        )

    def unit_gain(norm: nn.Module) -> None:
        w = norm.weight
        norm.weight = nn.Parameter(
            torch.zeros_like(w) if plan.gemma else torch.ones_like(w), requires_grad=w.requires_grad
        )

    # Embeddings and head first: when tied they share one Parameter, replaced here by two.
    emb64 = inner.embed_tokens.weight.detach().to(torch.float64)
    g_final = norm_gain(inner.norm, plan.gemma)
    head64 = head.weight.detach().to(torch.float64)
    put(head, "weight", (head64 * g_final[None, :]) @ q64)
    del head64
    put(inner.embed_tokens, "weight", emb64 @ q64)
    del emb64
    unit_gain(inner.norm)
    if plan.tied or getattr(twin.config, "tie_word_embeddings", False):
        # The twin's head and embeddings differ now: saved as two tensors, reloaded untied.
        twin.config.tie_word_embeddings = False
    if hasattr(twin, "get_expanded_tied_weights_keys"):  # transformers 5: forget the tie mapping
        try:
            twin.all_tied_weights_keys = twin.get_expanded_tied_weights_keys(all_submodels=True)
        except Exception:  # noqa: BLE001 - older layouts: the config flag is what matters on reload
            pass
    progress(0.1, "rotated twin: embeddings and head rotated")

    for i, block in enumerate(inner.layers):
        for norm_name, readers, writer in (
            (NORM_ATTN, READERS_ATTN, WRITER_ATTN),
            (NORM_MLP, READERS_MLP, WRITER_MLP),
        ):
            norm = block.get_submodule(norm_name)
            g = norm_gain(norm, plan.gemma)
            for rel in readers:
                lin = block.get_submodule(rel)
                put(lin, "weight", (lin.weight.detach().to(torch.float64) * g[None, :]) @ q64)
            unit_gain(norm)
            lin = block.get_submodule(writer)
            put(lin, "weight", q64.T @ lin.weight.detach().to(torch.float64))
            if lin.bias is not None:
                put(lin, "bias", lin.bias.detach().to(torch.float64) @ q64)
        progress(0.1 + 0.9 * (i + 1) / plan.n_layers, f"rotated twin: block {i + 1}/{plan.n_layers}")
    twin.eval()
    return twin, q64.to(dtype)


# --------------------------------------------------------------------------------------------
# Building and saving


def _check_out(out: Path) -> None:
    from ..core.outputs import check_output_dir

    check_output_dir(out, "twin output folder")
    if out.is_dir() and any(out.iterdir()) and not (out / TWIN_CARD).is_file():
        raise GraftError(
            f"refusing to write into {out}: the folder is not empty and is not a Graft twin (no {TWIN_CARD})"
        )


def make_twin(
    base: Any,
    seed: int,
    out_dir: Union[str, Path],
    progress: Optional[Progress] = None,
    *,
    save_rotation: bool = False,
    texts: Optional[Sequence[str]] = None,
    tolerance: Optional[float] = None,
) -> dict[str, Any]:
    """Build the rotated twin of ``base`` (an :class:`engine.loading.models.LoadedModel`, never mutated),
    check it is function-preserving, and save it to ``out_dir`` as a Hugging Face folder
    (model.safetensors, config.json, tokenizer) plus ``twin.json``; returns the card.

    The check compares logits on ``texts`` (default: the first 6 texts of data/retained.jsonl) and
    must pass ``rel_diff <= tolerance`` (default by dtype, :data:`engine.surgery.twin_check.TOLERANCES`;
    1e-4 for float32), else nothing is written and a GraftError says by how much it failed. ``Q`` is not saved
    unless ``save_rotation`` (then ``rotation.safetensors`` holds it as tensor ``"Q"``, in the
    model's dtype, with ``h_twin = h_base @ Q``); the card always holds its SHA-256
    (:func:`rotation_sha256`). ``out_dir`` must be new, empty, or an earlier twin folder, which is
    replaced only once the new one is complete."""
    from ..core.paths import discard_staging, replace_dir, staging_dir
    from ..loading.models import state_dict_hash

    progress = progress or silent()
    seed = _seed_int(seed)
    if not str(out_dir).strip():
        raise GraftError("twin output folder: empty path")
    out = Path(out_dir).expanduser().resolve()
    _check_out(out)
    model, tokenizer = base.model, base.tokenizer
    plan = check_supported(model)  # refuses before any work
    if tolerance is not None and not (isinstance(tolerance, (int, float)) and tolerance > 0):
        raise GraftError(f"rotated twin: tolerance must be a positive number, got {tolerance!r}")
    texts_label = "given" if texts is not None else f"data/retained.jsonl (first {DEFAULT_N_TEXTS})"
    texts = list(texts) if texts is not None else default_check_texts()

    t0 = time.perf_counter()
    progress(0.0, "hashing the base weights")
    lock = getattr(base, "lock", None)
    with lock if lock is not None else nullcontext():
        base_hash = state_dict_hash(model.state_dict())
        twin, q = rotate_model(model, seed, progress=progress.sub(0.05, 0.55))
    build_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    with lock if lock is not None else nullcontext():
        report = twin_report(
            model, twin, tokenizer, texts, tolerance=tolerance, progress=progress.sub(0.55, 0.75)
        )
    verify_s = time.perf_counter() - t1
    if not report["ok"]:
        raise GraftError(
            f"rotated twin is not function-preserving: max |logit diff| {report['max_abs_diff']:.3g} is "
            f"{report['rel_diff']:.3g} of the logit scale {report['logit_scale']:.3g} (tolerance "
            f"{report['tolerance']:.3g}); "
            "nothing was saved"
        )

    progress(0.75, "hashing the twin")
    twin_hash = state_dict_hash(twin.state_dict())
    spec = getattr(base, "spec", None)
    card: dict[str, Any] = {
        "format": TWIN_FORMAT,
        "operation": "rotated-twin",
        "base": {
            "ref": getattr(spec, "ref", None),
            "kind": getattr(spec, "kind", None),
            "label": getattr(base, "label", None),
            "source": getattr(base, "source", None),
            "class": type(model).__name__,
            "weight_hash": base_hash,
        },
        "seed": seed,
        "d": int(q.shape[0]),
        "n_layers": len(model.model.layers),
        "dtype": str(q.dtype).replace("torch.", ""),
        "convention": "h_twin = h_base @ Q (row vectors); readers W' = W diag(g) Q, writers W' = Q^T W, "
        "embeddings E' = E Q",
        "rotation": {
            "distribution": "Haar: QR of a float64 standard Gaussian d x d (torch.Generator(seed)), "
            "columns sign-fixed",
            "sha256": rotation_sha256(q),
            "saved": bool(save_rotation),
            "file": ROTATION_FILE if save_rotation else None,
        },
        **plan,
        "verification": {
            **report,
            "texts": texts_label,
            "texts_sha256": hashlib.sha256("\n".join(texts).encode()).hexdigest(),
        },
        "twin_weight_hash": twin_hash,
        "timings_s": {"build": round(build_s, 3), "verify": round(verify_s, 3)},
    }

    t2 = time.perf_counter()
    _check_out(out)
    tmp = staging_dir(out)
    try:
        progress(0.8, f"saving the twin to {out}")
        twin.save_pretrained(str(tmp), safe_serialization=True)
        progress(0.93, "saving the tokenizer")
        tokenizer.save_pretrained(str(tmp))
        if save_rotation:
            from safetensors.torch import save_file

            save_file(
                {"Q": q.detach().contiguous().cpu()},
                str(tmp / ROTATION_FILE),
                metadata={
                    "convention": "h_twin = h_base @ Q",
                    "seed": str(seed),
                    "sha256": card["rotation"]["sha256"],
                },
            )
        card["saved_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        card["timings_s"]["save"] = round(time.perf_counter() - t2, 3)
        card["out_dir"] = str(out)
        (tmp / TWIN_CARD).write_text(json.dumps(card, indent=2, allow_nan=False))
        progress(0.98, "moving the twin into place")
        _check_out(out)  # again: the folder may have changed while we wrote
        replace_dir(tmp, out)
    finally:
        discard_staging(tmp)  # no-op once replace_dir moved it into place
    progress(1.0, f"twin saved to {out}")
    return card
