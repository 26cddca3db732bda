"""T1 Compatibility report (docs/methods.md, "Pre-surgery diagnostics").

Compares the architecture fields of donor and target, the tokenizers (Jaccard overlap of token
strings), and gives a verdict with reasons for each transplant operation, plus a compatibility
signature (hash of the fields a transplant depends on).

Graft's choices (docs/methods.md, T1): a module swap also requires the same family (equal shapes
across families, e.g. a GPT-2 ``attn.o`` and a Llama ``attn.o``, do not mean the same map), and
is possible when at least one module shared by name has equal shapes; the reasons say how many.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..core.params import param
from ..core.progress import Progress
from ..loading.arch import block_internal_signature, signature
from ..loading.tokens import same_tokenizer, tokenizer_vocab
from ..running.context import ToolContext
from ..running.registry import Tool, register

COMPARED = (
    "family",
    "model_type",
    "n_layers",
    "hidden_size",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "intermediate_size",
    "norm_type",
    "activation",
    "positional",
    "vocab_size",
    "tied_embeddings",
    "dtype",
    "n_params",
)
BLOCK_INTERNALS = (
    "family",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "intermediate_size",
    "norm_type",
    "activation",
    "positional",
)


@dataclass(frozen=True)
class CompatParams:
    vocab_sample: int = param(
        0,
        "Compare at most this many token strings per tokenizer for the Jaccard overlap (0 = the whole "
        "vocabulary).",
        min=0,
    )


@dataclass
class CompatResult:
    fields: list[dict[str, Any]]
    tokenizer_overlap: float  # Jaccard of token-string sets, 0..1
    same_tokenizer: bool
    verdicts: dict[str, bool]
    reasons: dict[str, list[str]]
    signature: dict[str, Any]
    swappable_modules: int
    shared_modules: int
    donor_description: dict[str, Any] = field(default_factory=dict)
    target_description: dict[str, Any] = field(default_factory=dict)


def _vocab(tok: Any, limit: int) -> Any:
    """The token strings compared: the whole vocabulary (its dict's keys, no copy), or the first
    ``limit`` by id."""
    vocab = tokenizer_vocab(tok)
    if not limit:
        return vocab.keys()
    return {k for k, _ in sorted(vocab.items(), key=lambda kv: kv[1])[:limit]}


def jaccard(a: Any, b: Any) -> float:
    """|a & b| / |a | b| of two collections of distinct strings, counting the common ones from the
    smaller side (Gemma-3's 262,144 entries made building the union and intersection sets most of
    T1's time: 0.3 s a call)."""
    small, large = (a, b) if len(a) <= len(b) else (b, a)
    common = sum(1 for k in small if k in large)
    return common / max(len(a) + len(b) - common, 1)


def compute_compat(ctx: ToolContext, params: CompatParams, progress: Progress) -> CompatResult:
    progress(0.1, "describing architectures")
    dd, td = ctx.donor.arch.describe(), ctx.target.arch.describe()
    rows = [
        {"field": k, "donor": dd.get(k), "target": td.get(k), "equal": dd.get(k) == td.get(k)}
        for k in COMPARED
    ]
    progress(0.4, "comparing tokenizers")
    same_tok = same_tokenizer(ctx.donor.tokenizer, ctx.target.tokenizer)
    if same_tok:  # equal vocabularies: every sample of them is equal too
        jacc = 1.0
    else:
        jacc = jaccard(
            _vocab(ctx.donor.tokenizer, params.vocab_sample),
            _vocab(ctx.target.tokenizer, params.vocab_sample),
        )

    progress(0.7, "checking operations")
    dm = {m.name: m for m in ctx.donor.arch.linear_modules()}
    tm = {m.name: m for m in ctx.target.arch.linear_modules()}
    shared = sorted(set(dm) & set(tm))
    equal = [n for n in shared if dm[n].shape == tm[n].shape]
    reasons: dict[str, list[str]] = {
        "module_swap": [],
        "organ_direct": [],
        "organ_bridged": [],
        "conjugation": [],
    }
    same_family = dd["family"] == td["family"]

    ms = same_family and len(equal) > 0
    if not same_family:
        reasons["module_swap"].append(
            f"different families ({dd['family']} vs {td['family']}): module weights do not mean the same map"
        )
    elif not equal:
        reasons["module_swap"].append("no module shared by name has equal shapes")
    else:
        reasons["module_swap"].append(
            f"{len(equal)} of {len(shared)} modules shared by name have equal shapes"
        )
        if len(equal) < len(shared):
            bad = [n for n in shared if dm[n].shape != tm[n].shape][:3]
            reasons["module_swap"].append(f"unequal shapes, cannot be swapped: {', '.join(bad)}")
        if dd["n_layers"] != td["n_layers"]:
            reasons["module_swap"].append(
                f"layer counts differ ({dd['n_layers']} vs {td['n_layers']}): only the first "
                f"{min(dd['n_layers'], td['n_layers'])} blocks pair up"
            )
    if ms and not same_tok:
        reasons["module_swap"].append(
            f"tokenizers differ (Jaccard {jacc:.2f}): swapped modules see different token statistics"
        )

    internals_equal = all(dd.get(k) == td.get(k) for k in BLOCK_INTERNALS)
    diff_int = [k for k in BLOCK_INTERNALS if dd.get(k) != td.get(k)]
    od = internals_equal and dd["hidden_size"] == td["hidden_size"]
    if not internals_equal:
        reasons["organ_direct"].append(f"block internals differ: {', '.join(diff_int)}")
        reasons["organ_bridged"].append(f"block internals differ: {', '.join(diff_int)}")
    else:
        reasons["organ_bridged"].append("block internals equal")
        if dd["hidden_size"] != td["hidden_size"]:
            reasons["organ_direct"].append(
                f"hidden sizes differ ({dd['hidden_size']} vs {td['hidden_size']}): use bridges"
            )
            reasons["organ_bridged"].append(
                f"bridges map width {td['hidden_size']} -> {dd['hidden_size']} -> {td['hidden_size']} "
                "(the organ runs at its own width between them)"
            )
        else:
            reasons["organ_direct"].append(f"block internals and hidden size ({dd['hidden_size']}) equal")
    reasons["conjugation"].append(
        "both are supported decoders; needs T2's layer matching and T3's per-layer maps"
    )
    verdicts = {"module_swap": ms, "organ_direct": od, "organ_bridged": internals_equal, "conjugation": True}

    sd, st = signature(dd), signature(td)
    progress(1.0, "done")
    return CompatResult(
        fields=rows,
        tokenizer_overlap=round(jacc, 6),
        same_tokenizer=same_tok,
        verdicts=verdicts,
        reasons=reasons,
        signature={
            "donor": sd,
            "target": st,
            "equal": sd == st,
            "donor_blocks": block_internal_signature(dd),
            "target_blocks": block_internal_signature(td),
        },
        swappable_modules=len(equal) if same_family else 0,
        shared_modules=len(shared),
        donor_description=dd,
        target_description=td,
    )


TOOL = register(
    Tool(
        name="compat",
        code="T1",
        title="Compatibility report",
        summary="Architecture fields side by side, tokenizer overlap, and a verdict with reasons for each "
        "transplant operation.",
        params_cls=CompatParams,
        compute=compute_compat,
        figure="viz.compat:compat_figure",
        page="Models",
        streams=True,
    )
)
