"""The ``reference`` backend: gather, dequantize, attend densely (torch, any device)."""
