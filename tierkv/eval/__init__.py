"""Evaluation helpers: the demo corpus split and the synthetic retrieval format."""
