"""Packed ternary weights and the matmul that reads them. Knows nothing of models.

`pack_ternary` / `unpack_ternary`: the canonical 2-bit format; `pack_archive` / `unpack_archive`: the
base-3 download format; `ternary_matmul`: x @ (scale * T) + bias straight from packed weights;
`gpu_lowering_target`: lower the GPU kernel (export, deviceless compiles) on a machine without a GPU.
"""

from pallas_kernels.lowering import gpu_lowering_target
from pallas_kernels.packing import pack_archive, pack_ternary, unpack_archive, unpack_ternary
from pallas_kernels.ternary_matmul import ternary_matmul

__all__ = ["gpu_lowering_target", "pack_archive", "pack_ternary", "ternary_matmul", "unpack_archive", "unpack_ternary"]
