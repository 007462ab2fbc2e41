"""Feed-forward blocks: gated (SwiGLU) for LLaMA, plain two-layer MLP for ViT/CLIP/BERT."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn.linear import DenseGeneral
from mmjax.nn.partitioning import constrain


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)); with act=silu this is SwiGLU. Params: gate, up, down."""

    hidden_dim: int
    activation: str = "silu"
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                  kernel_init=self.kernel_init)
        gate = DenseGeneral(self.hidden_dim, ("embed", "mlp"), name="gate", **kw)(x)
        up = DenseGeneral(self.hidden_dim, ("embed", "mlp"), name="up", **kw)(x)
        h = get_activation(self.activation)(gate) * up
        h = constrain(h, ("act_batch", "act_len", "act_mlp"))
        return DenseGeneral(x.shape[-1], ("mlp", "embed"), name="down", **kw)(h)


class MLP(nn.Module):
    """fc2(act(fc1(x))). Params: fc1, fc2."""

    hidden_dim: int
    activation: str = "gelu"
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                  kernel_init=self.kernel_init)
        h = DenseGeneral(self.hidden_dim, ("embed", "mlp"), name="fc1", **kw)(x)
        h = get_activation(self.activation)(h)
        return DenseGeneral(x.shape[-1], ("mlp", "embed"), name="fc2", **kw)(h)
