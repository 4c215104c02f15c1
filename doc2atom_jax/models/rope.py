"""Rotary position embeddings in the rotate-half layout of Hugging Face checkpoints."""

import math

import jax.numpy as jnp
import numpy as np

from doc2atom_jax.models.config import RopeSpec


def inverse_frequencies(spec: RopeSpec, head_dim: int) -> np.ndarray:
  """Per-pair inverse frequencies [head_dim // 2], with the `linear` or `llama3` rescaling applied."""
  inv = 1.0 / (spec.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  if spec.kind == "linear":
    inv = inv / spec.factor
  elif spec.kind == "llama3":
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    low_wavelen = spec.original_max_position / spec.low_freq_factor
    high_wavelen = spec.original_max_position / spec.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / spec.factor, inv)
    smooth = (spec.original_max_position / wavelen - spec.low_freq_factor) / (
        spec.high_freq_factor - spec.low_freq_factor)
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv = np.where(medium, (1 - smooth) * scaled / spec.factor + smooth * scaled, scaled)
  return inv.astype(np.float32)


def cos_sin(spec: RopeSpec, head_dim: int, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """cos and sin tables [..., head_dim] for integer positions [...], in float32."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inverse_frequencies(spec, head_dim))
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
  """Rotates x [B, T, heads, head_dim] by tables [B, T, head_dim]."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin
