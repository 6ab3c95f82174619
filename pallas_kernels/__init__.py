"""Pallas kernels for the packed ternary matmul (Triton on GPU, Mosaic on TPU). Knows nothing of models.

The packed format and kernels arrive with the ternary and kernel issues (see ../shared/DESIGN.md).
"""
