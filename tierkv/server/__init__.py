"""The OpenAI-compatible HTTP server: ``tierkv serve``."""
