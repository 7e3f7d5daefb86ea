"""Attention backends over the paged store: ``reference`` (torch, any device: the oracle),
``torch`` (fused torch ops) and ``cpu`` (C++ kernels), with the partial-softmax math they share
(``partial``)."""
