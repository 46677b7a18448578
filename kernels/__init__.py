"""Triton kernels of fusedgru (installed as fusedgru.kernels)."""
