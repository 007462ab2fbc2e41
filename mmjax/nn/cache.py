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
    # per layer [batch, max_len, kv_heads, head_dim]; or, for a scanned stack (`stacked`), one
    # array [num_layers, batch, max_len, kv_heads, head_dim] each, which the scan reads and
    # writes in place (no per-step stacking)
    k: Any
    v: Any
    index: jax.Array  # int32 [] next slot to write
    valid: jax.Array  # bool [batch, max_len]
    positions: jax.Array  # int32 [batch, max_len] position id of each slot
    lengths: jax.Array  # int32 [batch] real tokens seen per row (= next position id)
    # Mixture-of-Depths (`mmjax.nn.mod`): per layer [batch, max_len] bool, whether the layer's
    # K/V in that slot are real (the token went through the block); None without MoD
    routed: Any = None

    @classmethod
    def create(
        cls, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
        dtype: Any = jnp.float32, stacked: bool = False, routed: bool = False,
    ) -> "KVCache":
        shape = (batch, max_len, num_kv_heads, head_dim)
        if stacked:
            k = jnp.zeros((num_layers,) + shape, dtype)
            v = jnp.zeros((num_layers,) + shape, dtype)
        else:
            k = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
            v = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
        return cls(
            k=k,
            v=v,
            index=jnp.zeros((), jnp.int32),
            valid=jnp.zeros((batch, max_len), bool),
            positions=jnp.zeros((batch, max_len), jnp.int32),
            lengths=jnp.zeros((batch,), jnp.int32),
            routed=(tuple(jnp.zeros((batch, max_len), bool) for _ in range(num_layers))
                    if routed else None),
        )

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    @property
    def stacked(self) -> bool:
        return not isinstance(self.k, (tuple, list))

    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves((self.k, self.v)))

    def map_rows(self, fn) -> "KVCache":
        """`fn(array, axis)` applied to every per-row array along its batch axis (K/V: 1 when
        stacked, else 0; valid / positions / lengths: 0): repeat rows for beams, gather parents."""
        kv_axis = 1 if self.stacked else 0
        kv = lambda x: fn(x, kv_axis)  # noqa: E731
        return self.replace(k=jax.tree_util.tree_map(kv, self.k), v=jax.tree_util.tree_map(kv, self.v),
                            valid=fn(self.valid, 0), positions=fn(self.positions, 0),
                            lengths=fn(self.lengths, 0),
                            routed=None if self.routed is None else tuple(
                                fn(r, 0) for r in self.routed))

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
