"""`ternary_matmul`: x @ (scale * T) + bias with T read from 2-bit packed weights.

Layouts (`pallas_kernels.packing`): "canonical" (the files' format) and "tiled" (what the kernels read,
x as it is). The XLA backend reads either. A kernel given canonical weights re-lays them on every
call, a transient of the layer's unpacked codes: keep weights tiled on accelerators (`pack_model` and
`load_flux` do, once, at load time).

Backends: "xla" (the reference: unpack, one dot accumulating in float32, scale and bias after),
"mosaic_gpu" (Hopper and newer, bf16/f16), "triton" (older GPUs, and float32), "mosaic_tpu" (TPU
kernel), and "auto", which picks by the platform the call is lowered for through
`jax.lax.platform_dependent` (so an exported model carries the right kernel for each platform): on
cuda, Mosaic GPU for compute capability 9.0 and up (the device lowered for, deviceless compiles
included: `pallas_kernels.lowering.gpu_compute_capability`) and Triton below it or when unknown; Mosaic
on tpu; XLA elsewhere.

Differentiation: a custom VJP gives gradients with respect to x, scale and bias (computed with XLA
from the packed weights); the packed codes are integers and have none.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.lowering import gpu_compute_capability
from pallas_kernels.mosaic_gpu import DTYPES as MOSAIC_GPU_DTYPES
from pallas_kernels.mosaic_gpu import MosaicGPUBlocks, mosaic_gpu_matmul
from pallas_kernels.mosaic_tpu import MosaicBlocks, mosaic_matmul
from pallas_kernels.packing import LAYOUTS, tiled_rows, to_tiled, unpack_layout
from pallas_kernels.triton_gpu import TritonBlocks, triton_matmul

BACKENDS = ("auto", "xla", "mosaic_gpu", "triton", "mosaic_tpu")


def _rows(k: int, layout: str) -> int:
    return tiled_rows(k) if layout == "tiled" else -(-k // 4)


def _check(x, packed, scale, bias, layout) -> tuple[int, int]:
    k = x.shape[-1]
    if layout not in LAYOUTS:
        raise ValueError(f"unknown packed layout {layout!r}; available: {', '.join(LAYOUTS)}")
    if packed.ndim != 2 or packed.dtype != jnp.uint8:
        raise ValueError(f"packed must be 2-D uint8 (rows, N), got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[0] != _rows(k, layout):
        raise ValueError(f"x has K={k} (shape {tuple(x.shape)}) but packed has {packed.shape[0]} rows "
                         f"(shape {tuple(packed.shape)}); K={k} needs {_rows(k, layout)} in the {layout} layout")
    n = packed.shape[1]
    if scale.shape not in ((n,), (1,)):
        raise ValueError(f"scale has shape {tuple(scale.shape)}; packed has N={n}, so scale must be ({n},) or (1,)")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}; packed has N={n}, so bias must be ({n},)")
    if x.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"x must be float32 or bfloat16, got {x.dtype}")
    return k, n


def _xla(x, packed, scale, bias, layout):
    weights = unpack_layout(packed, x.shape[-1], layout).astype(x.dtype)
    out = jnp.dot(x, weights, preferred_element_type=jnp.float32) * scale + bias
    return out.astype(x.dtype)


def _kernel(kernel, layout, **options):
    """`kernel` on weights of `layout`: tiled as they are, canonical re-laid first."""
    def run(x, packed, scale, bias):
        tiled = packed if layout == "tiled" else to_tiled(packed, x.shape[-1])
        return kernel(x, tiled, scale, bias, **options)
    return run


def _gpu(x, packed, scale, bias, layout):
    """The cuda branch: Mosaic GPU on Hopper and newer for 16-bit activations, Triton otherwise."""
    capability = gpu_compute_capability()
    hopper = capability is not None and capability >= (9, 0) and x.dtype in MOSAIC_GPU_DTYPES
    return _kernel(mosaic_gpu_matmul if hopper else triton_matmul, layout)(x, packed, scale, bias)


def _forward(x, packed, scale, bias, backend: str, layout: str, interpret: bool, blocks):
    if backend == "xla":
        return _xla(x, packed, scale, bias, layout)
    if backend == "mosaic_gpu":
        return _kernel(mosaic_gpu_matmul, layout, blocks=blocks, interpret=interpret)(x, packed, scale, bias)
    if backend == "triton":
        return _kernel(triton_matmul, layout, blocks=blocks, interpret=interpret)(x, packed, scale, bias)
    if backend == "mosaic_tpu":
        return _kernel(mosaic_matmul, layout, blocks=blocks, interpret=interpret)(x, packed, scale, bias)
    return jax.lax.platform_dependent(
        x, packed, scale, bias,
        cuda=functools.partial(_gpu, layout=layout),
        tpu=_kernel(mosaic_matmul, layout),
        default=functools.partial(_xla, layout=layout),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _matmul(x, packed, scale, bias, backend, layout, interpret, blocks):
    return _forward(x, packed, scale, bias, backend, layout, interpret, blocks)


def _matmul_fwd(x, packed, scale, bias, backend, layout, interpret, blocks):
    return _forward(x, packed, scale, bias, backend, layout, interpret, blocks), (x, packed, scale)


def _matmul_bwd(backend, layout, interpret, blocks, residuals, g):
    x, packed, scale = residuals
    weights = unpack_layout(packed, x.shape[-1], layout).astype(jnp.float32)
    g32 = g.astype(jnp.float32)
    dx = jnp.dot(g32 * scale, weights.T).astype(x.dtype)
    dscale = jnp.sum(jnp.dot(x.astype(jnp.float32), weights) * g32, axis=0)
    return dx, None, dscale, jnp.sum(g32, axis=0)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def ternary_matmul(x, packed, scale, bias=None, *, layout: str = "canonical", backend: str = "auto",
                   interpret: bool | None = None,
                   blocks: MosaicGPUBlocks | TritonBlocks | MosaicBlocks | None = None) -> jax.Array:
    """x (..., K) bf16/f32, packed uint8 (ceil(K/4), N) canonical or (tiled_rows(K), N) tiled, scale
    (N,) or (1,), bias (N,) -> (..., N).

    Accumulates in float32 and returns x's dtype. Any M, K and N: blocks are padded inside.
    `interpret=True` runs a kernel backend on CPU ("mosaic_gpu" where JAX has its GPU interpreter,
    "triton", "mosaic_tpu"); `blocks` overrides that
    backend's tile table. Shapes that do not fit raise ValueError naming both.
    """
    x, packed, scale = jnp.asarray(x), jnp.asarray(packed), jnp.asarray(scale)
    bias = None if bias is None else jnp.asarray(bias)
    k, n = _check(x, packed, scale, bias, layout)
    if backend not in BACKENDS:
        raise ValueError(f"unknown ternary_matmul backend {backend!r}; available: {', '.join(BACKENDS)}")
    expected = {"mosaic_gpu": MosaicGPUBlocks, "triton": TritonBlocks, "mosaic_tpu": MosaicBlocks}.get(backend)
    if blocks is not None and (expected is None or not isinstance(blocks, expected)):
        raise ValueError(f"blocks {blocks!r} do not belong to backend {backend!r}")
    scale_n = jnp.broadcast_to(scale.astype(jnp.float32), (n,))
    bias_n = jnp.zeros((n,), jnp.float32) if bias is None else bias.astype(jnp.float32)
    lead = x.shape[:-1]
    out = _matmul(x.reshape(-1, k), packed, scale_n, bias_n, backend, layout, bool(interpret), blocks)
    return out.reshape(*lead, n)
