"""A full fine-tune as low-rank factors: the update ``dW = W_D - W_B`` of a donor D against its base B.

:func:`finetune_deltas` forms ``dW`` per shared linear module of the blocks and keeps a truncated
randomized SVD of it (:func:`engine.adapters.lowrank.randomized_svd`, never a dense SVD of a large matrix)
as :class:`engine.adapters.lowrank.ModuleDelta` factors, plus the exact ``||dW||_F`` so energy shares stay
exact.

**Randomized SVD**: Halko, Martinsson & Tropp (2011), Alg. 4.4 (subspace
iteration with QR re-orthonormalisation), oversampling 8, 4 power iterations, float64, a
Gaussian test matrix seeded per module from ``seed`` and the module name (so a module's factors
do not depend on which other modules were asked for). Matrices whose smaller side is at most
``rank + oversampling`` are small: they get an exact SVD.
"""

from __future__ import annotations

import threading
import weakref
import zlib
from dataclasses import replace
from typing import Any, Callable, Optional

import torch

from ..core.errors import GraftError
from ..loading.arch import linear_weight_out_in
from ..loading.stream_forward import held
from .lowrank import OVERSAMPLE, POWER_ITERS, ModuleDelta, fix_signs, randomized_svd

_FT_CACHE: dict[str, Any] = {}
_FT_LOCK = threading.Lock()


def _module_seed(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def finetune_deltas(
    donor: Any,
    base: Any,
    rank: int,
    progress: Optional[Callable[..., None]] = None,
    seed: int = 0,
    *,
    select: Optional[Callable[[str], bool]] = None,
    cache: bool = True,
) -> list[ModuleDelta]:
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
        raise GraftError(
            f"donor and base are different architectures ({fd} vs {fb}): a full fine-tune delta needs the "
            "donor's own base model"
        )
    if donor.arch.n_layers != base.arch.n_layers:
        raise GraftError(
            f"donor has {donor.arch.n_layers} blocks and base {base.arch.n_layers}: a full fine-tune "
            "delta needs the donor's own base model"
        )
    dmods = donor.arch.linear_modules()
    bmods = {m.name: m for m in base.arch.linear_modules()}
    shared = []
    for m in dmods:
        b = bmods.get(m.name)
        if b is None:
            continue
        if tuple(b.shape) != tuple(m.shape):
            raise GraftError(
                f"donor and base differ in shape at {m.name} ({m.shape[0]}x{m.shape[1]} vs "
                f"{b.shape[0]}x{b.shape[1]}): a full fine-tune delta needs the donor's own base model"
            )
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
                    _FT_CACHE["entry"] = {
                        "key": key,
                        "donor": weakref.ref(donor),
                        "base": weakref.ref(base),
                        "deltas": store,
                    }
                except TypeError:  # not weak-referenceable: no caching
                    pass
    out: list[ModuleDelta] = []
    for i, (m, b) in enumerate(wanted):
        hit = store.get(m.name)
        if hit is None:
            # streamed models read just these two weights (engine.loading.stream_forward.held)
            with torch.no_grad(), held((donor, [f"{m.path}.weight"]), (base, [f"{b.path}.weight"])):
                wd = linear_weight_out_in(donor.arch.module(m.path)).detach()
                wb = linear_weight_out_in(base.arch.module(b.path)).detach().to(wd.device)
                dW = wd.to(torch.float64) - wb.to(torch.float64)
                if not torch.isfinite(dW).all():
                    raise GraftError(f"{m.name}: the donor or base weight has non-finite values")
                norm = float(torch.linalg.matrix_norm(dW))
                gen = torch.Generator(device="cpu").manual_seed(_module_seed(seed, m.name))
                U, S, Vh = randomized_svd(dW, min(rank, min(dW.shape)), generator=gen)
                U, Vh = fix_signs(U, Vh)
                hit = ModuleDelta(
                    name=m.name,
                    layer=m.layer,
                    module=m.canonical,
                    kind=m.kind,
                    B=(U * S).to(device="cpu", dtype=torch.float32).contiguous(),
                    A=Vh.to(device="cpu", dtype=torch.float32).contiguous(),
                    frob_norm=norm,
                    source=m.path,
                    known=True,
                    scale=1.0,
                )
            store[m.name] = hit
        out.append(replace(hit))
        if progress is not None:
            progress((i + 1) / len(wanted), f"delta {i + 1}/{len(wanted)}: {m.name}")
    return out
