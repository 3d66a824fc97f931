"""Jagged tensor ops, HSTU attention and gathered dot products (PyTorch references; Triton kernels in ops/triton)."""
