"""Triton kernels of upernet_fast (installed as upernet_fast.kernels)."""
