"""Float32 linear layers on one CPU device through Intel MKL's sgemm, as XLA FFI calls.

XLA:CPU runs float32 dots on YNNPACK, whose GEMM takes 15-26% more time per FLOP than MKL's on
AVX-512 machines (docs/benchmarks.md, "Where the remaining time goes"); PyTorch's linears run on MKL.
With the `mkl` wheel installed (the `mkl` extra), `dot_general` hands every float32 `x @ W` of an
`nnx.Linear` on a single-device CPU backend to `cblas_sgemm` through a typed XLA FFI handler, so
XLA keeps fusing everything around it. Every other case stays XLA's own dot: other platforms (the
branch is chosen per platform at lowering, so TPU and GPU programs never see the call), other
dtypes, and CPU backends of several devices, where XLA's partitioner would gather a sharded operand
for a call it cannot split. `FLUX_JAX_CPU_MATMUL=xla` turns the MKL path off.

The handler is Python (ctypes) that reads XLA's C call frame (xla/ffi/api/c_api.h) and calls MKL
with the GIL released, so it costs microseconds per call; like `jax.pure_callback`, it takes the
GIL to start, and a thread busy in Python delays it. The call is this process's own: `jax.export`
refuses to serialize it, so export CPU programs with `FLUX_JAX_CPU_MATMUL=xla`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import os
import sys

import jax
import jax.numpy as jnp

_ENV = "FLUX_JAX_CPU_MATMUL"
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_METADATA_EXTENSION, _EXECUTE_STAGE = 1, 3  # XLA_FFI_Extension_Metadata, XLA_FFI_ExecutionStage_EXECUTE
_TARGET = "flux_jax_mkl_sgemm_{}{}"  # transposes of a and b: n (as stored) or t


# XLA FFI's C structures, as far as the handler reads them (xla/ffi/api/c_api.h, API 0.x).
class _Extension(ctypes.Structure):
    pass


_Extension._fields_ = [("struct_size", ctypes.c_size_t), ("type", ctypes.c_int), ("next", ctypes.POINTER(_Extension))]


class _ApiVersion(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("major_version", ctypes.c_int), ("minor_version", ctypes.c_int)]


class _Metadata(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("api_version", _ApiVersion), ("traits", ctypes.c_uint32)]


class _MetadataExtension(ctypes.Structure):
    _fields_ = [("extension_base", _Extension), ("metadata", ctypes.POINTER(_Metadata))]


class _Buffer(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p), ("dtype", ctypes.c_int),
                ("data", ctypes.c_void_p), ("rank", ctypes.c_int64), ("dims", ctypes.POINTER(ctypes.c_int64))]


class _Buffers(ctypes.Structure):  # XLA_FFI_Args and XLA_FFI_Rets share this layout
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p), ("size", ctypes.c_int64),
                ("types", ctypes.c_void_p), ("buffers", ctypes.POINTER(ctypes.POINTER(_Buffer)))]


class _CallFrame(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.POINTER(_Extension)),
                ("api", ctypes.c_void_p), ("ctx", ctypes.c_void_p), ("stage", ctypes.c_int),
                ("args", _Buffers), ("rets", _Buffers)]


_HANDLER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_CallFrame))


def _find_mkl() -> str | None:
    """libmkl_rt from the `mkl` wheel (installed under the environment's lib/), else the system's."""
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix, os.path.expanduser("~/.local"))):
        found = sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")))
        if found:
            return found[-1]
    return ctypes.util.find_library("mkl_rt")


def _handler(sgemm, trans_a: bool, trans_b: bool):
    """The FFI handler computing out = op(a) @ op(b) for two row-major float32 matrices."""

    def handle(frame_pointer):
        frame = frame_pointer.contents
        if frame.extension_start and frame.extension_start.contents.type == _METADATA_EXTENSION:
            extension = ctypes.cast(frame.extension_start, ctypes.POINTER(_MetadataExtension)).contents
            extension.metadata.contents.api_version.major_version = 0
            extension.metadata.contents.api_version.minor_version = 1
            extension.metadata.contents.traits = 0
            return None
        if frame.stage != _EXECUTE_STAGE:
            return None
        a, b = frame.args.buffers[0].contents, frame.args.buffers[1].contents
        rows_a, cols_a, rows_b, cols_b = a.dims[0], a.dims[1], b.dims[0], b.dims[1]
        m, k = (cols_a, rows_a) if trans_a else (rows_a, cols_a)
        n = rows_b if trans_b else cols_b
        sgemm(_ROW_MAJOR, _TRANS if trans_a else _NO_TRANS, _TRANS if trans_b else _NO_TRANS, m, n, k,
              1.0, a.data, cols_a, b.data, cols_b, 0.0, frame.rets.buffers[0].contents.data, n)
        return None

    return _HANDLER(handle)


_KEEP_ALIVE: list = []  # the ctypes handlers XLA holds raw pointers to


@functools.cache
def mkl_available() -> bool:
    """Whether float32 linears on a single-device CPU backend run on MKL (see the module docstring):
    loads MKL and registers the three FFI targets, once; False where MKL is absent or turned off."""
    if os.environ.get(_ENV, "mkl") == "xla":
        return False
    path = _find_mkl()
    if path is None:
        return False
    # MKL's OpenMP threads otherwise spin for 200 ms after each call, taking a core from the work XLA
    # runs between the products: the pipeline's step took 1.57-1.66 s with the spin, 1.30 s without
    # it, 1.45 s on XLA's dot (docs/benchmarks.md). Read when OpenMP starts, at MKL's first call.
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    try:
        sgemm = ctypes.CDLL(path).cblas_sgemm
    except (OSError, AttributeError):
        return False
    c_int, c_float, pointer = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    sgemm.argtypes = [c_int] * 6 + [c_float, pointer, c_int, pointer, c_int, c_float, pointer, c_int]
    sgemm.restype = None
    for trans_a, trans_b in ((False, False), (False, True), (True, False)):
        handler = _handler(sgemm, trans_a, trans_b)
        _KEEP_ALIVE.append(handler)
        name = _TARGET.format("nt"[trans_a], "nt"[trans_b])
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(ctypes.cast(handler, ctypes.c_void_p).value), platform="cpu")
    return True


def _sgemm(a: jax.Array, b: jax.Array, trans_a: bool, trans_b: bool) -> jax.Array:
    m = a.shape[1 if trans_a else 0]
    n = b.shape[0 if trans_b else 1]
    call = jax.ffi.ffi_call(_TARGET.format("nt"[trans_a], "nt"[trans_b]), jax.ShapeDtypeStruct((m, n), jnp.float32),
                            vmap_method="sequential")
    return call(a, b)


@jax.custom_vjp
def mkl_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (M, K) @ w (K, N) in float32 on MKL; CPU only (call `mkl_available()` first)."""
    return _sgemm(x, w, False, False)


def _matmul_fwd(x, w):
    return _sgemm(x, w, False, False), (x, w)


def _matmul_bwd(residuals, g):
    x, w = residuals
    return _sgemm(g, w, False, True), _sgemm(x, g, True, False)


mkl_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _single_cpu_device() -> bool:
    try:
        return len(jax.devices("cpu")) == 1
    except RuntimeError:  # no CPU backend in this process
        return False


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None, preferred_element_type=None,
                out_sharding=None) -> jax.Array:
    """`jax.lax.dot_general` for `nnx.Linear(dot_general=...)`: MKL on a single-device CPU backend for
    float32 `x @ W` (contracting x's last axis with W's first), XLA's dot everywhere else."""
    xla = functools.partial(jax.lax.dot_general, dimension_numbers=dimension_numbers, precision=precision,
                            preferred_element_type=preferred_element_type, out_sharding=out_sharding)
    (lhs_contract, rhs_contract), batch = dimension_numbers
    plain = (tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,) and not any(batch[0]) and not any(batch[1])
             and rhs.ndim == 2 and lhs.dtype == rhs.dtype == jnp.float32 and 0 not in lhs.shape + rhs.shape
             and preferred_element_type in (None, jnp.float32) and out_sharding is None)
    if not (plain and mkl_available() and _single_cpu_device()):
        return xla(lhs, rhs)

    def on_mkl(x, w):
        return mkl_matmul(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[1])

    return jax.lax.platform_dependent(lhs, rhs, cpu=on_mkl, default=lambda x, w: xla(x, w))
