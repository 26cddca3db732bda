"""Organ insertion into a recipient, reversibly (docs/methods.md operation 2).

:class:`OrganInsertion` puts one or more organs into a *working copy* of the recipient T: a
structural copy that shares every tensor with the cached T (:func:`engine.surgery.reversible.working_copy`
with nothing touched), whose block list then receives new block modules holding the organ's
tensors at ``p .. p+k-1``. The cached T is never written, the working copy holds only the organ's
bytes (plus any bridge and recovery-trained neighbour), and :meth:`rollback` puts the original
block modules (which hold the cached tensors) back: bit-exact by construction, checked by
:meth:`verify_rollback` (``torch.equal`` on every tensor) and by the weight hash.

Modes: ``direct`` (the organ replaces the blocks) or ``bridged`` (affine bridges around it,
:mod:`engine.surgery.organ_bridge`, identity until fitted). :meth:`fit_bridges` fits them in closed
form: ``W_in`` maps the stream the recipient gives the organ (input of block ``p``) to the stream
the organ read in its source (input of source block ``input_layer``), on the same tokens;
``W_out`` maps what the organ (after ``W_in``) returns to what T's block ``p+k-1`` returned. Both
need donor and recipient to share a tokenizer. :meth:`train` runs brief LM-loss training of the
bridges, the organs, or the organs and their neighbouring blocks (recovery fine-tuning); a
neighbour gets its own copy first, so the cached T is never trained. Several placements compose
organs (the paper's RQ3); they must not overlap.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from ..core.errors import GraftError
from ..core.progress import Progress, silent
from ..core.train_config import TrainConfig
from ..loading.arch import ArchAdapter
from ..loading.models import LoadedModel, state_dict_hash
from ..loading.tokens import same_tokenizer
from .organ import Organ, build_blocks, check_fits, template_block
from .organ_bridge import (
    ORGAN_BLOCKS_FILE,
    Bridge,
    BridgeSet,
    bridge_tensors,
    bridges_entry,
    closed_form,
    install,
    save_bridges,
    save_organ_blocks,
    stream_rows,
    uninstall,
)
from .organ_train import train_lm
from .reversible import ReversibleEdit, working_copy
from .transplant import save_transplant

MODES = ("direct", "bridged")


@dataclass
class Placement:
    organ: Organ
    position: int
    mode: str = "direct"

    @property
    def blocks(self) -> range:
        return range(self.position, self.position + self.organ.size)


class OrganInsertion(ReversibleEdit):
    """Organs placed into a working copy of ``target``; apply / rollback / verify / save."""

    def __init__(self, target: LoadedModel, placements: Sequence[Placement]) -> None:
        if not placements:
            raise GraftError("no organ to insert")
        used: set[int] = set()
        for pl in placements:
            if pl.mode not in MODES:
                raise GraftError(f"mode must be one of {', '.join(MODES)}, got {pl.mode!r}")
            check_fits(pl.organ, target, pl.position, bridged=pl.mode == "bridged")
            if used & set(pl.blocks):
                raise GraftError(
                    f"organs overlap at block(s) {sorted(used & set(pl.blocks))}: choose a larger spacing"
                )
            used |= set(pl.blocks)
        self.target = target
        self.placements = list(placements)
        self.modules = tuple(
            f"blocks.{i}" for pl in self.placements for i in pl.blocks
        )  # what LiveTransplants lists
        self._working: Optional[nn.Module] = None
        self._arch: Optional[ArchAdapter] = None
        self._new: dict[
            int, nn.Module
        ] = {}  # block index -> module put in (organ block or trained neighbour)
        self._orig: dict[int, nn.Module] = {}  # block index -> the working copy's original module
        self.bridges: Optional[BridgeSet] = None
        self._applied = False
        self._hash_before: Optional[str] = None

    # -- structure ---------------------------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        self.materialise()
        return self._arch.blocks  # type: ignore[union-attr]

    @property
    def bridged(self) -> bool:
        return any(pl.mode == "bridged" for pl in self.placements)

    @property
    def applied(self) -> tuple[str, ...]:
        return self.modules if self._applied else ()

    def materialise(self) -> nn.Module:
        if self._working is None:
            working = working_copy(self.target, [])
            self._arch = ArchAdapter(working)
            self._orig = {i: self._arch.blocks[i] for pl in self.placements for i in pl.blocks}
            dev, dt = self.target.device, self.target.dtype
            for pl in self.placements:
                new = build_blocks(
                    pl.organ, template_block(pl.organ, self.target, pl.position), pl.position, dev, dt
                )
                self._new.update(dict(zip(pl.blocks, new)))
            if self.bridged:
                self.bridges = BridgeSet()
                d = self.target.arch.hidden_size
                for pl in self.placements:
                    if pl.mode == "bridged":
                        self.bridges.items.append(
                            Bridge(
                                d,
                                pl.position,
                                pl.position + pl.organ.size - 1,
                                dev,
                                dt,
                                d_organ=pl.organ.hidden_size,
                            )
                        )
            self._working = working
        return self._working

    # -- the operation ----------------------------------------------------------------------------
    def apply(self) -> tuple[str, ...]:
        self.materialise()
        if self._applied:
            return ()
        blocks = self.blocks
        for i, mod in self._new.items():
            blocks[i] = mod
        if self.bridges is not None:
            install(self.working, blocks, self.bridges)
        self._applied = True
        return self.modules

    def rollback(self) -> int:
        if self._working is None or not self._applied:
            return 0
        uninstall(self.working)
        blocks = self.blocks
        for i, mod in self._orig.items():
            blocks[i] = mod
        self._applied = False
        return len(self._orig)

    @property
    def swapped_bytes(self) -> int:
        """Bytes the insertion holds (organ blocks, trained neighbours, bridges)."""
        n = sum(p.nbytes for m in self._new.values() for p in m.state_dict().values())
        return n + (
            sum(t.nbytes for t in bridge_tensors(self.bridges).values()) if self.bridges is not None else 0
        )

    def deviations(self) -> list[Optional[dict[str, float]]]:
        """Per placement: ``{in, out}`` bridge deviations, None for a direct placement."""
        out: list[Optional[dict[str, float]]] = []
        it = iter(self.bridges.items) if self.bridges is not None else iter(())
        for pl in self.placements:
            out.append(next(it).deviation() if pl.mode == "bridged" else None)
        return out

    # -- bridges and training --------------------------------------------------------------------
    def fit_bridges(
        self,
        sources: Sequence[LoadedModel],
        texts: Sequence[str],
        *,
        alpha: float = 0.01,
        max_rows: int = 4096,
        progress: Optional[Progress] = None,
    ) -> None:
        """Closed-form bridges, placement by placement (each fitted with the earlier ones in place).
        ``sources[j]`` is the model placement ``j``'s organ came from (read for ``W_in``)."""
        progress = progress or silent()
        self.apply()
        items = iter(self.bridges.items) if self.bridges is not None else iter(())
        tok = self.target.tokenizer
        ref = self.target
        n = len(self.placements)
        for j, (pl, src) in enumerate(zip(self.placements, sources)):
            if pl.mode != "bridged":
                continue
            br = next(items)
            if not same_tokenizer(src.tokenizer, tok):
                raise GraftError(
                    "closed-form bridges pair the organ's source and the recipient token by token: "
                    f"{src.label} and {self.target.label} have different tokenizers"
                )
            p = progress.sub(j / n, (j + 1) / n)
            last = pl.position + pl.organ.size - 1
            with src.lock:
                Y_in = stream_rows(
                    src.model,
                    src.arch.blocks,
                    tok,
                    texts,
                    [("in", pl.organ.input_layer)],
                    max_rows=max_rows,
                    progress=p.sub(0, 0.25),
                )[("in", pl.organ.input_layer)]
            with ref.lock:
                Y_out = stream_rows(
                    ref.model,
                    ref.arch.blocks,
                    tok,
                    texts,
                    [("out", last)],
                    max_rows=max_rows,
                    progress=p.sub(0.25, 0.5),
                )[("out", last)]
            br.set("in", *br.identity("in"))
            br.set("out", *br.identity("out"))
            X_in = stream_rows(
                self.working,
                self.blocks,
                tok,
                texts,
                [("in_raw", pl.position)],
                max_rows=max_rows,
                progress=p.sub(0.5, 0.7),
            )[("in_raw", pl.position)]  # before W_in: the recipient's stream
            br.set("in", *closed_form(X_in, Y_in, alpha))
            X_out = stream_rows(
                self.working,
                self.blocks,
                tok,
                texts,
                [("out_raw", last)],
                max_rows=max_rows,
                progress=p.sub(0.7, 0.95),
            )[("out_raw", last)]  # before W_out: the organ's own output
            br.set("out", *closed_form(X_out, Y_out, alpha))
        progress(1.0, "bridges fitted")

    def own_neighbours(self) -> list[int]:
        """Give the blocks next to each organ their own copies (for recovery training); returns them."""
        self.apply()
        L = len(self.blocks)
        out = []
        for pl in self.placements:
            for i in (pl.position - 1, pl.position + pl.organ.size):
                if 0 <= i < L and i not in self._new:
                    with torch.inference_mode(False):
                        mod = copy.deepcopy(self._orig.get(i, self.blocks[i]))
                    self._orig.setdefault(i, self.blocks[i])
                    self._new[i] = mod
                    self.blocks[i] = mod
                    out.append(i)
        return out

    def train(
        self,
        what: str,
        texts: Sequence[str],
        config: TrainConfig,
        *,
        seed: int,
        progress: Optional[Progress] = None,
    ) -> list[float]:
        """LM-loss training of ``bridges``, ``organs``, ``organs+neighbours`` or ``bridges+organs``
        with ``config`` (engine.core.train_config)."""
        self.apply()
        if what == "bridges":
            params = list(self.bridges.parameters()) if self.bridges is not None else []
        elif what == "organs":
            params = [p for pl in self.placements for i in pl.blocks for p in self._new[i].parameters()]
        elif what == "organs+neighbours":
            self.own_neighbours()
            params = [p for m in self._new.values() for p in m.parameters()]
        elif what == "bridges+organs":
            params = [p for pl in self.placements for i in pl.blocks for p in self._new[i].parameters()] + (
                list(self.bridges.parameters()) if self.bridges is not None else []
            )
        else:
            raise GraftError(f"internal: unknown training target {what}")
        return train_lm(
            self.working,
            self.target.tokenizer,
            texts,
            params,
            config,
            seed=seed,
            progress=progress,
            what=f"training {what}",
        )

    # -- saving -------------------------------------------------------------------------------------
    def save_card(self, out_dir: Union[str, Path], card: dict[str, Any]) -> Path:
        """Save the applied state as a Hugging Face folder + surgery.json (+ bridges.safetensors)."""
        self.apply()
        card = dict(card)
        if self.bridges is None:
            card["bridges"] = None
            return save_transplant(self.working, self.target.tokenizer, out_dir, card)
        bs = self.bridges
        # Blocks of another width cannot be Hugging Face weights under the recipient's config: the
        # folder holds the recipient's blocks at those indices, and the organ's go beside them.
        wide = {
            i: self._new[i]
            for pl in self.placements
            if pl.organ.hidden_size != self.target.arch.hidden_size
            for i in pl.blocks
        }
        fields = {i: pl.organ.card["architecture"] for pl in self.placements for i in pl.blocks if i in wide}
        uninstall(self.working)  # the HF folder holds the plain blocks; the bridges go beside them
        # what Graft's loader rebuilds (less the bridges), hashed only when it differs from the HF weights
        weight_hash = state_dict_hash(self.working.state_dict()) if wide else None
        blocks = self.blocks
        try:
            for i in wide:
                blocks[i] = self._orig[i]
            card["bridges"] = bridges_entry(bs)
            if wide:
                card["bridges"]["organ_blocks"] = {"file": ORGAN_BLOCKS_FILE}  # completed below
            out = save_transplant(self.working, self.target.tokenizer, out_dir, card)
            save_bridges(bs, out)
            if wide:
                saved = json.loads((out / "surgery.json").read_text())
                saved["bridges"]["organ_blocks"] = save_organ_blocks(wide, fields, out)
                saved["hf_weight_hash"], saved["saved_weight_hash"] = saved["saved_weight_hash"], weight_hash
                (out / "surgery.json").write_text(json.dumps(saved, indent=2, allow_nan=False))
        finally:
            for i, mod in wide.items():
                blocks[i] = mod
            install(self.working, self.blocks, bs)
        return out

    def bridges_sha256(self) -> Optional[str]:
        if self.bridges is None:
            return None
        h = hashlib.sha256()
        for k, v in sorted(bridge_tensors(self.bridges).items()):
            h.update(k.encode())
            h.update(v.contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()
