"""Triton kernels (installed as fastp2p.kernels); filled by the kernels issue."""
