"""obim: an experiment and benchmark harness for merging LLMs, built around OBIM (Optimal Brain Iterative Merging).

obim.merging is the merging library (checkpoints, selection, saliency, the method registry, the driver, its CLIs);
obim.bench is the benchmark harness on top of it (plan, job stages, caches, evaluation, tracking, reporting, the
toy zoo). The library imports nothing from the harness. This package re-exports the library's API."""

# first: torch, MKL and OpenMP read these settings once, when torch loads
from .merging import determinism as _determinism  # noqa: F401  (CPU kernels pinned: obim.merging.determinism)
from .merging import threads as _threads  # noqa: F401  (OMP_WAIT_POLICY, for its side effect)
from .merging.config import MergeConfig, load_config
from .merging.errors import ObimError
from .merging.merge import MergeResult, merge
from .merging.methods import METHODS, Method, get_method, register
from .merging.saliency import compute_hdiag, load_hdiag, save_hdiag
from .merging.version import obim_version

__version__ = obim_version()  # from the package metadata (pyproject.toml)

__all__ = [
    "METHODS",
    "MergeConfig",
    "MergeResult",
    "Method",
    "ObimError",
    "compute_hdiag",
    "get_method",
    "load_config",
    "load_hdiag",
    "merge",
    "register",
    "save_hdiag",
]


def __getattr__(name: str):
    # obim.tasks_dir() (spec/interfaces.md section 5) lives in the harness: imported on first use, so importing the
    # library never loads the harness
    if name == "tasks_dir":
        from .bench.evaluation import tasks_dir

        return tasks_dir
    raise AttributeError(f"module 'obim' has no attribute '{name}'")
