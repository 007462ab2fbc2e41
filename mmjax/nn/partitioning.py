"""Activation sharding hints by logical name (no-ops outside a mesh + rules context)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

BATCH_LEN_EMBED = ("act_batch", "act_len", "act_embed")


def constrain(x: jax.Array, names: Sequence[str]) -> jax.Array:
    """`nn.with_logical_constraint` when the rank matches the names, else x unchanged."""
    if x.ndim != len(names):
        return x
    return nn.with_logical_constraint(x, tuple(names))
