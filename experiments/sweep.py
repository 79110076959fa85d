"""The sweep: `python experiments/sweep.py -m [overrides]` (Hydra multirun over conf/sweep.yaml).

With no override it runs the default sweep on the toy SFT setting (Table 1 + the Table 3 ablations); every job
computes saliency statistics -> merges -> evaluates through lm-eval -> logs to W&B -> writes result.json, and the
tables are written when the sweep ends. The console shows a progress bar, a line per job and the main table at the
end (obim.bench.console); the libraries' logs go to each job's log file unless verbose=true. The axes, backends and
cluster launchers: docs/sweep.md; the paper's presets: docs/paper.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Before torch loads (obim.merging.threads.prefer_passive_openmp, which the obim package can only run when
# imported first):
# OpenMP's idle threads then sleep at once instead of spinning, and the jobs' own processes inherit it.
if os.environ.get("OBIM_THREAD_BUDGET", "1").strip().lower() not in {"0", "off", "false", "no"}:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a source checkout runs without installing


def _default_backend(argv: list[str]) -> list[str]:
    """vLLM is the default evaluation backend when CUDA is present (a defaults list cannot test for CUDA)."""
    if any(a.split("=", 1)[0].lstrip("+~") == "eval" for a in argv):
        return argv
    import torch

    return [*argv, "eval=vllm"] if torch.cuda.is_available() else argv


def parallel_jobs(launcher) -> int:
    """How many sweep jobs share this machine: the joblib launcher's n_jobs (joblib's meaning: -1 all CPUs, -2 all
    but one, ...), else 1 (the basic launcher runs one job at a time; Slurm gives each its own CPUs)."""
    if launcher is None or "joblib" not in str(launcher.get("_target_", "")).lower():
        return 1
    from obim.merging.threads import cores_available

    n = int(launcher.get("n_jobs", -1) or 1)
    return n if n > 0 else max(1, cores_available() + 1 + n)


def main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from obim.bench.joblog import job_session
    from obim.bench.slurm import SlurmTimeLimit, job_error, time_limit_not_swallowed
    from obim.bench.sweep import run_job
    from obim.merging.threads import configure

    @hydra.main(config_path="../conf", config_name="sweep", version_base="1.3")
    def job(cfg) -> dict:
        hc = HydraConfig.get()
        configure(parallel_jobs(hc.get("launcher")))  # this job's share of the machine's threads
        name = hc.job.override_dirname or hc.job.name
        overrides = list(hc.overrides.task)
        sweep_dir = hc.sweep.dir if hc.mode == RunMode.MULTIRUN else None
        with job_session(hc.runtime.output_dir, name, overrides, sweep_dir, bool(cfg.get("verbose"))) as s:
            try:
                with time_limit_not_swallowed():
                    outcome = s.finished(run_job(cfg, hc.runtime.output_dir, overrides, name, s))
            except (Exception, SlurmTimeLimit) as e:  # this job's one-line error on the console; the sweep goes on
                outcome = s.failed(e, job_error(e))  # (a Slurm time limit in obim's terms)
        if outcome["status"] == "failed" and not any(
            "SweepConsole" in str(c.get("_target_", "")) for c in (hc.callbacks or {}).values()
        ):
            print(f"sweep: error: {outcome['error']} (log: {outcome['log']})", file=sys.stderr)
            raise SystemExit(1)  # no console callback to report it and fail the sweep
        return outcome

    sys.argv = [sys.argv[0], *_default_backend(sys.argv[1:])]
    job()


if __name__ == "__main__":  # vLLM and joblib spawn processes: the guard is required
    main()
