"""The ``torch`` backend: decode attention over quantized pages in fused torch ops."""
