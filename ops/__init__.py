"""Jagged tensor ops and HSTU attention (PyTorch reference; Triton kernels in ops/triton)."""
