"""lm-eval task definitions of the toy benchmarks.

Pass obim.bench.evaluation.tasks_dir() to TaskManager(include_path=...)."""
