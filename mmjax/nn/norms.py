"""RMSNorm and LayerNorm; statistics in float32 whatever the compute dtype."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale (LLaMA). Params: `scale` [features] ("norm")."""

    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
            (x.shape[-1],), self.param_dtype,
        )
        return y.astype(self.dtype) * scale.astype(self.dtype)


class LayerNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * scale + bias. Params: `scale`, `bias` [features]."""

    eps: float = 1e-5
    use_bias: bool = True
    use_scale: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
        if self.use_scale:
            scale = self.param(
                "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                (x.shape[-1],), self.param_dtype,
            )
            y = y * scale.astype(self.dtype)
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
                (x.shape[-1],), self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y
