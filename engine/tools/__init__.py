"""Built-in tools, one file each. Importing this package imports every module in it, and each
module registers its tool(s) exactly once (a module-level ``TOOL = register(Tool(...))``), so a new
tool is one new file here: nothing to add to a list, and nothing vanishes when a line is forgotten.
``tests/test_conformance.py`` checks that every module here registers at least one tool."""

import importlib
import pkgutil

TOOL_MODULES: tuple[str, ...] = tuple(
    sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
)

for _name in TOOL_MODULES:
    importlib.import_module(f"{__name__}.{_name}")
