"""The merging library: checkpoint I/O, selection, random streams, saliency (OBM), the method registry (sparsifiers
composed with combiners, the paper's Table 7), the streaming driver and the obim-merge/obim-saliency CLIs. It
imports nothing from obim.bench (tests/test_layout.py checks)."""
