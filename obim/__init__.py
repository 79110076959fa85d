"""obim: an experiment and benchmark harness for merging LLMs, built around OBIM (Optimal Brain Iterative Merging)."""

__version__ = "0.1.0"

from . import threads as _threads  # noqa: E402,F401  (first: OpenMP reads OMP_WAIT_POLICY once, when torch loads)
from .config import MergeConfig, load_config  # noqa: E402
from .errors import ObimError  # noqa: E402
from .evaluation import tasks_dir  # noqa: E402
from .merge import MergeResult, merge  # noqa: E402
from .methods import METHODS, Method, get_method, register  # noqa: E402
from .saliency import compute_hdiag, load_hdiag, save_hdiag  # noqa: E402

__all__ = ["MergeConfig", "MergeResult", "METHODS", "Method", "ObimError", "compute_hdiag", "get_method",
           "load_config", "load_hdiag", "merge", "register", "save_hdiag", "tasks_dir"]
