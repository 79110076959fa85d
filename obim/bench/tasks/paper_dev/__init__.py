"""lm-eval tasks on the paper benchmarks' dev data: the search's objective on the real models (obim.bench.search)."""
