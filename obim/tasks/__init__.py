"""lm-eval task definitions of the toy benchmarks (pass obim.tasks_dir() to TaskManager(include_path=...))."""
