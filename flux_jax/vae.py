"""The FLUX autoencoder (diffusers' AutoencoderKL layout, 16 latent channels) in NNX, NHWC.

Attribute names mirror diffusers' (encoder.down_blocks[i].resnets[j].conv1, mid_block.attentions[0]
.to_q, ...), so its checkpoint maps leaf by leaf. Images are (B, H, W, 3) in [-1, 1]; latents
(B, H/8, W/8, latent_channels), unscaled: the pipeline applies scaling and shift factors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from flux_jax import cpu_matmul
from flux_jax.attention import dot_product_attention


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159
    param_dtype: str = "bfloat16"
    dtype: str = "bfloat16"

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))


def _conv(i: int, o: int, c: AutoencoderConfig, rngs: nnx.Rngs, *, kernel: int = 3, stride: int = 1, padding="SAME") -> nnx.Conv:
    return nnx.Conv(i, o, (kernel, kernel), strides=stride, padding=padding, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)


def _norm(ch: int, c: AutoencoderConfig, rngs: nnx.Rngs) -> nnx.GroupNorm:
    return nnx.GroupNorm(ch, num_groups=c.norm_num_groups, epsilon=1e-6, dtype=jnp.float32, param_dtype=c.param_dtype, rngs=rngs)


def _group_stats(norm: nnx.GroupNorm, x: jax.Array, rows: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Each (image, group)'s element count, mean and sum of squared deviations (M2), in float32, over
    the rows where `rows` (H,) is true (all rows without it). Statistics are reduced per channel first
    and grouped after, so no (.., groups, channels per group) view of the image is made: on CPU that
    view cost copies (the pipeline's decoding at 512x512 in float32 needed 0.88 GB of temporaries
    through nnx.GroupNorm, 0.63 GB this way)."""
    b, h, w, ch = x.shape
    count = (h if rows is None else rows.astype(jnp.float32).sum()) * w * (ch // norm.num_groups)

    def group_sum(values: jax.Array) -> jax.Array:  # (B, H, W, C) -> (B, G), over the chosen rows
        if rows is not None:
            values = jnp.where(rows[None, :, None, None], values, 0.0)
        return values.sum(axis=(1, 2)).reshape(b, norm.num_groups, -1).sum(axis=-1)

    xf = x.astype(jnp.float32)
    mean = group_sum(xf) / count
    m2 = group_sum(jnp.square(xf - _per_channel(mean, ch)))
    return count, mean, m2


def _per_channel(per_group: jax.Array, channels: int) -> jax.Array:
    """(B, G) -> (B, 1, 1, C): each channel its group's value."""
    return jnp.repeat(per_group, channels // per_group.shape[-1], axis=-1)[:, None, None, :]


def _normalize(norm: nnx.GroupNorm, x: jax.Array, mean: jax.Array, var: jax.Array) -> jax.Array:
    """`norm` with given per-group statistics, as one float32 scale and shift per channel."""
    ch = x.shape[-1]
    mean, var = _per_channel(mean, ch), _per_channel(var, ch)
    scale = jax.lax.rsqrt(var + norm.epsilon) * norm.scale[...].astype(jnp.float32)
    return (x.astype(jnp.float32) * scale + (norm.bias[...].astype(jnp.float32) - mean * scale)).astype(x.dtype)


def _group_norm(norm: nnx.GroupNorm, x: jax.Array) -> jax.Array:
    count, mean, m2 = _group_stats(norm, x)
    return _normalize(norm, x, mean, m2 / count)


class ResnetBlock2D(nnx.Module):
    def __init__(self, i: int, o: int, c: AutoencoderConfig, *, rngs: nnx.Rngs):
        self.norm1 = _norm(i, c, rngs)
        self.conv1 = _conv(i, o, c, rngs)
        self.norm2 = _norm(o, c, rngs)
        self.conv2 = _conv(o, o, c, rngs)
        self.conv_shortcut = _conv(i, o, c, rngs, kernel=1) if i != o else None

    def __call__(self, x: jax.Array, norm: Callable[[nnx.GroupNorm, jax.Array], jax.Array] = _group_norm) -> jax.Array:
        """`norm` applies a group norm (the tiled decoder's brings statistics of the whole image)."""
        h = self.conv1(jax.nn.silu(norm(self.norm1, x)))
        h = self.conv2(jax.nn.silu(norm(self.norm2, h)))
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class Attention(nnx.Module):
    """Single-head self-attention over the H*W positions, with group norm and a residual."""

    def __init__(self, ch: int, c: AutoencoderConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, dot_general=cpu_matmul.dot_general, rngs=rngs)
        self.group_norm = _norm(ch, c, rngs)
        self.to_q, self.to_k, self.to_v = (nnx.Linear(ch, ch, **kw) for _ in range(3))
        self.to_out = nnx.List([nnx.Linear(ch, ch, **kw)])

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, ch = x.shape
        y = _group_norm(self.group_norm, x).reshape(b, h * w, 1, ch)
        # flux_jax's attention (splash on TPU, query blocks on XLA): at 1024x1024 the whole (L, L) logits
        # are 1 GiB, what jax.nn.dot_product_attention's XLA path materializes
        out = dot_product_attention(self.to_q(y) * ch**-0.5, self.to_k(y), self.to_v(y))
        return x + self.to_out[0](out.reshape(b, h, w, ch))


class MidBlock(nnx.Module):
    def __init__(self, ch: int, c: AutoencoderConfig, *, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock2D(ch, ch, c, rngs=rngs) for _ in range(2)])
        self.attentions = nnx.List([Attention(ch, c, rngs=rngs)]) if c.mid_block_add_attention else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nnx.Module):
    def __init__(self, ch: int, c: AutoencoderConfig, *, rngs: nnx.Rngs):
        self.conv = _conv(ch, ch, c, rngs, stride=2, padding=((0, 1), (0, 1)))  # diffusers pads right and bottom

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    def __init__(self, ch: int, c: AutoencoderConfig, *, rngs: nnx.Rngs):
        self.conv = _conv(ch, ch, c, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Nearest-neighbour upsampling by 2 as one broadcast, then the convolution. Two jnp.repeat calls
        made XLA materialize the upsampled image and a half-size intermediate: FLUX's decoder at
        1024x1024 compiled for one v5e chip needed 1.90 GB of temporaries that way, 1.36 GB this way."""
        b, h, w, ch = x.shape
        return self.conv(jnp.broadcast_to(x[:, :, None, :, None], (b, h, 2, w, 2, ch)).reshape(b, 2 * h, 2 * w, ch))


class EncoderBlock(nnx.Module):
    def __init__(self, i: int, o: int, down: bool, c: AutoencoderConfig, *, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock2D(i if j == 0 else o, o, c, rngs=rngs) for j in range(c.layers_per_block)])
        self.downsamplers = nnx.List([Downsample(o, c, rngs=rngs)]) if down else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class DecoderBlock(nnx.Module):
    def __init__(self, i: int, o: int, up: bool, c: AutoencoderConfig, *, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock2D(i if j == 0 else o, o, c, rngs=rngs) for j in range(c.layers_per_block + 1)])
        self.upsamplers = nnx.List([Upsample(o, c, rngs=rngs)]) if up else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nnx.Module):
    def __init__(self, c: AutoencoderConfig, *, rngs: nnx.Rngs):
        ch = c.block_out_channels
        self.conv_in = _conv(c.in_channels, ch[0], c, rngs)
        self.down_blocks = nnx.List([
            EncoderBlock(ch[max(i - 1, 0)], ch[i], i < len(ch) - 1, c, rngs=rngs) for i in range(len(ch))
        ])
        self.mid_block = MidBlock(ch[-1], c, rngs=rngs)
        self.conv_norm_out = _norm(ch[-1], c, rngs)
        self.conv_out = _conv(ch[-1], 2 * c.latent_channels, c, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(_group_norm(self.conv_norm_out, x)))


class Decoder(nnx.Module):
    def __init__(self, c: AutoencoderConfig, *, rngs: nnx.Rngs):
        ch = tuple(reversed(c.block_out_channels))
        self.conv_in = _conv(c.latent_channels, ch[0], c, rngs)
        self.mid_block = MidBlock(ch[0], c, rngs=rngs)
        self.up_blocks = nnx.List([
            DecoderBlock(ch[max(i - 1, 0)], ch[i], i < len(ch) - 1, c, rngs=rngs) for i in range(len(ch))
        ])
        self.conv_norm_out = _norm(ch[-1], c, rngs)
        self.conv_out = _conv(ch[-1], c.out_channels, c, rngs)

    def __call__(self, z: jax.Array, tile_rows: int | None = None) -> jax.Array:
        """Latents -> images; with `tile_rows`, the full-resolution tail in tiles of that many rows
        (`decode_tail_in_tiles`)."""
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks[:-2]:
            x = block(x)
        if len(self.up_blocks) > 1:
            for resnet in self.up_blocks[-2].resnets:
                x = resnet(x)
        if tile_rows is not None:
            return decode_tail_in_tiles(self, x, tile_rows)
        return self.tail(x, _group_norm)

    def upsamples_in_tail(self) -> bool:
        return len(self.up_blocks) > 1 and self.up_blocks[-2].upsamplers is not None

    def tail(self, x: jax.Array, norm: Callable[[nnx.GroupNorm, jax.Array], jax.Array]) -> jax.Array:
        """From the last upsampling on, where the activations are largest: that upsampling, the last
        block's resnets (at the output's resolution), the output norm and convolution."""
        if self.upsamples_in_tail():
            x = self.up_blocks[-2].upsamplers[0](x)
        for resnet in self.up_blocks[-1].resnets:
            x = resnet(x, norm)
        return self.conv_out(jax.nn.silu(norm(self.conv_norm_out, x)))


def _combine(total: tuple, part: tuple) -> tuple:
    """Two (count, mean, M2) group statistics as those of their union (Chan et al.'s pairwise update:
    no sum of squares minus a squared sum, so no cancellation)."""
    (n_a, mean_a, m2_a), (n_b, mean_b, m2_b) = total, part
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + jnp.square(delta) * (n_a * n_b / n)


def decode_tail_in_tiles(decoder: Decoder, x: jax.Array, tile_rows: int) -> jax.Array:
    """The decoder's full-resolution tail (`Decoder.tail`) on tiles of `tile_rows` full-width rows, so
    that none of its activations exists at full size: at 1024x1024 the tail's 256- and 128-channel
    images (0.5 and 0.25 GiB in bf16) were what held the decoder's peak.

    Exact, not blended: each tile is computed from a window of its input reaching one row past the
    tile for every 3x3 convolution on the way (windows end at the image's edges, where the
    convolutions' own zero padding applies), so its rows are the whole image's. Each group norm
    needs statistics of the whole image: they are found one norm at a time, a pass over the tiles per
    norm (summed tile by tile, Chan's update), each pass recomputing the tail up to its norm: memory
    bought with compute. FLUX's decoder at 1024x1024 on one v5e chip (the TPU compiler's figure):
    0.715 GB beyond its weights in tiles of 128 rows, 1.377 GB whole; on CPU at 512x512 in float32,
    0.34 GB of temporaries against 0.67, and 2.8 times the decoding time (docs/benchmarks.md)."""
    b, h_in, w_in, _ = x.shape
    factor = 2 if decoder.upsamples_in_tail() else 1  # the tail's input rows per output row: 1/factor
    norms = 2 * len(decoder.up_blocks[-1].resnets) + 1  # the tail's group norms, each before a 3x3 convolution
    convs = norms + (factor == 2)  # and the upsampling's
    halo = -(-convs // factor) * factor  # output rows each side of a tile: windows start on an input row
    tile_rows = -(-tile_rows // factor) * factor
    h, window = h_in * factor, tile_rows + 2 * halo
    if window >= h:  # one window would hold the whole image
        return decoder.tail(x, _group_norm)
    tiles = -(-h // tile_rows)

    def window_of(i: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Tile i's window (its first output row and its input) and which of its output rows tile i owns."""
        start = jnp.clip(i * tile_rows - halo, 0, h - window)
        rows = start + jnp.arange(window)
        owned = (rows >= i * tile_rows) & (rows < jnp.minimum((i + 1) * tile_rows, h))
        return start, jax.lax.dynamic_slice_in_dim(x, start // factor, window // factor, axis=1), owned

    zero = jnp.zeros((b, decoder.conv_norm_out.num_groups), jnp.float32)
    stats: list[tuple[jax.Array, jax.Array]] = []  # (mean, variance) of each norm, in the tail's order
    while len(stats) < norms:
        def accumulate(i, total):
            _, tile, owned = window_of(i)
            seen: list[tuple] = []  # the statistics of each norm met so far in this trace

            def norm(module, y):  # norms before the wanted one have theirs; what follows the wanted one is dead code
                seen.append(_group_stats(module, y, owned) if len(seen) == len(stats) else None)
                return _normalize(module, y, *stats[len(seen) - 1]) if len(seen) <= len(stats) else y

            decoder.tail(tile, norm)
            return _combine(total, seen[len(stats)])

        count, mean, m2 = jax.lax.fori_loop(0, tiles, accumulate, (jnp.float32(0), zero, zero))
        stats.append((mean, m2 / count))

    def write(i, out):
        start, tile, _ = window_of(i)
        known = iter(stats)
        y = decoder.tail(tile, lambda module, v: _normalize(module, v, *next(known)))
        at = jnp.minimum(i * tile_rows, h - tile_rows)  # the last tile ends at the bottom edge
        return jax.lax.dynamic_update_slice_in_dim(out, jax.lax.dynamic_slice_in_dim(y, at - start, tile_rows, axis=1), at, axis=1)

    out = jnp.zeros((b, h, w_in * factor, decoder.conv_out.out_features), x.dtype)
    return jax.lax.fori_loop(0, tiles, write, out)


class AutoencoderKL(nnx.Module):
    def __init__(self, config: AutoencoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.encoder = Encoder(config, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)
        self.tile_rows: int | None = None  # static: a compiled decode is specialised to it

    def enable_tiling(self, tile_rows: int = 128) -> None:
        """Decode the full-resolution tail in exact tiles of `tile_rows` rows (`decode_tail_in_tiles`):
        a lower peak for repeated work. diffusers' name; its tiles are blended, these are exact."""
        if tile_rows < 1:
            raise ValueError(f"tile_rows must be at least 1, got {tile_rows}")
        self.tile_rows = tile_rows

    def disable_tiling(self) -> None:
        self.tile_rows = None

    def encode(self, images: jax.Array) -> jax.Array:
        """(B, H, W, 3) in [-1, 1] -> the latent mean (B, H/8, W/8, C) (FLUX encodes images deterministically)."""
        moments = self.encoder(jnp.asarray(images).astype(self.config.dtype)).astype(jnp.float32)
        return jnp.split(moments, 2, axis=-1)[0]

    def decode(self, latents: jax.Array) -> jax.Array:
        """(B, h, w, C) -> images (B, 8h, 8w, 3), float32; in tiles after `enable_tiling`."""
        return self.decoder(jnp.asarray(latents).astype(self.config.dtype), self.tile_rows).astype(jnp.float32)
