"""Triton kernels (fused jagged HSTU attention, forward and backward)."""
