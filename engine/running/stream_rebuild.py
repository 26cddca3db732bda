"""T' of a transplant on a streamed pair, for T12 (docs/methods.md, "Streaming"): never in memory.

On the streamed route T' is a folder (:class:`engine.surgery.folder_edit.FolderEdit`: the target's
files linked, the changed tensors written into copied shards), and T and T' are both read block by
block. :func:`streamed_tprime` gives that pair for a diagnostic:

* ``--run RUN_ID`` of a swap or conjugation made on a streamed pair: T' is the folder the run saved.
  T must still be the run's (its files' fingerprint, ``weight_hash_before``), and the changed tensors
  read again from T''s folder must hash as the run recorded (``changed_tensors_sha256``).
* ``--donor/--target`` streamed: a module swap chosen as T11 chooses, written into a staged folder
  beside the target's (same file system, so the untouched shards are links), removed at the end.

"Applied twice" (:meth:`StreamedTPrime.again`) writes T' a second time from the same inputs into
another staged folder and compares the digests; a conjugation's maps are fitted again for it, as
the in-memory rebuild does.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..core.errors import GraftError
from ..core.paths import graft_home
from ..core.progress import Progress, silent
from ..loading.model_folders import SURGERY_CARD
from ..loading.models import LoadedModel, ModelSpec, ModelStore
from ..loading.stream_forward import stream_fingerprint
from ..surgery.folder_edit import changed_hash_of
from .stream_surgery import conjugated_values, open_saved, restage, stage_folder, swap_values

Values = list[tuple[str, Callable[[], Any]]]


@dataclass
class StreamedTPrime:
    target: LoadedModel  # T, streamed (the cached model: evaluate it under its lock)
    tprime: LoadedModel  # T', streamed from ``folder``
    folder: Path
    keys: list[str]  # checkpoint keys of the tensors T' changes
    changed_sha256: str  # digest of those tensors' bytes in T'
    source: dict[str, Any]  # what T' is, in the shape of the in-memory rebuild's source
    values: Callable[[Progress], Values]  # T''s changed tensors made again from the same inputs
    close: Callable[[], None] = field(default=lambda: None)  # removes a staged T' (nothing for a run's)

    def again(self, progress: Optional[Progress] = None) -> dict[str, Any]:
        """Stability check "applied twice": T' written again into a staged folder beside the target
        (removed after), its changed tensors' digest against the first, and T's bytes untouched."""
        progress = progress or silent()
        first = self.changed_sha256
        second, untouched = restage(
            self.target, scratch_folder(self.target, "again"), self.values(progress.sub(0.0, 0.8)), progress
        )
        same = second == first
        recorded = self.source.get("changed_tensors_sha256_recorded")
        matches = recorded is None or recorded == first
        passed = bool(same and untouched and matches)
        why = [
            w
            for ok, w in (
                (same, f"the changed tensors hash differently ({first[:12]} then {second[:12]})"),
                (untouched, "the target's own bytes changed"),
                (matches, f"T' hashes {first[:12]}, the run recorded {str(recorded)[:12]}"),
            )
            if not ok
        ]
        detail = (
            f"written twice: identical changed tensors {first[:12]}, the target's bytes untouched"
            + (", equal to the run's" if recorded else "")
            if passed
            else "; ".join(why)
        )
        return {
            "passed": passed,
            "detail": detail,
            "hash_first": first,
            "hash_second": second,
            "rollback_bit_exact": bool(untouched),
            "hash_recorded": recorded,
        }


def scratch_folder(target: LoadedModel, what: str) -> Path:
    """Where a temporary T' is staged: beside the target's folder (one file system, so its untouched
    shards are hard links, not copies), or under GRAFT_HOME when that folder's parent is read-only.
    The staging is registered, so a process killed mid-way leaves nothing that a later one keeps."""
    parent = target.stream.index.folder.resolve().parent
    if not os.access(parent, os.W_OK):
        parent = graft_home() / "work"
    return parent / f".{target.stream.index.folder.name}.{what}-{uuid.uuid4().hex[:8]}"


def streamed_tprime(ctx: Any, k: int, modules: str, progress: Progress) -> StreamedTPrime:
    """T and T' streamed, for a diagnostic of a transplant (module docstring)."""
    from ..surgery.transplant import ModuleSwap
    from .module_choice import choose_modules
    from .rebuild import load_run

    if ctx.run is not None:
        return from_run(load_run(ctx.run), ctx.store or ModelStore(), ctx.options.device, progress)
    target, donor = ctx.target, ctx.donor
    if not (target.streamed and donor.streamed):
        raise GraftError("a streamed module swap needs both models streamed (--stream on, model folders)")
    chosen, explicit = choose_modules(ctx, k, modules, progress.sub(0.0, 0.7))
    swap = ModuleSwap(target, donor, [m["name"] for m in chosen])
    values = swap_values(swap, donor)
    card = {"operation": "module-swap", "purpose": "T12 (removed after)", "modules": list(swap.modules)}
    edit, staged, untouched = stage_folder(
        target, str(scratch_folder(target, "t-prime")), values, card, progress.sub(0.7, 1.0)
    )
    try:
        tprime = open_saved(staged, target)
        if not untouched:  # pragma: no cover - guard: stage_folder never writes the target's files
            raise GraftError("internal: writing T' changed the target's own bytes")
        source = {
            "kind": "swap",
            "run_id": None,
            "tool": "swap",
            "operation": "module-swap",
            "route": "streamed",
            "donor": donor.spec.ref,
            "target": target.spec.ref,
            "modules": list(swap.modules),
            "selection": "explicit" if explicit else "top-k",
            "weight_hash_before": stream_fingerprint(target),
            "changed_tensors_sha256": edit.changed_hash(),
        }
    except BaseException:
        edit.abort()
        raise
    return StreamedTPrime(
        target,
        tprime,
        staged,
        sorted(edit.changed),
        edit.changed_hash(),
        source,
        lambda p: values,
        edit.abort,
    )


def _open(env: dict[str, Any], key: str, store: ModelStore, device: Optional[str], dtype: str) -> LoadedModel:
    trust = bool(((env.get("result") or {}).get("card") or {}).get("trust_remote_code", False))
    model = store.get(
        ModelSpec.parse(env[key], trust_remote_code=trust), device or "auto", dtype, stream=True
    )
    if not model.streamed:  # pragma: no cover - guard: a built-in model has no folder to stream
        raise GraftError(f"{model.label} cannot stream: it is not a model folder")
    return model


def from_run(
    env: dict[str, Any], store: ModelStore, device: Optional[str], progress: Progress
) -> StreamedTPrime:
    """T' of a finished streamed run: the folder it saved, checked against what the run recorded."""
    result = env.get("result") or {}
    run = env.get("run_id")
    folder = result.get("saved_to")
    if not folder:
        raise GraftError(f"run {run} did not save T' (it was rolled back): there is no T' to check")
    folder = Path(folder)
    if not (folder / SURGERY_CARD).is_file():
        raise GraftError(f"run {run} saved T' at {folder}, which is gone or has no {SURGERY_CARD}")
    card = json.loads((folder / SURGERY_CARD).read_text())
    keys = card.get("changed_tensors")
    if not isinstance(keys, list) or not keys:
        raise GraftError(
            f"{folder} does not list its changed tensors (saved by an older Graft): run it again"
        )
    opts = (env.get("meta") or {}).get("options") or {}
    dtype = opts.get("dtype", "float32")
    progress(0.0, f"opening T and T' of run {run}")
    target = _open(env, "target", store, device or opts.get("device"), dtype)
    if stream_fingerprint(target) != result.get("weight_hash_before"):
        raise GraftError(
            f"the target {target.label} has changed since run {run} (its files differ): run it again"
        )
    progress(0.3, "hashing T''s changed tensors")
    digest = changed_hash_of(folder, [str(k) for k in keys])
    recorded = (result.get("saved_files") or {}).get("changed_tensors_sha256") or card.get(
        "changed_tensors_sha256"
    )
    if digest != card.get("changed_tensors_sha256") or digest != recorded:
        raise GraftError(f"T' at {folder} is not the one run {run} saved (its changed tensors differ)")
    tprime = open_saved(folder, target)
    tool = env.get("tool")
    source = {
        "kind": "run",
        "run_id": run,
        "tool": tool,
        "operation": "module-swap" if tool == "swap" else "rank-k conjugation",
        "route": "streamed",
        "donor": env.get("donor") or env.get("adapter"),
        "target": env.get("target"),
        "modules": [m["name"] for m in result.get("modules") or []] or list(card.get("target_modules") or []),
        "weight_hash_before": result.get("weight_hash_before"),
        "changed_tensors_sha256": digest,
        "changed_tensors_sha256_recorded": recorded,
        "saved_to": str(folder),
    }
    if tool == "swap":

        def values(p: Progress) -> Values:
            from ..surgery.transplant import ModuleSwap

            donor = _open(env, "donor", store, device or opts.get("device"), dtype)
            return swap_values(ModuleSwap(target, donor, source["modules"]), donor)

    elif tool == "conjugate":

        def values(p: Progress) -> Values:
            return _conjugation_again(env, store, device, target, p)

    else:
        raise GraftError(f"run {run} is a {tool} run: only a swap or a conjugation writes T' as a folder")
    progress(1.0, "T' is the run's; T unchanged")
    return StreamedTPrime(target, tprime, folder, [str(k) for k in keys], digest, source, values)


def _conjugation_again(
    env: dict[str, Any], store: ModelStore, device: Optional[str], target: LoadedModel, progress: Progress
) -> Values:
    """A conjugation run's new weights made again: the update read again and every map fitted again
    on the run's workload (checked by its sha256), on streamed models."""
    from ..core.data import resolve_workload
    from ..core.params import RunOptions, build_params
    from ..surgery.conjugate import Conjugation
    from .conjugation import conjugation_plan, update_deltas
    from .context import ToolContext
    from .registry import get_tool

    meta = env.get("meta") or {}
    options = build_params(RunOptions, {**(meta.get("options") or {}), "device": device or "auto"})
    params = build_params(get_tool("conjugate").params_cls, {**(meta.get("params") or {}), "save": ""})
    workload = resolve_workload(options.workload)
    recorded = (meta.get("workload") or {}).get("sha256")
    if recorded and workload.sha256 != recorded:
        raise GraftError(
            f"the workload {workload.name} has changed since this run: run the conjugation again"
        )
    base = _open(env, "base", store, device, options.dtype)
    donor = _open(env, "donor", store, device, options.dtype) if env.get("donor") else None
    ctx = ToolContext(donor, target, workload, options, base=base, adapter=env.get("adapter"), store=store)
    progress(0.0, "reading the update again")
    deltas, _, _ = update_deltas(ctx, params, progress.sub(0.0, 0.1))
    progress(0.1, "fitting the maps again")
    plan = conjugation_plan(ctx, params, deltas, progress.sub(0.1, 1.0))
    return conjugated_values(target, Conjugation(target, plan))
