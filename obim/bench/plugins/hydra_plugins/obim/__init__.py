"""obim's Hydra launcher, installed as the package hydra_plugins.obim (pyproject.toml): Hydra instantiates launchers
only from the hydra_plugins namespace, and imports every module there at start-up, so this one stays small. The
work is in obim.bench.slurm."""

from typing import Any

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SubmititSlurmLauncher


class SlurmLauncher(_SubmititSlurmLauncher):
    """hydra-submitit-launcher's Slurm launcher, waiting on every job at once and naming a job Slurm killed, with
    or without accounting, instead of waiting for it forever (obim.bench.slurm.launch)."""

    def launch(self, job_overrides: Any, initial_job_idx: int) -> Any:
        from obim.bench.slurm import launch

        return launch(self, job_overrides, initial_job_idx)
