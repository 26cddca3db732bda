"""Built-in tools. Importing this package registers each of them exactly once."""
from . import bridge, cka, compat, procrustes  # noqa: F401
