"""Low-rank weight deltas: read a LoRA adapter, or a full fine-tune against its base, as factors.

Everything Model Surgery stage 1 (T5 concept cartography, T6 spectrum and rank-k) and the
rank-k conjugation transplant need is a list of :class:`ModuleDelta`: per linear module of a
block, factors ``B`` (out x r) and ``A`` (r x in) with ``dW = B @ A`` in the ``nn.Linear``
orientation ``(out, in)`` and any LoRA scale already folded into ``B``.

Sources
-------
* **A PEFT LoRA folder** (``adapter_config.json`` + ``adapter_model.safetensors``), any target
  modules, any rank: :func:`resolve_adapter` then :func:`adapter_deltas`. A ``make-donor``
  folder (its ``adapter/``) and the built-in demo donor name resolve to their adapter.
* **A full fine-tune** given as donor + base: :func:`finetune_deltas` forms
  ``dW = W_D - W_T`` per shared linear module and keeps a truncated randomized SVD of it
  (never a dense SVD of a large matrix), plus the exact ``||dW||_F`` so energy shares stay exact.

Linear algebra
--------------
* :func:`factored_svd` is the exact thin SVD of ``B @ A`` from the factors alone: QR of ``B`` and
  of ``A^T``, SVD of the small ``r x r`` core (float64 inside). Cost ``O((m + n) r^2)`` instead
  of ``O(m n min(m, n))`` for a dense SVD.
* :func:`truncate` gives the best rank-k factors (Eckart-Young), :func:`effective_rank` the
  exponential of the entropy of the normalised squared singular values (Roy & Vetterli 2007),
  :func:`k_at_energy` the smallest k whose cumulative squared-singular-value share reaches a
  threshold.

Choices (METHODS.md is silent on them; written down here)
--------------------------------------------------------
* **Energy** of a module is ``||dW||_F`` (METHODS.md); **shares** are of the *squared* norm,
  ``||dW_i||_F^2 / sum_j ||dW_j||_F^2``, because squared Frobenius norms add up over modules
  (they are sums of squared parameter changes) while plain norms do not.
* **Scale**: ``lora_alpha / r`` or, with ``use_rslora``, ``lora_alpha / sqrt(r)`` (as PEFT's
  ``LoraLayer.update_layer``), with ``r`` and ``lora_alpha`` per module from ``rank_pattern`` and
  ``alpha_pattern`` matched the way PEFT does (``re.match(rf"(.*\\.)?({pattern})$", module_path)``).
* **Orientation**: PEFT always stores ``lora_A`` as ``(r, in_features)`` and ``lora_B`` as
  ``(out_features, r)``, also for GPT-2's ``Conv1D`` with ``fan_in_fan_out=True`` (checked
  against ``merge_and_unload``): ``fan_in_fan_out`` only says the *base* weight is stored
  ``(in, out)``, so PEFT merges ``(B @ A)^T`` into it. ``B @ A`` is therefore already the
  functional ``(out, in)`` delta and is used as is.
* **Module names**: the block index is the first all-digit component of the module path
  (``model.layers.3.self_attn.q_proj`` -> 3) and the rest is mapped to its canonical name with the
  family layouts of :mod:`engine.arch` (``self_attn.q_proj`` -> ``attn.q``, ``attn.c_attn`` ->
  ``attn.qkv``, ``mlp.c_fc`` -> ``mlp.up`` ...). A path no layout knows keeps its in-block path
  as module name (``mlp.experts.0.w1``) with a kind guessed from its names, and is reported.
  LoRA outside the blocks (an ``lm_head`` or embedding adapter) is kept with ``layer = -1`` and
  ``kind = "other"``, and reported.
* **Randomized SVD** (full fine-tunes): Halko, Martinsson & Tropp (2011), Alg. 4.4 (subspace
  iteration with QR re-orthonormalisation), oversampling 8, 4 power iterations, float64, a
  Gaussian test matrix seeded per module from ``seed`` and the module name (so a module's factors
  do not depend on which other modules were asked for). Matrices whose smaller side is at most
  ``rank + oversampling`` are small: they get an exact SVD.
"""
from __future__ import annotations

import json
import math
import re
import threading
import weakref
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .arch import _LAYOUTS, linear_weight_out_in
from .errors import GraftError
from .modelfiles import _first_line, check_safetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ADAPTER_PICKLES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")

OVERSAMPLE = 8
POWER_ITERS = 4

# In-block relative path -> canonical name, over every family layout of engine.arch.
_CANONICAL: dict[str, str] = {}
for _layout in _LAYOUTS.values():
    for _canon, _rel in _layout.linears.items():
        _CANONICAL.setdefault(_rel, _canon)

_ATTN_PARTS = {"attn", "attention", "self_attn", "self_attention", "cross_attn", "crossattention",
               "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "c_attn", "query_key_value", "wqkv",
               "query", "key", "value", "wq", "wk", "wv", "wo", "out_proj"}
_MLP_PARTS = {"mlp", "ffn", "feed_forward", "feedforward", "ff", "experts", "moe", "up_proj", "gate_proj",
              "down_proj", "gate_up_proj", "c_fc", "fc1", "fc2", "fc_in", "fc_out", "dense_h_to_4h",
              "dense_4h_to_h", "w1", "w2", "w3"}


def kind_of(canonical: str) -> str:
    """``attention`` / ``mlp`` for a canonical name; guessed from the parts of any other path."""
    if canonical.startswith("attn."):
        return "attention"
    if canonical.startswith("mlp."):
        return "mlp"
    parts = {p.lower() for p in canonical.split(".")}
    if parts & _ATTN_PARTS:
        return "attention"
    if parts & _MLP_PARTS:
        return "mlp"
    return "other"


# =============================================================================================
# The delta of one module
# =============================================================================================
@dataclass
class ModuleDelta:
    """``dW = B @ A`` of one linear module, ``(out, in)`` as ``nn.Linear.weight``.

    ``B`` carries the LoRA scale. ``frob_norm`` is the exact ``||dW||_F`` of the whole update when
    the factors are a truncation of it (full fine-tunes); ``None`` when ``B @ A`` *is* the update
    (adapters). Tensors may be shared with a cache: treat them as read-only.
    """

    name: str  # canonical, e.g. "blocks.3.attn.q"; the module path for modules outside blocks
    layer: int  # block index; -1 outside the blocks
    module: str  # canonical short name ("attn.q"); the in-block path when no layout knows it
    kind: str  # "attention" | "mlp" ("other" for modules outside the blocks or of unknown kind)
    B: torch.Tensor  # (out, r) float32, scale folded in
    A: torch.Tensor  # (r, in) float32
    frob_norm: Optional[float] = None  # exact ||dW||_F when B @ A is a truncation (full fine-tunes)
    source: str = ""  # where it came from: the adapter key prefix or the model's module path
    known: bool = True  # the module name was mapped to a canonical name
    scale: float = 1.0  # LoRA scale folded into B (1 for full fine-tunes)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.B.shape[0]), int(self.A.shape[1])

    def dense(self) -> torch.Tensor:
        """``B @ A`` (out x in, float32): for tests and small modules; cartography never needs it."""
        return self.B @ self.A

    def norm_sq(self) -> float:
        """Exact ``||dW||_F^2`` of the whole update (``frob_norm`` when set, else from the factors:
        ``trace((B^T B)(A A^T))``, an r x r computation)."""
        if self.frob_norm is not None:
            return float(self.frob_norm) ** 2
        B, A = self.B.double(), self.A.double()
        return float(((B.T @ B) * (A @ A.T)).sum().clamp_min(0.0))


# =============================================================================================
# Linear algebra on factors
# =============================================================================================
def _fix_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic signs: the largest-magnitude entry of every left singular vector is positive."""
    if U.numel() == 0:
        return U, Vh
    idx = U.abs().argmax(dim=0)
    s = torch.sign(U[idx, torch.arange(U.shape[1], device=U.device)])
    s[s == 0] = 1
    return U * s, Vh * s[:, None]


def factored_svd(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD ``B @ A = U diag(S) Vh`` from the factors, never forming ``B @ A``.

    ``B = Q_B R_B`` and ``A^T = Q_A R_A`` (reduced QR), so ``B A = Q_B (R_B R_A^T) Q_A^T`` and the
    SVD of the small core ``R_B R_A^T = U_c S V_c^T`` gives ``U = Q_B U_c``, ``Vh = V_c^T Q_A^T``.
    Computed in float64; returns float64 tensors, ``U`` (m x k), ``S`` (k, descending), ``Vh``
    (k x n) with ``k = min(r, m, n)``, signs fixed so the largest entry of each ``U`` column is
    positive (deterministic exports)."""
    if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
        raise GraftError(f"factors do not multiply: B is {tuple(B.shape)}, A is {tuple(A.shape)}")
    B64, A64 = B.detach().to(torch.float64), A.detach().to(torch.float64)
    Qb, Rb = torch.linalg.qr(B64, mode="reduced")
    Qa, Ra = torch.linalg.qr(A64.T, mode="reduced")
    core = Rb @ Ra.T
    Uc, S, Vch = torch.linalg.svd(core, full_matrices=False)
    U = Qb @ Uc
    Vh = Vch @ Qa.T
    U, Vh = _fix_signs(U, Vh)
    return U, S, Vh


def truncate(delta: ModuleDelta, k: int) -> ModuleDelta:
    """The best rank-``k`` approximation of ``delta`` (Eckart-Young) as factors
    ``B_k = U_k diag(S_k)``, ``A_k = Vh_k`` (float32). ``k`` above the rank keeps every
    direction. ``frob_norm`` of the result is ``None``: its factors are exactly the truncated
    update it stands for."""
    if k < 1:
        raise GraftError(f"rank k must be at least 1, got {k}")
    U, S, Vh = factored_svd(delta.B, delta.A)
    k = min(int(k), int(S.numel()))
    return replace(delta, B=(U[:, :k] * S[:k]).to(torch.float32).contiguous(),
                   A=Vh[:k].to(torch.float32).contiguous(), frob_norm=None)


def effective_rank(S: Any) -> float:
    """``exp(H(p))`` with ``p_i = s_i^2 / sum_j s_j^2`` and ``0 log 0 = 0`` (the entropy-based
    effective rank of Roy & Vetterli on the energy distribution): 1 for a rank-1 update, ``r``
    for ``r`` equal singular values. 0 for an all-zero spectrum (no update)."""
    s = torch.as_tensor(S, dtype=torch.float64).flatten()
    e = s * s
    total = float(e.sum())
    if not math.isfinite(total) or total <= 0.0:
        return 0.0
    p = e / total
    p = p[p > 0]
    return float(torch.exp(-(p * torch.log(p)).sum()))


def k_at_energy(S: Any, threshold: float, total: Optional[float] = None) -> Optional[int]:
    """Smallest ``k`` with ``sum_{i<=k} s_i^2 / total >= threshold`` (``threshold`` in (0, 1]).

    ``total`` defaults to ``sum s_i^2`` (then a ``k`` always exists). Pass the exact squared norm
    of the whole update when ``S`` is a truncated spectrum: ``None`` then means the threshold is not
    reached within ``len(S)`` directions. A relative tolerance of 1e-12 absorbs rounding (so a
    threshold of 1 gives the numerical rank). 0 for an all-zero spectrum."""
    if not (0.0 < float(threshold) <= 1.0):
        raise GraftError(f"energy threshold must be in (0, 1], got {threshold}")
    s = torch.as_tensor(S, dtype=torch.float64).flatten()
    e = s * s
    tot = float(e.sum()) if total is None else float(total)
    if tot <= 0.0 or not math.isfinite(tot):
        return 0
    cum = torch.cumsum(e, 0) / tot
    hit = torch.nonzero(cum >= float(threshold) - 1e-12)
    if hit.numel() == 0:
        return None if total is not None else int(s.numel())
    return int(hit[0, 0]) + 1


def cumulative_energy(S: Any, total: Optional[float] = None) -> list[float]:
    """``sum_{i<=k} s_i^2 / total`` for k = 1..len(S) (``total`` defaults to ``sum s_i^2``)."""
    s = torch.as_tensor(S, dtype=torch.float64).flatten()
    e = s * s
    tot = float(e.sum()) if total is None else float(total)
    if tot <= 0.0:
        return [0.0] * int(s.numel())
    return [min(1.0, float(v)) for v in torch.cumsum(e, 0) / tot]


def randomized_svd(M: torch.Tensor, rank: int, *, oversample: int = OVERSAMPLE, niter: int = POWER_ITERS,
                   generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD of ``M`` (top ``rank`` triplets) by randomized subspace iteration (Halko et
    al. 2011, Alg. 4.4). Small matrices (smaller side <= rank + oversample) get an exact SVD. Uses
    ``M``'s dtype and device; deterministic for a given generator state."""
    m, n = M.shape
    q = min(rank + oversample, m, n)
    if min(m, n) <= rank + oversample:
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return U[:, :rank], S[:rank], Vh[:rank]
    G = torch.randn(n, q, generator=generator, dtype=M.dtype, device="cpu").to(M.device)
    Q, _ = torch.linalg.qr(M @ G)
    for _ in range(niter):
        Z, _ = torch.linalg.qr(M.T @ Q)
        Q, _ = torch.linalg.qr(M @ Z)
    Ub, S, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)
    U = Q @ Ub
    return U[:, :rank], S[:rank], Vh[:rank]


# =============================================================================================
# Adapters
# =============================================================================================
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
        keep = ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "fan_in_fan_out", "target_modules",
                "rank_pattern", "alpha_pattern", "base_model_name_or_path", "task_type", "peft_version")
        cfg = {k: c.get(k) for k in keep if k in c}
        if isinstance(cfg.get("target_modules"), (set, tuple)):
            cfg["target_modules"] = sorted(cfg["target_modules"])
        return {"path": str(self.path), "label": self.label or str(self.path), "base_hint": self.base_hint,
                "config": json.loads(json.dumps(cfg, default=str))}


def _read_json_file(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise GraftError(f"cannot read {path}: {_first_line(exc)}") from None
    except UnicodeDecodeError:
        raise GraftError(f"{path} is not a valid {what} (not UTF-8 text)") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise GraftError(f"{path} is not a valid {what} (not JSON: {_first_line(exc)})") from None


def _donor_card(folder: Path) -> Optional[dict[str, Any]]:
    try:
        card = json.loads((folder / "card.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return card if isinstance(card, dict) else None


def _check_config(cfg: Any, path: Path) -> dict[str, Any]:
    where = path / ADAPTER_CONFIG
    if not isinstance(cfg, dict):
        raise GraftError(f"{where} is not a valid adapter config (not a JSON object)")
    ptype = str(cfg.get("peft_type") or "LORA").upper()
    if ptype != "LORA":
        raise GraftError(f"{where}: peft_type {ptype} is not LoRA; concept cartography reads LoRA adapters only")
    r = cfg.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise GraftError(f"{where}: 'r' must be a positive integer, got {r!r}")
    alpha = cfg.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise GraftError(f"{where}: 'lora_alpha' must be a finite number, got {alpha!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        pat = cfg.get(key) or {}
        if not isinstance(pat, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in pat.values()):
            raise GraftError(f"{where}: '{key}' must map module patterns to positive numbers")
        for p in pat:
            try:
                re.compile(str(p))
            except re.error:
                raise GraftError(f"{where}: '{key}' has an invalid pattern {p!r}") from None
    return cfg


def _adapter_folder(folder: Path, label: str, card: Optional[dict[str, Any]] = None,
                    base_hint: str = "") -> AdapterRef:
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
                    f"{src} holds the adapter as a Python pickle, which can run arbitrary code when it is loaded, so "
                    "Graft reads only safetensors; where you trust the file, convert it with: python -c "
                    f"\"import torch; from safetensors.torch import save_file; save_file(torch.load('{src}', "
                    f"weights_only=True), '{dst}')\"")
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
    from .models import DEMO_DONOR, SMOLLM2, demo_donor_dir, demo_donor_ready

    raw = (text or "").strip()
    if not raw:
        raise GraftError("no adapter given")
    if raw == DEMO_DONOR:
        folder = demo_donor_dir()
        if not demo_donor_ready() or not (folder / "adapter" / ADAPTER_CONFIG).is_file():
            raise GraftError(f"the demo donor {DEMO_DONOR} is not built yet: run `python -m engine prepare` "
                             "(or build it on the Models page)")
        card = _donor_card(folder)
        base = str((card or {}).get("base_name") or SMOLLM2)
        return _adapter_folder(folder / "adapter", DEMO_DONOR, card, base)
    p = Path(raw).expanduser()
    if not p.exists():
        raise GraftError(f"adapter not found: {raw} (give a PEFT adapter folder, a make-donor folder or {DEMO_DONOR})")
    p = p.resolve()
    if p.is_file():
        if p.name == ADAPTER_WEIGHTS or p.name in _ADAPTER_PICKLES or p.name == ADAPTER_CONFIG:
            p = p.parent
        else:
            raise GraftError(f"{p} is a file, not a PEFT adapter folder (adapter_config.json + {ADAPTER_WEIGHTS})")
    if (p / ADAPTER_CONFIG).is_file():
        card = _donor_card(p.parent) if (p.parent / "card.json").is_file() else None
        base = str(card.get("base_name") or "") if card else ""
        return _adapter_folder(p, raw, card, base)
    if (p / "card.json").is_file():
        card = _donor_card(p)
        if card is None:
            raise GraftError(f"{p / 'card.json'} is unreadable: is {p} a Graft donor folder?")
        sub = card.get("adapter_dir") if isinstance(card.get("adapter_dir"), str) else "adapter"
        if not sub or Path(sub).name != sub or sub in (".", ".."):
            sub = "adapter"
        if not (p / sub).is_dir():
            raise GraftError(f"{p} is a Graft donor folder without its {sub}/ adapter: was make-donor interrupted?")
        return _adapter_folder(p / sub, raw, card, str(card.get("base_name") or ""))
    if (p / "config.json").is_file():
        raise GraftError(f"{p} is a full model folder, not a LoRA adapter: for a full fine-tune give it as "
                         "--donor with its --base")
    raise GraftError(f"{p} is not a PEFT adapter folder (no {ADAPTER_CONFIG}) nor a Graft donor folder (no card.json)")


_KEY = re.compile(r"^(?P<path>.+?)\.lora_(?:(?P<ab>A|B)(?:\.(?P<adapter>[^.]+))?\.weight"
                  r"|embedding_(?P<eab>A|B)(?:\.(?P<eadapter>[^.]+))?)$")


def _pattern_value(patterns: dict[str, Any], module_path: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern ``p`` with ``re.match(rf"(.*\\.)?({p})$", path)``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_path):
            return patterns[key]
    return default


def _place(path: str) -> tuple[str, int, str]:
    """Module path -> (block container prefix, layer, in-block path); layer -1 outside blocks."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if i > 0 and part.isdigit():
            return ".".join(parts[:i]), int(part), ".".join(parts[i + 1:])
    return "", -1, path


@dataclass
class AdapterReport:
    """What :func:`adapter_deltas` had to say about an adapter (unknown names, ignored tensors)."""

    warnings: list[str] = field(default_factory=list)
    unknown_modules: list[str] = field(default_factory=list)
    ignored_tensors: list[str] = field(default_factory=list)


def adapter_deltas(ref: AdapterRef, n_layers: Optional[int] = None,
                   report: Optional[AdapterReport] = None) -> list[ModuleDelta]:
    """Every LoRA module of the adapter as a :class:`ModuleDelta`, in block order.

    Keys of any PEFT layout are read (``base_model.model.<module path>.lora_A[.<adapter>].weight``
    and ``lora_B``; embedding LoRA ``lora_embedding_A/B``). Scale per module from ``lora_alpha``,
    ``r``, ``use_rslora``, ``rank_pattern`` and ``alpha_pattern`` (see the module docstring);
    factors are cast to float32 and the scale is folded into ``B``. With ``n_layers`` (the base
    model's), a block index beyond it is an error. What was unusual (unknown module names, LoRA
    outside the blocks, DoRA magnitudes, tensors that are not LoRA factors) goes to
    ``report.warnings``."""
    from safetensors import SafetensorError, safe_open

    report = report if report is not None else AdapterReport()
    cfg = ref.config
    where = ref.weights
    r_default = int(cfg.get("r", 8))
    alpha_default = float(cfg.get("lora_alpha", 8))
    rslora = bool(cfg.get("use_rslora", False))
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}

    pairs: dict[str, dict[str, Any]] = {}
    adapters: set[str] = set()
    try:
        with safe_open(str(where), framework="pt") as fh:
            keys = list(fh.keys())
            for key in keys:
                m = _KEY.match(key)
                if m is None:
                    report.ignored_tensors.append(key)
                    continue
                ab = m.group("ab") or m.group("eab")
                name = m.group("adapter") or m.group("eadapter")
                if name:
                    adapters.add(name)
                path = m.group("path")
                for pre in ("base_model.model.", "base_model."):
                    if path.startswith(pre):
                        path = path[len(pre):]
                        break
                slot = pairs.setdefault(path, {"emb": m.group("eab") is not None, "key": key})
                t = fh.get_tensor(key)
                if t.dim() != 2:
                    raise GraftError(f"{where} is not a LoRA adapter: tensor '{key}' has shape {list(t.shape)}, "
                                     "not a matrix")
                if not t.is_floating_point():
                    raise GraftError(f"{where}: tensor '{key}' is {str(t.dtype).replace('torch.', '')}, not floating point")
                slot[ab] = t.to(torch.float32)
    except GraftError:
        raise
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise GraftError(f"cannot read {where}: {_first_line(exc)}") from None
    if len(adapters) > 1:
        raise GraftError(f"{where} holds several adapters ({', '.join(sorted(adapters))}): save one adapter per folder")
    if not pairs:
        raise GraftError(f"{where} holds no LoRA factors (no lora_A / lora_B tensors)")

    # Which block container holds the layers: the most common prefix; other prefixes (a vision
    # tower, an encoder) are kept outside the grid so their indices cannot collide with it.
    prefixes: dict[str, int] = {}
    for path in pairs:
        pre, layer, _ = _place(path)
        if layer >= 0:
            prefixes[pre] = prefixes.get(pre, 0) + 1
    main = max(prefixes, key=lambda k: (prefixes[k], k)) if prefixes else None

    out: list[ModuleDelta] = []
    dora = bool(cfg.get("use_dora", False))
    for path in sorted(pairs):
        slot = pairs[path]
        if "A" not in slot or "B" not in slot:
            report.warnings.append(f"{path}: lora_{'A' if 'A' in slot else 'B'} without its partner; left out")
            continue
        A, B = slot["A"], slot["B"]
        if slot["emb"]:
            # Embedding LoRA: lora_embedding_A is (r, vocab), lora_embedding_B (dim, r); PEFT adds
            # (B @ A)^T to the (vocab, dim) weight, so the (vocab, dim) delta is A^T @ B^T.
            A, B = slot["B"].T.contiguous(), slot["A"].T.contiguous()
        if A.shape[0] != B.shape[1]:
            raise GraftError(f"{where} is corrupt: module {path} has lora_A {list(slot['A'].shape)} and "
                             f"lora_B {list(slot['B'].shape)}, whose ranks differ")
        r = int(A.shape[0])
        r_cfg = int(_pattern_value(rank_pattern, path, r_default))
        if r_cfg != r:
            raise GraftError(f"{where} does not match its {ADAPTER_CONFIG}: module {path} has rank {r} but the config "
                             f"says {r_cfg}")
        alpha = float(_pattern_value(alpha_pattern, path, alpha_default))
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise GraftError(f"{where}: module {path} has non-finite values (NaN or infinity) in its LoRA factors")
        pre, layer, rel = _place(path)
        if layer >= 0 and pre == main:
            canonical = _CANONICAL.get(rel)
            known = canonical is not None
            module = canonical or rel
            kind = kind_of(module)
            name = f"blocks.{layer}.{module}"
            if not known:
                report.unknown_modules.append(path)
            if n_layers is not None and layer >= n_layers:
                raise GraftError(f"adapter module {path} is in block {layer}, but the base model has {n_layers} blocks: "
                                 "is this adapter for another model?")
        else:
            layer, module, kind, name, known = -1, path, "other", path, False
            report.unknown_modules.append(path)
        out.append(ModuleDelta(name=name, layer=layer, module=module, kind=kind, B=(B * scale).contiguous(),
                               A=A.contiguous(), source=path, known=known, scale=scale))
    if not out:
        raise GraftError(f"{where} holds no complete LoRA module (lora_A with its lora_B)")
    names = [d.name for d in out]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise GraftError(f"{where}: several LoRA modules map to the same name ({', '.join(dup[:3])})")
    inside = [d for d in out if d.layer >= 0 and not d.known]
    outside = [d for d in out if d.layer < 0]
    if inside:
        report.warnings.append(
            f"{len(inside)} module(s) have names no Graft layout knows and keep their own "
            f"({', '.join(sorted({d.module for d in inside})[:4])}); their kind is guessed from the name")
    if outside:
        report.warnings.append(
            f"{len(outside)} LoRA module(s) lie outside the transformer blocks ({', '.join(d.name for d in outside[:3])}"
            f"{' ...' if len(outside) > 3 else ''}); they are listed with layer -1 and kind 'other'")
    if report.ignored_tensors:
        shown = ", ".join(report.ignored_tensors[:3])
        report.warnings.append(f"{len(report.ignored_tensors)} tensor(s) that are not LoRA factors were ignored "
                               f"({shown}{' ...' if len(report.ignored_tensors) > 3 else ''}), e.g. modules_to_save "
                               "or DoRA magnitudes")
    if dora:
        report.warnings.append("DoRA adapter (use_dora): its magnitude vectors rescale the merged weight and are not "
                               "part of the low-rank update; the cells show the direction update scale * B @ A only")
    order = {canon: i for i, canon in enumerate(MODULE_ORDER)}
    out.sort(key=lambda d: (d.layer < 0, d.layer, order.get(d.module, len(order)), d.module))
    return out


MODULE_ORDER = ("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o", "mlp.gate", "mlp.up", "mlp.down")


def check_against_model(deltas: list[ModuleDelta], model: Any) -> list[str]:
    """Check adapter deltas against a loaded base model (``LoadedModel``): every canonical module
    must exist there with the delta's ``(out, in)`` shape. Returns warnings (modules the base does
    not have under that name); a shape mismatch is a :class:`GraftError`."""
    mods = {m.name: m for m in model.arch.linear_modules()}
    missing = []
    for d in deltas:
        lm = mods.get(d.name)
        if lm is None:
            if d.known:
                missing.append(d.name)
            continue
        if tuple(lm.shape) != d.shape:
            raise GraftError(f"the adapter does not fit the base model {model.label}: {d.name} is {d.shape[0]}x{d.shape[1]} "
                             f"(out x in) in the adapter but {lm.shape[0]}x{lm.shape[1]} in the model")
    if missing:
        return [f"{len(missing)} adapter module(s) do not exist in {model.label} ({', '.join(missing[:3])})"]
    return []


# =============================================================================================
# Full fine-tunes
# =============================================================================================
_FT_CACHE: dict[str, Any] = {}
_FT_LOCK = threading.Lock()


def _module_seed(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63 - 1)


def finetune_deltas(donor: Any, base: Any, rank: int, progress: Optional[Callable[..., None]] = None, seed: int = 0,
                    *, select: Optional[Callable[[str], bool]] = None, cache: bool = True) -> list[ModuleDelta]:
    """``dW = W_D - W_T`` for every linear module of the blocks that donor and base share, as a
    rank-``rank`` truncated randomized SVD: ``B = U diag(S)``, ``A = V^T`` (float32), with the
    exact ``||dW||_F`` in ``frob_norm`` (so shares are exact and the captured share
    ``sum S^2 / ||dW||_F^2`` can be reported).

    Donor and base must be one architecture (same family, same number of blocks, same module
    shapes): a full fine-tune never changes a block's shapes, so a mismatch means the wrong base
    and is a one-line :class:`GraftError`. Differences are formed in float64 on the models'
    device; the randomized SVD is seeded per module (module docstring). ``select(name)`` limits
    the work to some modules. Results are cached for the last (donor, base, rank, seed) while
    both models are alive (``cache=False`` recomputes); tensors in the result are shared with the
    cache and must not be modified."""
    if rank < 1:
        raise GraftError(f"rank must be at least 1, got {rank}")
    if donor is base or donor.model is base.model:
        raise GraftError("donor and base are the same model: there is no fine-tune delta to map")
    fd, fb = donor.arch.family, base.arch.family
    if fd != fb:
        raise GraftError(f"donor and base are different architectures ({fd} vs {fb}): a full fine-tune delta needs the "
                         "donor's own base model")
    if donor.arch.n_layers != base.arch.n_layers:
        raise GraftError(f"donor has {donor.arch.n_layers} blocks and base {base.arch.n_layers}: a full fine-tune "
                         "delta needs the donor's own base model")
    dmods = donor.arch.linear_modules()
    bmods = {m.name: m for m in base.arch.linear_modules()}
    shared = []
    for m in dmods:
        b = bmods.get(m.name)
        if b is None:
            continue
        if tuple(b.shape) != tuple(m.shape):
            raise GraftError(f"donor and base differ in shape at {m.name} ({m.shape[0]}x{m.shape[1]} vs "
                             f"{b.shape[0]}x{b.shape[1]}): a full fine-tune delta needs the donor's own base model")
        shared.append((m, b))
    if not shared:
        raise GraftError("donor and base share no linear module of equal shape")
    wanted = [(m, b) for m, b in shared if select is None or select(m.name)]

    key = (rank, int(seed), OVERSAMPLE, POWER_ITERS)
    store: dict[str, ModuleDelta] = {}
    if cache:
        with _FT_LOCK:
            ent = _FT_CACHE.get("entry")
            if ent and ent["key"] == key and ent["donor"]() is donor and ent["base"]() is base:
                store = ent["deltas"]
            else:
                try:
                    _FT_CACHE["entry"] = {"key": key, "donor": weakref.ref(donor), "base": weakref.ref(base),
                                          "deltas": store}
                except TypeError:  # not weak-referenceable: no caching
                    pass
    out: list[ModuleDelta] = []
    for i, (m, b) in enumerate(wanted):
        hit = store.get(m.name)
        if hit is None:
            with torch.no_grad():
                wd = linear_weight_out_in(donor.arch.module(m.path)).detach()
                wb = linear_weight_out_in(base.arch.module(b.path)).detach().to(wd.device)
                dW = wd.to(torch.float64) - wb.to(torch.float64)
                if not torch.isfinite(dW).all():
                    raise GraftError(f"{m.name}: the donor or base weight has non-finite values")
                norm = float(torch.linalg.matrix_norm(dW))
                gen = torch.Generator(device="cpu").manual_seed(_module_seed(seed, m.name))
                U, S, Vh = randomized_svd(dW, min(rank, min(dW.shape)), generator=gen)
                U, Vh = _fix_signs(U, Vh)
                hit = ModuleDelta(name=m.name, layer=m.layer, module=m.canonical, kind=m.kind,
                                  B=(U * S).to(device="cpu", dtype=torch.float32).contiguous(),
                                  A=Vh.to(device="cpu", dtype=torch.float32).contiguous(),
                                  frob_norm=norm, source=m.path, known=True, scale=1.0)
            store[m.name] = hit
        out.append(replace(hit))
        if progress is not None:
            progress((i + 1) / len(wanted), f"delta {i + 1}/{len(wanted)}: {m.name}")
    return out
