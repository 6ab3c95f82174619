"""Lowering the GPU kernel where there is no GPU: `jax.export(..., platforms=["cuda"])` on a laptop.

The Triton lowering of JAX 0.12 asks which GPU it compiles for (its compute capability) and, with no
GPU present, reads the abstract device of the current abstract mesh (JAX 0.10.2 asks nothing and
accepts the same context). Under a mesh of real or topology devices, `jax.sharding.use_abstract_mesh(
mesh.abstract_mesh)` carries the device already; this is for lowering with no mesh at all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax

H100 = "NVIDIA H100 80GB HBM3"


@contextlib.contextmanager
def gpu_lowering_target(device_kind: str = H100, num_cores: int | None = None) -> Iterator[None]:
    """Lower GPU kernels inside this block for `device_kind` (a device_kind string as JAX reports it)."""
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=num_cores, platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device)):
        yield
