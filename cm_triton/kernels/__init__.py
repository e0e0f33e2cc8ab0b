"""Triton kernels (optional accelerators of the reference). Filled by the kernels issue."""
