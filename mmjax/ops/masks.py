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


QFORMER_MODES = ("unimodal", "bidirectional", "causal")


def qformer_mask(text_mask: jax.Array, num_queries: int, mode: str) -> jax.Array:
    """The self-attention masks of BLIP-2's Q-Former over [queries; text]: [batch, 1, Q+T, Q+T].

    text_mask [batch, T] bool (True = real text token; T may be 0), queries always real.
      "unimodal"      (ITC, and the text-only / query-only passes): queries see only queries,
                      text only text -- two independent streams in one call.
      "bidirectional" (ITM): every token sees every token.
      "causal"        (ITG): queries see only queries; text token t sees every query and the
                      text tokens up to t (`make_attention_mask` with the queries as the prefix
                      block).
    Padded text keys are masked in every mode; a padded row still sees the real keys of its
    stream (its output is never read), so no row is ever fully masked.
    """
    if mode not in QFORMER_MODES:
        raise ValueError(f"qformer_mask: mode {mode!r} is not one of {', '.join(QFORMER_MODES)}")
    batch, t = text_mask.shape
    total = num_queries + t
    is_text = jnp.arange(total) >= num_queries
    keys = jnp.concatenate([jnp.ones((batch, num_queries), bool), text_mask.astype(bool)], axis=1)
    if mode == "bidirectional":
        structure = jnp.ones((1, 1, total, total), bool)
    elif mode == "unimodal":
        seg = jnp.broadcast_to(is_text.astype(jnp.int32), (1, total))
        structure = segment_mask(seg, seg)
    else:
        structure = make_attention_mask(jnp.ones((1, total), bool), is_text[None])
    return structure & padding_mask(keys)
