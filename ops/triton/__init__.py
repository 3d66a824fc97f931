"""Triton kernels (fused jagged HSTU attention and gathered dot products, forward and backward)."""
