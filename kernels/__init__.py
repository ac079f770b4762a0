"""Triton kernels of zero-init attention (installed as ``fastadapter.kernels``)."""
