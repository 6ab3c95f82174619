"""The FLUX autoencoder (diffusers' AutoencoderKL layout, 16 latent channels) in NNX, NHWC.

Attribute names mirror diffusers' (encoder.down_blocks[i].resnets[j].conv1, mid_block.attentions[0]
.to_q, ...), so its checkpoint maps leaf by leaf. Images are (B, H, W, 3) in [-1, 1]; latents
(B, H/8, W/8, latent_channels), unscaled: the pipeline applies scaling and shift factors.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


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


def _group_norm(norm: nnx.GroupNorm, x: jax.Array) -> jax.Array:
    """`norm` in float32, as one scale and shift per channel: statistics are reduced per channel first
    and grouped after, so no (.., groups, channels per group) view of the image is made. On CPU that
    view cost copies: the pipeline's decoding at 512x512 in float32 needed 0.88 GB of temporaries
    through nnx.GroupNorm, 0.63 GB this way."""
    b, h, w, ch = x.shape

    def per_group(per_channel: jax.Array) -> jax.Array:  # (B, C) -> each group's mean, repeated per channel
        groups = per_channel.reshape(b, norm.num_groups, -1).mean(axis=-1)
        return jnp.repeat(groups, ch // norm.num_groups, axis=-1)[:, None, None, :]

    mean = per_group(jnp.mean(x, axis=(1, 2), dtype=jnp.float32))
    var = per_group(jnp.mean(jnp.square(x.astype(jnp.float32) - mean), axis=(1, 2)))
    scale = jax.lax.rsqrt(var + norm.epsilon) * norm.scale[...].astype(jnp.float32)
    return (x.astype(jnp.float32) * scale + (norm.bias[...].astype(jnp.float32) - mean * scale)).astype(x.dtype)


class ResnetBlock2D(nnx.Module):
    def __init__(self, i: int, o: int, c: AutoencoderConfig, *, rngs: nnx.Rngs):
        self.norm1 = _norm(i, c, rngs)
        self.conv1 = _conv(i, o, c, rngs)
        self.norm2 = _norm(o, c, rngs)
        self.conv2 = _conv(o, o, c, rngs)
        self.conv_shortcut = _conv(i, o, c, rngs, kernel=1) if i != o else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(_group_norm(self.norm1, x)))
        h = self.conv2(jax.nn.silu(_group_norm(self.norm2, h)))
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class Attention(nnx.Module):
    """Single-head self-attention over the H*W positions, with group norm and a residual."""

    def __init__(self, ch: int, c: AutoencoderConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.group_norm = _norm(ch, c, rngs)
        self.to_q, self.to_k, self.to_v = (nnx.Linear(ch, ch, **kw) for _ in range(3))
        self.to_out = nnx.List([nnx.Linear(ch, ch, **kw)])

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, ch = x.shape
        y = _group_norm(self.group_norm, x).reshape(b, h * w, 1, ch)
        out = jax.nn.dot_product_attention(self.to_q(y), self.to_k(y), self.to_v(y))
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

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(_group_norm(self.conv_norm_out, x)))


class AutoencoderKL(nnx.Module):
    def __init__(self, config: AutoencoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.encoder = Encoder(config, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)

    def encode(self, images: jax.Array) -> jax.Array:
        """(B, H, W, 3) in [-1, 1] -> the latent mean (B, H/8, W/8, C) (FLUX encodes images deterministically)."""
        moments = self.encoder(jnp.asarray(images).astype(self.config.dtype)).astype(jnp.float32)
        return jnp.split(moments, 2, axis=-1)[0]

    def decode(self, latents: jax.Array) -> jax.Array:
        """(B, h, w, C) -> images (B, 8h, 8w, 3), float32."""
        return self.decoder(jnp.asarray(latents).astype(self.config.dtype)).astype(jnp.float32)
