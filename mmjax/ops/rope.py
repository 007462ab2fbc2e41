"""Rotary position embeddings (RoPE) with the scalings used by real checkpoints.

Convention: the "rotate half" layout of LLaMA checkpoints in Hugging Face format: feature i is
paired with feature i + head_dim/2 (not interleaved pairs), so converted weights need no
permutation.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How inverse frequencies are rescaled for context extension.

    rope_type:
      "default": none.
      "linear": positions divided by `factor` (position interpolation).
      "llama3": Llama 3.1 -- long wavelengths divided by `factor`, short ones kept, smooth
        interpolation in between, set by `low_freq_factor`, `high_freq_factor` and
        `original_max_position_embeddings`.
    """

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"RopeScaling: unsupported rope_type {self.rope_type!r}; supported: {ROPE_TYPES}")
        if self.factor <= 0:
            raise ValueError(f"RopeScaling: factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError("RopeScaling(llama3): high_freq_factor must exceed low_freq_factor")


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """[head_dim // 2] float32 inverse frequencies theta^(-2i/d), rescaled as `scaling` says.

    Computed in float32 like the PyTorch reference, so angles match it bit for bit at long
    positions rather than drifting by float64-vs-float32 rounding.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    exponent = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
    inv = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
    if scaling is None or scaling.rope_type == "default":
        return inv
    if scaling.rope_type == "linear":
        return (inv / np.float32(scaling.factor)).astype(np.float32)
    # llama3
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * inv / scaling.factor + smooth * inv
    out = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(mid, smoothed, out).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray | jax.Array) -> jax.Array:
    """Rotate `x` [batch, seq, heads, head_dim] by angle positions * inv_freq.

    positions: [batch, seq] (int or float). Angles, cos and sin are computed in float32.
    """
    inv = jnp.asarray(inv_freq, jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def sinusoidal_positions(num_positions: int, dim: int, max_timescale: float = 10_000.0) -> np.ndarray:
    """[num_positions, dim] fixed sin/cos position table (Transformer, sin first then cos)."""
    half = dim // 2
    freqs = np.exp(-math.log(max_timescale) * np.arange(half) / half)
    angles = np.arange(num_positions)[:, None] * freqs[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)
