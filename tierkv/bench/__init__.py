"""Benchmarks: throughput and serving load."""

# Where a benchmark workload's prompts come from (``throughput.Workload``, ``--dataset-name``).
DATASETS = ("random", "stdlib")
