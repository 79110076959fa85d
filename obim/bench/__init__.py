"""The benchmark harness on top of obim.merging: sweep plans and job stages, content-addressed caches, validation
sets from datasets, lm-eval evaluation (toy and paper tasks), judging, tracking, tables and figures, the toy zoo."""
