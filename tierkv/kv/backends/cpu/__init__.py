"""The ``cpu`` backend: the C++ kernels under ``csrc`` (decode, tiered decode, store writes,
compaction, flash prefill), built on first use by ``tierkv.extension``."""
