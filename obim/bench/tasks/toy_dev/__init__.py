"""lm-eval tasks of the toy dev splits: the search's objective (obim.bench.search), never a test table's."""
