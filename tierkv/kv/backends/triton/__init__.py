"""The ``triton`` backend: paged decode over quantized pages as a Triton kernel (GPU, or CPU
tensors under ``TRITON_INTERPRET=1`` for tests)."""
