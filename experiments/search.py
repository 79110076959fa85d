"""The search: `python experiments/search.py [overrides]` (conf/search.yaml; docs/search.md).

Every method of `search.methods` tuned with the same budget (`search.trials`, TPE with the sampler seed
`search.seed`) on the experiment's dev tasks, its best trial then scored on the test benchmarks; writes
<results_dir>/<experiment>/table1_tuned.md|csv (results_dir: outputs/tables) and the studies' plots. Overrides are
the sweep's (experiment=, eval.*, tracking=...) and search.*, e.g.

    python experiments/search.py search.trials=6 search.methods=[ta,ties,obim]
    python experiments/search.py experiment=llama2_13b_sft eval=vllm

A search stopped midway (killed, or a failed trial) resumes where it stopped when run again.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if os.environ.get("OBIM_THREAD_BUDGET", "1").strip().lower() not in {"0", "off", "false", "no"}:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see experiments/sweep.py)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a source checkout runs without installing


def main(argv: list[str]) -> int:
    from obim.bench.search import run_search
    from obim.merging.errors import ObimError

    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        run_search(argv)
    except ObimError as e:
        print(f"search: error: {e}", file=sys.stderr)
        return 2
    except Exception:
        print(
            "search: stopped by the error below; run the same command again to resume (finished trials are "
            "kept in the study file)",
            file=sys.stderr,
        )
        raise
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
