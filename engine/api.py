"""The engine as the app sees it: everything ``app.py``, ``ui/``, ``pages/`` and ``viz/`` may call,
in one place (``tests/test_layering.py`` holds them to it). Importing this module registers every
built-in tool. The names are the engine's own objects, re-exported; nothing is wrapped."""

from __future__ import annotations

from . import tools  # noqa: F401  (importing registers every built-in tool)
from .adapters.lora import resolve_adapter
from .core import jsonsafe
from .core.data import builtin_concept_path, load_workload
from .core.errors import GraftError
from .core.outputs import check_output_file, write_text_atomic
from .core.params import ParamSpec, RunOptions, build_params, param_specs
from .core.paths import clean_stale_staging, describe_cleanup, graft_home, history_db
from .evaluation.evalcache import SCORES
from .loading.builtins import BUILTIN_DESCRIPTIONS, DEMO_DONOR, SMOLLM2, builtin_status
from .loading.hf_folder import cached_hub_models
from .loading.models import ModelSpec, ModelStore, model_card, remote_code_files, resolve_device
from .loading.preload import FAILED, LOADED, LOADING, LoadState, Preloader
from .running.actions import prepare_demo_donor
from .running.cells import check_ray_option
from .running.history import History, new_run_id
from .running.jobs import Job, JobRunner
from .running.live import LIVE, rebuild
from .running.memplan import MemoryPlan, duration, fmt_bytes, footprint, plan_run
from .running.organ_run import organs_dir
from .running.rebuild import rebuildable_tools
from .running.registry import all_tools, get_tool
from .running.runner import pair_labels, run_tool
from .surgery.organ import ORGAN_CARD, load_organ

__all__ = [
    "BUILTIN_DESCRIPTIONS",
    "DEMO_DONOR",
    "FAILED",
    "LIVE",
    "LOADED",
    "LOADING",
    "ORGAN_CARD",
    "SCORES",
    "SMOLLM2",
    "GraftError",
    "History",
    "Job",
    "JobRunner",
    "LoadState",
    "MemoryPlan",
    "ModelSpec",
    "ModelStore",
    "ParamSpec",
    "Preloader",
    "RunOptions",
    "all_tools",
    "build_params",
    "check_ray_option",
    "builtin_concept_path",
    "builtin_status",
    "cached_hub_models",
    "check_output_file",
    "clean_stale_staging",
    "describe_cleanup",
    "duration",
    "fmt_bytes",
    "footprint",
    "get_tool",
    "graft_home",
    "history_db",
    "jsonsafe",
    "load_organ",
    "load_workload",
    "model_card",
    "new_run_id",
    "organs_dir",
    "pair_labels",
    "param_specs",
    "plan_run",
    "prepare_demo_donor",
    "rebuild",
    "rebuildable_tools",
    "remote_code_files",
    "resolve_adapter",
    "resolve_device",
    "run_tool",
    "write_text_atomic",
]
