"""The rehearsal of the real experiments on CPU: `python experiments/rehearse.py [--presets table1,...]
[--limit 2] [--search-trials 2] [overrides...]` (or `make rehearse`).

Builds the offline mirror (stand-ins of Llama-2-13B, its three experts and Qwen2-7B with its checkpoints, and small
copies of every dataset, all under the real hub ids) and runs every paper preset of llama2_13b_sft and
qwen2_7b_pt, then the search with a 2-trial budget, through the real code path with HF_HOME=<mirror> and the hub
offline; each preset's dry run first. Everything lands in $OBIM_CACHE/rehearsal (--out), with a summary in its
results/rehearsal.md. docs/rehearsal.md says what it checks and what it does not.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a source checkout runs without installing

if __name__ == "__main__":
    from obim.bench.rehearsal.run import main

    sys.exit(main(experiments=Path(__file__).resolve().parent))
