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


def media_index(tokens: jax.Array, media_token_id: int, input_mask: jax.Array | None = None,
                start: jax.Array | None = None) -> jax.Array:
    """Flamingo's "which image" of every token: [batch, seq] int32, the 0-based index (within
    its row) of the most recent `media_token_id` token at or before each position (an `<image>`
    token counts itself), -1 before the row's first image.

    input_mask: padding tokens never count as images (a pad id equal to the image id is not
    one). start: [batch] int32, the index of the last image seen before these tokens (-1: none):
    decoding continues the prompt's count.
    """
    is_media = tokens == media_token_id
    if input_mask is not None:
        is_media &= input_mask.astype(bool)
    count = jnp.cumsum(is_media.astype(jnp.int32), axis=1)
    base = -1 if start is None else jnp.asarray(start, jnp.int32).reshape(-1, 1)
    return count + base


def media_mask(index: jax.Array, num_media: int, *, only_immediate: bool = True,
               media_valid: jax.Array | None = None) -> jax.Array:
    """Which images each text token may attend to: [batch, seq, num_media] bool from
    `media_index` [batch, seq].

    only_immediate=True (Flamingo's paper, Idefics, OpenFlamingo's default): only the image
    that most recently precedes the token; False: every image up to it. A token before any
    image (index -1) attends to none -- its cross-attention output is then exactly zero (the
    caller gates on `media_mask(...).any(-1)`). Indices >= num_media (an `<image>` token with
    no image behind it) and images with media_valid [batch, num_media] False attend to none.
    """
    m = jnp.arange(num_media, dtype=jnp.int32)
    idx = index.astype(jnp.int32)[..., None]
    mask = (m == idx) if only_immediate else (m <= idx)
    mask &= idx < num_media
    if media_valid is not None:
        mask &= media_valid.astype(bool)[:, None, :]
    return mask


def media_attention_mask(mask: jax.Array, tokens_per_media: int) -> jax.Array:
    """[batch, seq, num_media] (`media_mask`) -> the cross-attention mask over the flattened
    media tokens [batch, 1, seq, num_media * tokens_per_media] (each image's latents / patch
    tokens share its entry)."""
    b, t, n = mask.shape
    return jnp.repeat(mask, tokens_per_media, axis=-1).reshape(b, 1, t, n * tokens_per_media)
