"""The sweep's reporting, in layers whose imports point one way (tests/test_imports.py checks it):

results  a sweep's result.json files read back as typed JobRecords; labels, Table, the paper's numbers
tables   the paper's tables from the results
plots, costs   figures of the tables and Figure 3; jobs.md and Table 10 (from results and tables, never imported by
         tables)
write    the end of a sweep: every file once, then their W&B logging
search_report   the search's studies and its tuned table

obim.bench.console prints them. Nothing is imported here, so loading one layer loads no other."""
