"""Benchmarks: throughput and serving load."""
