"""Scaled dot-product attention: one entry point, several implementations.

Layout and meaning follow `jax.nn.dot_product_attention`:

  query  [batch, q_len, num_heads, head_dim]
  key    [batch, kv_len, num_kv_heads, head_dim]
  value  [batch, kv_len, num_kv_heads, head_dim]
  mask   bool, broadcastable to [batch, num_heads, q_len, kv_len]; True = attend
  out    [batch, q_len, num_heads, head_dim]

`num_heads` must be a multiple of `num_kv_heads` (MHA: equal, GQA: a divisor, MQA: 1).
K/V heads are never repeated in memory: queries are grouped instead.

`causal=True` is aligned bottom-right: query i sees key j when j <= i + (kv_len - q_len).
With q_len == kv_len this is the usual lower-triangular mask; with a longer key sequence
(a chunk of new queries after a prefix) the last query sees every key.

`segment_ids` marks packed documents: either one int array [batch, seq] used for queries
and keys (self-attention), or a pair `(q_segment_ids [batch, q_len], kv_segment_ids
[batch, kv_len])`. A query attends only to keys with the same id.

A query row that can attend to nothing (all of its keys masked) returns zeros.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn", "flash", "ring")


class AttentionInputError(ValueError):
    """Raised for attention inputs whose shapes, dtypes or options don't fit together."""


def _check_inputs(query, key, value, mask, segment_ids):
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim != 4:
            raise AttentionInputError(
                f"attention: {name} must have rank 4 [batch, seq, heads, head_dim], "
                f"got shape {tuple(x.shape)}"
            )
    b, t, n, h = query.shape
    bk, s, k, hk = key.shape
    if key.shape != value.shape[:3] + (key.shape[3],) or value.shape[:3] != key.shape[:3]:
        raise AttentionInputError(
            f"attention: key {tuple(key.shape)} and value {tuple(value.shape)} must agree "
            "in batch, kv_len and kv_heads"
        )
    if bk != b:
        raise AttentionInputError(f"attention: query batch {b} != key batch {bk}")
    if hk != h:
        raise AttentionInputError(f"attention: query head_dim {h} != key head_dim {hk}")
    if n % k:
        raise AttentionInputError(
            f"attention: num_heads={n} is not a multiple of num_kv_heads={k} "
            "(GQA needs each K/V head shared by a whole group of query heads)"
        )
    if not (query.dtype == key.dtype == value.dtype):
        raise AttentionInputError(
            f"attention: dtypes differ: query {query.dtype}, key {key.dtype}, value {value.dtype}"
        )
    if not jnp.issubdtype(query.dtype, jnp.floating):
        raise AttentionInputError(f"attention: inputs must be floating point, got {query.dtype}")
    if mask is not None:
        if mask.dtype != jnp.bool_:
            raise AttentionInputError(f"attention: mask must be boolean (True = attend), got {mask.dtype}")
        if mask.ndim > 4:
            raise AttentionInputError(f"attention: mask rank must be <= 4, got shape {tuple(mask.shape)}")
        full = (b, n, t, s)
        padded = (1,) * (4 - mask.ndim) + tuple(mask.shape)
        for dim, (m, f) in enumerate(zip(padded, full)):
            if m not in (1, f):
                raise AttentionInputError(
                    f"attention: mask shape {tuple(mask.shape)} does not broadcast to "
                    f"[batch, heads, q_len, kv_len] = {full} (dim {dim})"
                )
    if segment_ids is not None:
        q_seg, kv_seg = _split_segment_ids(segment_ids)
        if q_seg.shape != (b, t):
            raise AttentionInputError(
                f"attention: query segment_ids must have shape [batch, q_len] = {(b, t)}, "
                f"got {tuple(q_seg.shape)}"
            )
        if kv_seg.shape != (b, s):
            raise AttentionInputError(
                f"attention: key segment_ids must have shape [batch, kv_len] = {(b, s)}, "
                f"got {tuple(kv_seg.shape)}"
            )


def _split_segment_ids(segment_ids):
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise AttentionInputError("attention: segment_ids pair must be (q_segment_ids, kv_segment_ids)")
        return segment_ids[0], segment_ids[1]
    return segment_ids, segment_ids


def combine_masks(
    q_len: int,
    kv_len: int,
    *,
    mask: jax.Array | None = None,
    causal: bool = False,
    segment_ids: Any = None,
) -> jax.Array | None:
    """All mask sources as one boolean array broadcastable to [batch, heads, q_len, kv_len]."""
    from mmjax.ops import masks as masks_lib

    out = mask
    if causal:
        out = masks_lib.and_masks(out, masks_lib.causal_mask(q_len, kv_len)[None, None])
    if segment_ids is not None:
        q_seg, kv_seg = _split_segment_ids(segment_ids)
        out = masks_lib.and_masks(out, masks_lib.segment_mask(q_seg, kv_seg))
    return out


def attention_reference(query, key, value, mask=None, scale=None):
    """Plain-XLA attention with a fully materialised [q_len, kv_len] score matrix.

    Scores, softmax and the probability-weighted sum accumulate in float32 whatever the
    input dtype; the output has the input dtype.
    """
    b, t, n, h = query.shape
    k = key.shape[2]
    g = n // k
    scale = 1.0 / math.sqrt(h) if scale is None else scale
    q = query.reshape(b, t, k, g, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, key, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(scale)
    if mask is not None:
        m = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
        # [B|1, N|1, T|1, S|1] -> [B|1, K|1, G|1, T|1, S|1]
        if m.shape[1] == 1:
            m = m[:, :, None]
        else:
            m = m.reshape(m.shape[0], k, g, m.shape[2], m.shape[3])
        big_neg = jnp.finfo(jnp.float32).min
        logits = jnp.where(m, logits, big_neg)
    probs = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        # rows with no visible key: zeros instead of a uniform average over masked keys
        probs = jnp.where(jnp.any(m, axis=-1, keepdims=True), probs, 0.0)
    out = jnp.einsum(
        "bkgts,bskh->btkgh", probs.astype(value.dtype), value, preferred_element_type=jnp.float32
    )
    return out.reshape(b, t, n, h).astype(query.dtype)


def _default_implementation(query) -> str:
    platform = jax.default_backend()
    if platform == "gpu" and query.dtype in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def _cudnn_attention(query, key, value, mask, scale):
    try:
        return jax.nn.dot_product_attention(
            query, key, value, mask=mask, scale=scale, implementation="cudnn"
        )
    except (RuntimeError, ValueError, NotImplementedError) as e:  # no GPU, unsupported dtype ...
        raise AttentionInputError(f"attention: implementation='cudnn' is not usable here: {e}") from e


def attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    mask: jax.Array | None = None,
    causal: bool = False,
    segment_ids: jax.Array | Sequence[jax.Array] | None = None,
    scale: float | None = None,
    implementation: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    seq_axis: str = "seq",
) -> jax.Array:
    """Multi-head attention `softmax(q k^T * scale + mask) v` (see module docstring for layout).

    Args:
      query, key, value: [batch, seq, heads, head_dim]; fewer K/V heads than query heads = GQA.
      mask: boolean, True = attend, broadcastable to [batch, heads, q_len, kv_len].
      causal: add a (bottom-right aligned) causal mask.
      segment_ids: packed-document ids, [batch, seq] or a (q, kv) pair.
      scale: logit scale, default 1/sqrt(head_dim).
      implementation: "xla", "cudnn", "flash", "ring" or None (best for the platform).
      mesh, seq_axis: for "ring", the mesh and the axis the sequence is sharded over.
    Returns:
      [batch, q_len, heads, head_dim] in the input dtype.
    """
    _check_inputs(query, key, value, mask, segment_ids)
    if implementation is None:
        implementation = _default_implementation(query)
    if implementation not in IMPLEMENTATIONS:
        raise AttentionInputError(
            f"attention: unknown implementation {implementation!r}; choose one of {IMPLEMENTATIONS} or None"
        )
    t, s = query.shape[1], key.shape[1]
    full_mask = combine_masks(t, s, mask=mask, causal=causal, segment_ids=segment_ids)
    if implementation == "xla":
        return attention_reference(query, key, value, full_mask, scale)
    if implementation == "cudnn":
        return _cudnn_attention(query, key, value, full_mask, scale)
    try:
        if implementation == "flash":
            from mmjax.kernels import flash_attention as flash  # noqa: F401
        else:
            from mmjax.kernels import ring_attention as ring  # noqa: F401
    except ImportError:
        raise AttentionInputError(
            f"attention: implementation={implementation!r} is not built yet in this version of "
            "mmjax (use 'xla' or 'cudnn')"
        ) from None
    raise AttentionInputError(f"attention: implementation={implementation!r} is not wired yet")

