"""Checkpoint loading and the decoder shared by the supported model families."""
