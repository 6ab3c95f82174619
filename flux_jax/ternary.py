"""Ternary (1.58-bit) weights for FLUX: the quantizer, the layers, student and packed models, reports.

The training layer keeps a latent float kernel and runs with s * T in the forward pass, T = ternary
codes, passing gradients straight through to the latent kernel (BitNet b1.58). The packed layer keeps
only the 2-bit codes and a float32 scale and runs through `pallas_kernels.ternary_matmul`. Both keep
the module path of the dense layer they replace; only the leaves change (kernel -> codes + scale).

A packed model's codes sit in device memory in one layout (`pallas_kernels.packing`): "tiled" where
the kernels run (TPU, GPU: they read x as it is, no per-call copy), "canonical" where XLA does (CPU).
Files always hold the canonical layout: loaders and `pack_model` lay the codes out for the platform
(`runtime_layout`), writers lay them back (`with_layout`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flux_jax.config import FluxConfig
from flux_jax.layers import Dtype, LinearFactory, dense
from flux_jax.model import Flux
from flux_jax.params import fill
from flux_jax.sharding import param_metadata
from pallas_kernels import pack_ternary, ternary_matmul
from pallas_kernels.packing import LAYOUTS, from_tiled, pack_tiled, tiled_rows, to_tiled, unpack_layout

SCALE_EPS = 1e-5


def ternarize(w: jax.Array, axis: int | None = 0) -> tuple[jax.Array, jax.Array]:
    """BitNet b1.58 absmean quantizer: s = max(mean |w| over `axis`, 1e-5), T = clip(round(w / s), -1, 1).

    For a Flax kernel (in, out), axis=0 gives one scale per output channel, shape (out,); axis=None
    one scale for the tensor, shape (1,). Returns (T int8, s float32).
    """
    w32 = jnp.asarray(w).astype(jnp.float32)
    s = jnp.maximum(jnp.mean(jnp.abs(w32), axis=axis, keepdims=True), SCALE_EPS)
    codes = jnp.clip(jnp.round(w32 / s), -1, 1).astype(jnp.int8)
    return codes, s.reshape(-1) if axis is not None else s.reshape(1)


@dataclasses.dataclass(frozen=True)
class QuantPolicy:
    """How block linears become ternary. The defaults are the paper's.

    per_channel: one absmean scale per output channel (else one per tensor).
    learnable_scale: train the scale with the student (initialised to the absmean scale).
    lowrank_rank: add a full-precision residual A @ B of this rank, initialised from the SVD of W - s*T.
    """

    per_channel: bool = True
    learnable_scale: bool = False
    lowrank_rank: int = 0

    def __post_init__(self):
        if self.lowrank_rank < 0:
            raise ValueError(f"lowrank_rank must be >= 0, got {self.lowrank_rank}")

    @property
    def axis(self) -> int | None:
        return 0 if self.per_channel else None

    def scale_shape(self, out_features: int) -> tuple[int]:
        return (out_features,) if self.per_channel else (1,)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantPolicy:
        return cls(**data)


class Packed(nnx.Variable):
    """Frozen weights of a packed model (codes, scale): not trained, not a Param."""


def _lowrank_factors(in_features, out_features, rank, axes, param_dtype) -> tuple[nnx.Param | None, nnx.Param | None]:
    """The residual A (in, r) @ B (r, out); (None, None) for rank 0."""
    if not rank:
        return None, None
    a = nnx.Param(jnp.zeros((in_features, rank), param_dtype), **param_metadata((axes[0], None), (in_features, rank)))
    b = nnx.Param(jnp.zeros((rank, out_features), param_dtype), **param_metadata((None, axes[1]), (rank, out_features)))
    return a, b


def _lowrank_term(module, x: jax.Array) -> jax.Array | float:
    if module.lowrank_a is None:
        return 0.0
    return (x @ module.lowrank_a[...].astype(x.dtype)) @ module.lowrank_b[...].astype(x.dtype)


def _lowrank_product(module) -> jax.Array | float:
    if module.lowrank_a is None:
        return 0.0
    return module.lowrank_a[...].astype(jnp.float32) @ module.lowrank_b[...].astype(jnp.float32)


def _scale_metadata(policy: QuantPolicy, axes: tuple[str, str], out_features: int) -> dict[str, Any]:
    shape = policy.scale_shape(out_features)
    return param_metadata((axes[1] if policy.per_channel else None,), shape)


class TernaryLinear(nnx.Module):
    """Training state: latent `kernel` (in, out); forward with s * T and a straight-through gradient."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool,
        axes: tuple[str, str],
        dtype: Dtype,
        param_dtype: Dtype,
        policy: QuantPolicy,
        rngs: nnx.Rngs,
    ):
        self.policy = policy
        self.dtype = dtype
        init = nnx.initializers.lecun_normal()(rngs.params(), (in_features, out_features), param_dtype)
        self.kernel = nnx.Param(init, **param_metadata(axes, (in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype), **param_metadata(axes[1:], (out_features,))) if use_bias else None
        scale_shape = policy.scale_shape(out_features)
        self.scale = (
            nnx.Param(jnp.ones(scale_shape, jnp.float32), **_scale_metadata(policy, axes, out_features))
            if policy.learnable_scale else None
        )
        self.lowrank_a, self.lowrank_b = _lowrank_factors(in_features, out_features, policy.lowrank_rank, axes, param_dtype)

    def effective_kernel(self) -> jax.Array:
        """The weight this layer applies, s * T (+ A @ B), in float32: what an export writes."""
        codes, absmean = ternarize(self.kernel[...], self.policy.axis)
        scale = self.scale[...] if self.scale is not None else absmean
        return codes.astype(jnp.float32) * scale + _lowrank_product(self)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(x @ T) * s + bias, exactly the packed layer's arithmetic; d/d(kernel) is the identity
        (straight-through), and d/d(scale) = x @ T when the scale is learnable."""
        x = x.astype(self.dtype)
        w = self.kernel[...].astype(jnp.float32)
        codes, absmean = ternarize(jax.lax.stop_gradient(w), self.policy.axis)
        unit = w / absmean
        t = codes.astype(jnp.float32) + (unit - jax.lax.stop_gradient(unit))  # value T, gradient through
        scale = self.scale[...] if self.scale is not None else absmean
        out = jnp.dot(x, t.astype(self.dtype), preferred_element_type=jnp.float32) * scale
        if self.bias is not None:
            out = out + self.bias[...].astype(jnp.float32)
        return out.astype(self.dtype) + _lowrank_term(self, x)


class PackedTernaryLinear(nnx.Module):
    """Packed state: uint8 `codes` in `layout` ((ceil(in/4), out) canonical, (tiled_rows(in), out)
    tiled) and float32 `scale`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool,
        axes: tuple[str, str],
        dtype: Dtype,
        param_dtype: Dtype,
        policy: QuantPolicy,
        layout: str = "canonical",
        rngs: nnx.Rngs,
    ):
        del rngs
        if layout not in LAYOUTS:
            raise ValueError(f"unknown packed layout {layout!r}; available: {', '.join(LAYOUTS)}")
        self.policy = policy
        self.layout = layout
        self.dtype = dtype
        self.in_features = in_features
        rows = tiled_rows(in_features) if layout == "tiled" else -(-in_features // 4)
        self.codes = Packed(jnp.full((rows, out_features), 0b01010101, jnp.uint8), **param_metadata(axes, (rows, out_features)))
        self.scale = Packed(jnp.ones(policy.scale_shape(out_features), jnp.float32), **_scale_metadata(policy, axes, out_features))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype), **param_metadata(axes[1:], (out_features,))) if use_bias else None
        self.lowrank_a, self.lowrank_b = _lowrank_factors(in_features, out_features, policy.lowrank_rank, axes, param_dtype)

    def effective_kernel(self) -> jax.Array:
        codes = unpack_layout(self.codes[...], self.in_features, self.layout)
        return codes.astype(jnp.float32) * self.scale[...] + _lowrank_product(self)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        bias = None if self.bias is None else self.bias[...]
        return ternary_matmul(x, self.codes[...], self.scale[...], bias, layout=self.layout) + _lowrank_term(self, x)


def ternary_linear(policy: QuantPolicy = QuantPolicy()) -> LinearFactory:
    return functools.partial(TernaryLinear, policy=policy)


def packed_linear(policy: QuantPolicy = QuantPolicy(), layout: str = "canonical") -> LinearFactory:
    return functools.partial(PackedTernaryLinear, policy=policy, layout=layout)


def runtime_layout(platform: str | None = None) -> str:
    """The packed layout for `platform` ("tpu", "gpu"/"cuda", "cpu"; default: JAX's default backend):
    tiled where the Pallas kernels run, canonical where XLA does."""
    return "tiled" if (platform or jax.default_backend()) in ("tpu", "gpu", "cuda") else "canonical"


KINDS = ("flux", "student", "packed")


def build(config: FluxConfig, kind: str = "flux", policy: QuantPolicy | None = None, *, rngs: nnx.Rngs,
          layout: str = "canonical") -> Flux:
    """A Flux of the given kind: full precision, ternary student, or packed (codes in `layout`)."""
    factories = {"flux": lambda p: dense, "student": ternary_linear,
                 "packed": functools.partial(packed_linear, layout=layout)}
    if kind not in factories:
        raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(KINDS)}")
    return Flux(config, rngs=rngs, linear=factories[kind](policy or QuantPolicy()))


def packed_layout(model: Flux) -> str | None:
    """The layout of a packed model's codes; None for other kinds."""
    return next((m.layout for _, m in nnx.iter_graph(model) if isinstance(m, PackedTernaryLinear)), None)


def packed_widths(model: Flux) -> dict[tuple, int]:
    """Module path -> in_features (K) of every packed layer: what unpacking its codes needs."""
    return {path: m.in_features for path, m in nnx.iter_graph(model) if isinstance(m, PackedTernaryLinear)}


def with_layout(model: Flux, layout: str, *, mesh=None) -> Flux:
    """`model` (packed) with its codes in `layout`, re-laid layer by layer on the devices that hold
    them; the model itself when they already are. Scales, biases and the rest are carried over."""
    current = packed_layout(model)
    if current is None:
        raise ValueError(f"with_layout needs a packed model, got a {describe(model)[0]} model")
    if current == layout:
        return model
    convert = jax.jit(to_tiled if layout == "tiled" else from_tiled, static_argnums=1)
    widths = packed_widths(model)
    values = {path: var[...] for path, var in _flat(nnx.state(model)).items()}
    abstract = nnx.eval_shape(lambda: build(model.config, "packed", describe(model)[1], layout=layout, rngs=nnx.Rngs(0)))

    def value_of(path, _):
        return convert(values[path], widths[path[:-1]]) if path[-1] == "codes" else values[path]

    return fill(abstract, value_of, mesh=mesh)


def describe(model: Flux) -> tuple[str, QuantPolicy | None]:
    """(kind, policy) of a model built by `build`."""
    for _, module in nnx.iter_graph(model):
        if isinstance(module, TernaryLinear):
            return "student", module.policy
        if isinstance(module, PackedTernaryLinear):
            return "packed", module.policy
    return "flux", None


def _flat(state) -> dict[tuple, Any]:
    return dict(nnx.to_flat_state(state))


def _lowrank_init(w: np.ndarray, wq: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    u, s, vt = np.linalg.svd(np.asarray(w, np.float32) - wq, full_matrices=False)
    root = np.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vt[:rank]


def quantize_model(model: Flux, policy: QuantPolicy = QuantPolicy(), *, config: FluxConfig | None = None) -> Flux:
    """A ternary student initialised from `model`'s weights (copied: the teacher is left untouched).

    `config` (default the teacher's) may change dtypes or remat, not shapes."""
    abstract = nnx.eval_shape(lambda: build(config or model.config, "student", policy, rngs=nnx.Rngs(0)))
    teacher = _flat(nnx.state(model, nnx.Param))
    values = {path: jnp.array(var[...], copy=True) for path, var in teacher.items()}
    for path, module in nnx.iter_graph(abstract):
        if not isinstance(module, TernaryLinear):
            continue
        w = teacher[(*path, "kernel")][...]
        codes, scale = ternarize(w, policy.axis)
        if policy.learnable_scale:
            values[(*path, "scale")] = scale
        if policy.lowrank_rank:
            a, b = _lowrank_init(np.asarray(w, np.float32), np.asarray(codes, np.float32) * np.asarray(scale), policy.lowrank_rank)
            values[(*path, "lowrank_a")], values[(*path, "lowrank_b")] = a, b
    return fill(abstract, lambda path, _: values[path])


def pack_model(student: Flux, layout: str | None = None) -> Flux:
    """The packed model of a student: 2-bit codes (in `layout`, by default the one for this platform)
    + float32 scales; everything else carried over."""
    kind, policy = describe(student)
    if kind != "student":
        raise ValueError(f"pack_model needs a ternary student (from quantize_model), got a {kind} model")
    layout = layout or runtime_layout()
    abstract = nnx.eval_shape(lambda: build(student.config, "packed", policy, layout=layout, rngs=nnx.Rngs(0)))
    values = {path: var[...] for path, var in _flat(nnx.state(student)).items()}
    for path, module in nnx.iter_graph(student):
        if isinstance(module, TernaryLinear):
            codes, scale = ternarize(module.kernel[...], policy.axis)
            values[(*path, "codes")] = pack_tiled(codes) if layout == "tiled" else pack_ternary(codes)
            values[(*path, "scale")] = module.scale[...] if module.scale is not None else scale
            del values[(*path, "kernel")]
    return fill(abstract, lambda path, _: values[path])


def dense_leaves(model: Flux) -> Iterator[tuple[str, jax.Array]]:
    """(dotted path, value) of every parameter of the equivalent full-precision model, one at a time:
    a ternary or packed layer yields its effective kernel s * T (+ A @ B) under the name `kernel`."""
    ternary = {path: module for path, module in nnx.iter_graph(model) if isinstance(module, TernaryLinear | PackedTernaryLinear)}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        owner, leaf = path[:-1], path[-1]
        if owner in ternary:
            if leaf == "bias":
                yield ".".join(map(str, path)), var[...]
            elif leaf in ("kernel", "codes"):
                yield ".".join(map(str, (*owner, "kernel"))), ternary[owner].effective_kernel()
            continue
        yield ".".join(map(str, path)), var[...]


def ternary_report(config: FluxConfig, policy: QuantPolicy = QuantPolicy()) -> dict[str, float]:
    """Exact parameter counts and storage bytes of the transformer, from shapes alone (no allocation).

    params_extra: trainable parameters the policy adds (low-rank factors, learnable scales).
    bytes_bf16: every parameter in bf16. bytes_packed: 2-bit codes, float32 scales, the full-precision
    rest and any low-rank residual in bf16. bytes_archive: the same with base-3 codes (1.6 bits).
    """
    teacher = nnx.eval_shape(lambda: build(config, "flux", rngs=nnx.Rngs(0)))
    student = nnx.eval_shape(lambda: build(config, "student", policy, rngs=nnx.Rngs(0)))
    total = sum(v.size for v in jax.tree.leaves(nnx.state(teacher, nnx.Param)))
    ternary = lowrank = learned_scales = codes_packed = codes_archive = scale_bytes = 0
    for _, module in nnx.iter_graph(student):
        if isinstance(module, TernaryLinear):
            k, n = module.kernel.shape
            ternary += k * n
            codes_packed += -(-k // 4) * n
            codes_archive += -(-k * n // 5)
            scale_bytes += 4 * policy.scale_shape(n)[0]
            if module.lowrank_a is not None:
                lowrank += module.lowrank_a.size + module.lowrank_b.size
            if module.scale is not None:
                learned_scales += module.scale.size
    rest_bytes = 2 * (total - ternary + lowrank)
    bytes_bf16 = 2 * total
    bytes_packed = codes_packed + scale_bytes + rest_bytes
    bytes_archive = codes_archive + scale_bytes + rest_bytes
    return {
        "params_total": total,
        "params_ternary": ternary,
        "params_extra": lowrank + learned_scales,
        "ternary_fraction": ternary / total,
        "bytes_bf16": bytes_bf16,
        "bytes_packed": bytes_packed,
        "bytes_archive": bytes_archive,
        "storage_ratio_packed": bytes_bf16 / bytes_packed,
        "storage_ratio_archive": bytes_bf16 / bytes_archive,
    }
