"""Token embeddings (with a tied output head) and learned absolute position embeddings."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


class Embed(nn.Module):
    """Token table `embedding` [vocab, embed]. `attend(x)` reuses it as a tied output head."""

    num_embeddings: int
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    embedding_init: Callable = nn.initializers.normal(0.02)
    axes: tuple[str, str] = ("vocab", "embed")  # logical axis names of the table

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(self.embedding_init, tuple(self.axes)),
            (self.num_embeddings, self.features),
            self.param_dtype,
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        """[...] int -> [..., features]."""
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """[..., features] -> [..., vocab] logits against the embedding rows."""
        return jnp.einsum("...e,ve->...v", x.astype(self.dtype), self.embedding.astype(self.dtype))


class LearnedPositions(nn.Module):
    """Learned absolute positions: table `embedding` [max_len, features] ("position", "embed")."""

    max_len: int
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    embedding_init: Callable = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, positions: jax.Array) -> jax.Array:
        """positions [...] int -> [..., features]."""
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(self.embedding_init, ("position", "embed")),
            (self.max_len, self.features),
            self.param_dtype,
        )
        return jnp.take(table, positions, axis=0).astype(self.dtype)
