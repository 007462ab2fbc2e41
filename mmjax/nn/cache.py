"""Preallocated key/value cache for autoregressive decoding.

The cache holds only the K/V heads (GQA/MQA save memory in proportion):
bytes per token = 2 x layers x kv_heads x head_dim x itemsize.

Slots are written left to right; `index` is the next free slot, shared by the batch (prompts
are left-padded so every row writes the same slot). Per row, `valid` marks slots that hold real
tokens and `positions` their position ids, so padding never attends and RoPE / sliding windows
see true positions.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [batch, max_len, kv_heads, head_dim]
    v: tuple[jax.Array, ...]
    index: jax.Array  # int32 [] next slot to write
    valid: jax.Array  # bool [batch, max_len]
    positions: jax.Array  # int32 [batch, max_len] position id of each slot
    lengths: jax.Array  # int32 [batch] real tokens seen per row (= next position id)

    @classmethod
    def create(
        cls, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
        dtype: Any = jnp.float32,
    ) -> "KVCache":
        shape = (batch, max_len, num_kv_heads, head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
        return cls(
            k=zeros,
            v=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            index=jnp.zeros((), jnp.int32),
            valid=jnp.zeros((batch, max_len), bool),
            positions=jnp.zeros((batch, max_len), jnp.int32),
            lengths=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in self.k + self.v)

    def advance(self, input_mask: jax.Array) -> tuple["KVCache", jax.Array, jax.Array]:
        """Book-keeping for T new tokens (input_mask [batch, T]).

        Returns (cache with index/valid/positions/lengths moved on -- K/V untouched,
        positions of the new tokens [batch, T], attention mask [batch, 1, T, max_len]).
        """
        t = input_mask.shape[1]
        input_mask = input_mask.astype(bool)
        new_pos = self.lengths[:, None] + jnp.cumsum(input_mask, axis=1, dtype=jnp.int32) - 1
        new_pos = jnp.maximum(new_pos, 0)
        valid = jax.lax.dynamic_update_slice(self.valid, input_mask, (0, self.index))
        positions = jax.lax.dynamic_update_slice(self.positions, new_pos, (0, self.index))
        slots = jnp.arange(self.max_len)
        q_slots = self.index + jnp.arange(t)
        causal = slots[None, :] <= q_slots[:, None]  # [T, L]
        mask = (valid[:, None, :] & causal[None])[:, None]  # [B, 1, T, L]
        cache = self.replace(
            index=self.index + t,
            valid=valid,
            positions=positions,
            lengths=self.lengths + jnp.sum(input_mask, axis=1, dtype=jnp.int32),
        )
        return cache, new_pos, mask
