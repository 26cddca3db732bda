"""Built-in tools, one file each. Importing this package registers each of them exactly once."""
from . import bridge, cka, compat, procrustes  # noqa: F401  (T1-T4)
from . import rank, swap, sweep  # noqa: F401  (T7 module ranking, T11 module swap, T8 K sweep)
from . import cartography, spectrum  # noqa: F401  (T5 concept cartography, T6 spectrum and rank-k)
from . import conjugate  # noqa: F401  (rank-k conjugation transplant, Model Surgery operation 3)
