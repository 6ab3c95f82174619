"""Text encoders FLUX conditions on: T5 v1.1 (token features) and CLIP-L (pooled vector)."""

from flux_jax.text.clip import CLIPTextEncoder, CLIPTextEncoderConfig
from flux_jax.text.prompts import PromptEncoder
from flux_jax.text.t5 import T5Encoder, T5EncoderConfig

__all__ = ["CLIPTextEncoder", "CLIPTextEncoderConfig", "PromptEncoder", "T5Encoder", "T5EncoderConfig"]
