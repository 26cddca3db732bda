"""Built-in tools. Importing this package registers each of them exactly once."""
from . import bridge, cka, compat, procrustes  # noqa: F401
from . import modules  # noqa: F401  (T7, T8, T11: module ranking, swap, sweep)
