"""One place for attention masks. Masks are data (boolean arrays, True = attend), not code paths.

Shapes: functions return arrays broadcastable to [batch, heads, q_len, kv_len].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def and_masks(*masks: jax.Array | None) -> jax.Array | None:
    """Logical AND of the masks that are not None (None if all are None)."""
    out = None
    for m in masks:
        if m is None:
            continue
        out = m if out is None else jnp.logical_and(out, m)
    return out


def causal_mask(q_len: int, kv_len: int) -> jax.Array:
    """[q_len, kv_len], bottom-right aligned: query i sees key j iff j <= i + kv_len - q_len."""
    q = jnp.arange(q_len)[:, None] + (kv_len - q_len)
    k = jnp.arange(kv_len)[None, :]
    return k <= q


def padding_mask(kv_valid: jax.Array) -> jax.Array:
    """[batch, kv_len] bool of real (non-padding) keys -> [batch, 1, 1, kv_len]."""
    return kv_valid.astype(bool)[:, None, None, :]


def segment_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array) -> jax.Array:
    """Packed documents: [batch, q_len], [batch, kv_len] -> [batch, 1, q_len, kv_len]."""
    return (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]


def sliding_window_mask(q_positions: jax.Array, kv_positions: jax.Array, window: int) -> jax.Array:
    """Keys at most `window - 1` positions behind the query: [..., q_len, kv_len] (Mistral)."""
    diff = q_positions[..., :, None] - kv_positions[..., None, :]
    return diff < window


def make_attention_mask(input_mask: jax.Array, mask_ar: jax.Array) -> jax.Array:
    """Causal, prefix-LM and block-causal masks from one rule (big_vision's `make_attn_mask`).

    Args:
      input_mask: [batch, seq] bool, True for real tokens (False = padding).
      mask_ar: [batch, seq] int/bool. A token with mask_ar=1 starts a new causal block:
        tokens see every token whose cumulative block index is <= theirs.
        all zeros = full bidirectional attention; all ones = causal;
        zeros on a prefix then ones = prefix-LM.
    Returns:
      [batch, 1, seq, seq] bool.
    """
    cumsum = jnp.cumsum(mask_ar.astype(jnp.int32), axis=1)
    visible = cumsum[:, None, :] <= cumsum[:, :, None]
    valid = input_mask[:, None, :] & input_mask[:, :, None]
    return (visible & valid)[:, None]


def prefix_lm_mask(input_mask: jax.Array, prefix_len: jax.Array) -> jax.Array:
    """Bidirectional over the first `prefix_len[b]` tokens, causal after: [batch, 1, seq, seq]."""
    seq = input_mask.shape[1]
    mask_ar = jnp.arange(seq)[None, :] >= jnp.asarray(prefix_len).reshape(-1, 1)
    return make_attention_mask(input_mask, mask_ar)
