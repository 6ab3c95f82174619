"""Which GPU a program is lowered for, and lowering GPU kernels where there is no GPU
(`jax.export(..., platforms=["cuda"])` on a laptop).

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
A100 = "NVIDIA A100-SXM4-80GB"

# Compute capability by a word of the device kind JAX reports ("NVIDIA H100 80GB HBM3"), for lowering
# without the device; the first match in this order wins.
_CAPABILITY_BY_NAME: tuple[tuple[str, tuple[int, int]], ...] = (
    ("GB200", (10, 0)), ("B200", (10, 0)), ("B100", (10, 0)), ("GH200", (9, 0)), ("H200", (9, 0)),
    ("H100", (9, 0)), ("H800", (9, 0)), ("H20", (9, 0)), ("L40", (8, 9)), ("L4", (8, 9)),
    ("RTX 40", (8, 9)), ("A100", (8, 0)), ("A800", (8, 0)), ("A40", (8, 6)), ("A10", (8, 6)),
    ("RTX 30", (8, 6)), ("T4", (7, 5)), ("V100", (7, 0)),
)


def gpu_compute_capability() -> tuple[int, int] | None:
    """The compute capability of the GPU being lowered for: the abstract mesh's device (a mesh of
    topology devices, or `gpu_lowering_target`), else the first local GPU; None when neither says."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    if device is not None and device.platform in ("gpu", "cuda"):
        return next((cc for word, cc in _CAPABILITY_BY_NAME if word in device.device_kind), None)
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:  # no GPU backend in this process
        return None
    return tuple(int(part) for part in gpus[0].compute_capability.split(".")[:2]) if gpus else None


@contextlib.contextmanager
def gpu_lowering_target(device_kind: str = H100, num_cores: int | None = None) -> Iterator[None]:
    """Lower GPU kernels inside this block for `device_kind` (a device_kind string as JAX reports it)."""
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=num_cores, platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device)):
        yield
