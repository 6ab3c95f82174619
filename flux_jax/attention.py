"""Scaled dot-product attention for FLUX's blocks, the best implementation on each platform.

`dot_product_attention(q, k, v)` takes (B, L, H, D) tensors with q already scaled by 1/sqrt(D) (the
scale rides on RoPE, so no extra rounding) and picks by the platform the program is lowered for,
through `jax.lax.platform_dependent`, like the packed matmul:
- TPU: splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`), a Pallas flash kernel:
  no (H, L, L) logits anywhere, forward or backward.
- GPU: cuDNN's flash attention (`jax.nn.dot_product_attention(implementation="cudnn")`) for bf16 and
  f16 with head dims up to 128, where the JAX install has the CUDA plugin (cuDNN is looked up at trace
  time); otherwise, float32 included, the XLA path.
- Elsewhere: XLA, heads first, over blocks of queries where the logits would pass LOGITS_BLOCK_BYTES,
  one after another, each recomputed in the backward rather than saved.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from flux_jax.sharding import active_mesh, partition_spec

IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn")
LOGITS_BLOCK_BYTES = 256 * 2**20  # float32 logits of one XLA query block, batch and heads included
SPLASH_BLOCKS = (512, 256, 128)  # the largest that divides the (padded) length serves every pass


def _attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T) v on heads-first (B, H, L, D) arrays: float32 logits, and the softmax's division
    done on the (L, D) output instead of the (L, L) weights, as flash attention does. Heads first
    because XLA:CPU runs these batched matmuls 2.5x faster than on (B, L, H, D) operands, and the late
    division saves another sixth (issue 17)."""
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
    out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / weights.sum(axis=-1, keepdims=True)).astype(v.dtype)


# Recomputed in the backward pass: otherwise differentiating the map over blocks keeps every block's
# softmax, the whole (H, L, L) matrix per layer, for the backward (2.7 GiB a block for FLUX at 1024x1024).
_attend_recomputed = jax.checkpoint(_attend)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """XLA attention, whole where its float32 logits fit in LOGITS_BLOCK_BYTES, else over equal blocks
    of queries one after another (`lax.map`), each recomputed in the backward: 2 GB of logits a layer
    for FLUX at 1024x1024 become eight blocks of 256 MiB."""
    b, l, h, d = q.shape
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    n = -(-b * h * l * l * 4 // LOGITS_BLOCK_BYTES)
    if n == 1:
        return _attend(q, k, v).transpose(0, 2, 1, 3)
    rows = -(-l // n)
    padded = jnp.pad(q, ((0, 0), (0, 0), (0, n * rows - l), (0, 0)))
    blocks = jnp.moveaxis(padded.reshape(b, h, n, rows, d), 2, 0)
    out = jax.lax.map(lambda block: _attend_recomputed(block, k, v), blocks)
    return jnp.moveaxis(out, 0, 2).reshape(b, h, n * rows, d)[:, :, :l].transpose(0, 2, 1, 3)


def _splash_one_shard(q: jax.Array, k: jax.Array, v: jax.Array, interpret: bool) -> jax.Array:
    """Splash attention on local (B, L, H, D) arrays. Lengths are padded to whole 128-blocks; padded
    keys sit in their own segment, so real queries never see them."""
    b, l, h, d = q.shape
    padded = -(-l // 128) * 128
    block = next(size for size in SPLASH_BLOCKS if padded % size == 0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = splash_mask.MultiHeadMask([splash_mask.FullMask((padded, padded))] * h)
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    heads_first = [jnp.pad(x, ((0, 0), (0, padded - l), (0, 0), (0, 0))).transpose(0, 2, 1, 3) for x in (q, k, v)]
    if padded == l:
        out = jax.vmap(kernel)(*heads_first)
    else:
        ids = jnp.asarray(np.arange(padded) >= l, jnp.int32)
        segments = splash.SegmentIds(q=ids, kv=ids)
        out = jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segments))(*heads_first)
    return out.transpose(0, 2, 1, 3)[:, :l]


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, interpret: bool = False) -> jax.Array:
    """TPU splash attention. Under a mesh each device runs the kernel on its own batch and head shard
    (`shard_map`): a Pallas call is opaque to XLA's partitioner, which would otherwise gather it whole."""
    mesh = active_mesh()
    spec = partition_spec(("activation_batch", "activation_length", "heads", "head_dim"), mesh, q.shape)
    local = lambda q, k, v: _splash_one_shard(q, k, v, interpret)  # noqa: E731
    if mesh is None or all(axis is None for axis in spec):
        return local(q, k, v)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """cuDNN flash attention where it serves (bf16/f16, head dim <= 128, a JAX with the CUDA plugin);
    the XLA path otherwise."""
    if q.dtype not in (jnp.bfloat16, jnp.float16) or q.shape[-1] > 128:
        return xla_attention(q, k, v)
    try:
        return jax.nn.dot_product_attention(q, k, v, scale=1.0, implementation="cudnn")
    except RuntimeError:  # "cuDNN is not detected": this JAX has no CUDA plugin to lower for GPUs
        return xla_attention(q, k, v)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str = "auto",
                          interpret: bool = False) -> jax.Array:
    """softmax(q k^T) v over (B, L, H, D) tensors, q pre-scaled. `implementation="auto"` chooses by the
    platform the program is lowered for; "xla", "splash" or "cudnn" force one (`interpret=True` runs
    splash on CPU)."""
    if implementation == "xla":
        return xla_attention(q, k, v)
    if implementation == "splash":
        return splash_attention(q, k, v, interpret=interpret)
    if implementation == "cudnn":
        return cudnn_attention(q, k, v)
    if implementation != "auto":
        raise ValueError(f"unknown attention implementation {implementation!r}; available: {', '.join(IMPLEMENTATIONS)}")
    return jax.lax.platform_dependent(q, k, v, tpu=splash_attention, cuda=cudnn_attention, default=xla_attention)
