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

Implementations (all differentiable with `jax.grad`, all give the same numbers):
  "xla"    the reference: plain XLA with the [q_len, kv_len] score matrix materialised.
  "cudnn"  `jax.nn.dot_product_attention(implementation="cudnn")` (GPU, half precision).
  "flash"  the Pallas kernel in `mmjax.kernels.flash_attention`: O(seq) memory, causal key tiles
           skipped; Triton on GPU, Mosaic on TPU, interpret mode on CPU (correct, slow).
  "ring"   `mmjax.kernels.ring_attention`: the sequence sharded over `seq_axis` of `mesh`.
  None     the best for the platform: cuDNN or flash on GPU, flash on TPU, xla on CPU.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mmjax.errors import InputError

IMPLEMENTATIONS = ("xla", "cudnn", "flash", "ring")
FLASH_MAX_HEAD_DIM = 256  # = mmjax.kernels.flash_attention.MAX_HEAD_DIM


def decoding_implementation(implementation: str | None) -> str | None:
    """The implementation to decode with when a model was trained with `implementation`:
    ring attention lays a training sequence over a mesh axis and cannot attend one new token
    to a KV cache (q_len != kv_len), so decoding (and init outside the mesh) uses the
    platform's default over the same params; every other choice is kept."""
    return None if implementation == "ring" else implementation


class AttentionInputError(InputError):
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
    input dtype; the output has the input dtype. MHA contracts [batch, seq, heads, head_dim]
    directly; GQA groups the query heads per K/V head ([b, t, kv_heads, group, head_dim]) so
    K/V are never repeated. The masked softmax zeroes masked exponentials before normalising,
    so a row with no visible key comes out as zeros in the same pass.
    """
    b, t, n, h = query.shape
    k = key.shape[2]
    g = n // k
    scale = 1.0 / math.sqrt(h) if scale is None else scale
    if t == 1 and b > 1:  # batched decoding step (measured: one row is faster as dots)
        return _one_query_attention(query, key, value, mask, scale)
    if g == 1:  # MHA: 4-D contractions, fewer layout changes for XLA
        logits = jnp.einsum("btnh,bsnh->bnts", query, key, preferred_element_type=jnp.float32)
        m = None if mask is None else mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    else:
        q = query.reshape(b, t, k, g, h)
        logits = jnp.einsum("btkgh,bskh->bkgts", q, key, preferred_element_type=jnp.float32)
        m = None
        if mask is not None:
            m = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
            # [B|1, N|1, T|1, S|1] -> [B|1, K|1, G|1, T|1, S|1]
            m = m[:, :, None] if m.shape[1] == 1 else m.reshape(m.shape[0], k, g, m.shape[2], m.shape[3])
    probs = _masked_softmax(logits * jnp.float32(scale), m)
    if g == 1:
        out = jnp.einsum("bnts,bsnh->btnh", probs.astype(value.dtype), value,
                         preferred_element_type=jnp.float32)
    else:
        out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(value.dtype), value,
                         preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(query.dtype)


def _one_query_attention(query, key, value, mask, scale):
    """`attention_reference` for one query token (a decoding step over a KV cache).

    Written as multiply-and-reduce over the cache's own layout [batch, slots, kv_heads, head_dim]
    instead of two batched dots: a dot needs (batch, kv_heads) as leading batch axes, so XLA
    copied every layer's whole K and V caches into [batch, kv_heads, slots, head_dim] at every
    step (~8% of a batch-8 decoding step on CPU). As reductions each cache is read once, in
    place. Same float32 accumulation as the dot path. Measured on the 2-core CPU (`bench
    decode`'s model, one process per variant, alternated): batch 8 +6-9% tokens/s, batch 1
    3-9% slower (one row's cache copy is small and the dots beat the reductions), so it is
    used for batches only.
    """
    b, _, n, h = query.shape
    k = key.shape[2]
    g = n // k
    q = query.reshape(b, 1, k, g, h).astype(jnp.float32)
    logits = jnp.sum(key[:, :, :, None, :].astype(jnp.float32) * q, axis=-1)  # [b, s, k, g]
    logits = logits * jnp.float32(scale)
    m = None
    if mask is not None:
        m4 = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))  # [B|1, N|1, 1, S]
        m = jnp.moveaxis(m4[:, :, 0, :], 1, 2)  # [B|1, S, N|1]
        m = (m[:, :, None, :] if m.shape[2] == 1 else m.reshape(m.shape[0], m.shape[1], k, g))
    if m is None:
        probs = jax.nn.softmax(logits, axis=1)
    else:
        big_neg = jnp.finfo(jnp.float32).min
        logits = jnp.where(m, logits, big_neg)
        e = jnp.where(m, jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, 1, keepdims=True))), 0.0)
        total = jnp.sum(e, axis=1, keepdims=True)
        probs = e / jnp.where(total > 0, total, 1.0)
    probs = probs.astype(value.dtype).astype(jnp.float32)  # the dot path's rounding of probs
    out = jnp.sum(probs[..., None] * value[:, :, :, None, :].astype(jnp.float32), axis=1)
    return out.reshape(b, 1, n, h).astype(query.dtype)


def _masked_softmax(logits: jax.Array, mask: jax.Array | None) -> jax.Array:
    """softmax over the last axis where `mask` is True; rows with no True give zeros."""
    if mask is None:
        return jax.nn.softmax(logits, axis=-1)
    big_neg = jnp.finfo(jnp.float32).min
    logits = jnp.where(mask, logits, big_neg)
    e = jnp.where(mask, jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, -1, keepdims=True))), 0.0)
    total = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(total > 0, total, 1.0)


def _flash_limits(query, key) -> str | None:
    """Why the flash kernel can't take these inputs (None when it can)."""
    if query.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        return f"dtype {query.dtype} (the kernel takes float32, bfloat16, float16)"
    if query.shape[-1] > FLASH_MAX_HEAD_DIM:
        return f"head_dim {query.shape[-1]} (the kernel's limit is {FLASH_MAX_HEAD_DIM})"
    return None


def _cudnn_fits(query, key, mask, segment_ids) -> bool:
    """cuDNN's fused kernel: half precision, head_dim a multiple of 8 up to 128, and no mask
    array to materialise (plain or causal attention)."""
    h = query.shape[-1]
    return (query.dtype in (jnp.bfloat16, jnp.float16) and h % 8 == 0 and h <= 128
            and mask is None and segment_ids is None)


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, stacklevel=3)


def _default_implementation(query, key, mask, segment_ids) -> str:
    """Best implementation for the platform: cuDNN or flash on GPU, flash on TPU, xla on CPU.

    On GPU, cuDNN takes half-precision inputs without a mask array (its fused kernel is the
    fastest known there); flash takes the rest (fp32, segment ids, masks). Inputs the flash kernel
    can't take fall back to xla with a one-time warning."""
    platform = jax.default_backend()
    if platform not in ("gpu", "tpu"):
        return "xla"
    if platform == "gpu" and _cudnn_fits(query, key, mask, segment_ids):
        return "cudnn"
    why = _flash_limits(query, key)
    if why is not None:
        _warn_once(f"mmjax attention: flash kernel does not support {why}; using 'xla'")
        return "xla"
    return "flash"


def _cudnn_attention(query, key, value, mask, scale, causal, segment_ids):
    t, s = query.shape[1], key.shape[1]
    if causal and t == s and mask is None and segment_ids is None:
        full_mask, is_causal = None, True  # cuDNN's own causal mask, nothing materialised
    else:
        full_mask, is_causal = combine_masks(t, s, mask=mask, causal=causal, segment_ids=segment_ids), False
    try:
        return jax.nn.dot_product_attention(
            query, key, value, mask=full_mask, scale=scale, is_causal=is_causal, implementation="cudnn"
        )
    except (RuntimeError, ValueError, NotImplementedError) as e:  # no GPU, unsupported dtype ...
        raise AttentionInputError(f"attention: implementation='cudnn' is not usable here: {e}") from e


def _flash_attention(query, key, value, mask, scale, causal, segment_ids):
    from mmjax.kernels import flash_attention as flash

    why = _flash_limits(query, key)
    if why is not None:
        raise AttentionInputError(f"attention: implementation='flash' does not support {why}; "
                                  "use implementation='xla'")

    def call(q, k, v, mask, segment_ids):
        return flash.flash_attention(q, k, v, causal=causal, segment_ids=segment_ids, mask=mask,
                                     scale=scale)

    return _per_shard(call, query, key, value, mask, segment_ids)


def _per_shard(call, query, key, value, mask, segment_ids):
    """Run a kernel call per batch/head shard of the current mesh (jax.set_mesh + logical-axis
    rules, as `mmjax.parallel.activate` sets them). XLA cannot partition a Pallas custom call:
    without this the kernel would see gathered, replicated inputs on every device. Batch goes
    over the `act_batch` mesh axes that divide it, heads over `act_kv_heads` axes that divide
    the K/V heads; with no mesh, no rules or nothing to split, `call` runs as is."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.manual_axes:
        return call(query, key, value, mask, segment_ids)
    import flax.linen as nn
    from jax.sharding import PartitionSpec as P

    rules = nn.get_logical_axis_rules()
    if not rules:
        return call(query, key, value, mask, segment_ids)

    def axes(name, size):
        a = nn.logical_to_mesh_axes((name,), rules)[0]
        a = () if a is None else (a,) if isinstance(a, str) else tuple(a)
        out, prod = [], 1
        for ax in a:
            if mesh.shape[ax] > 1 and size % (prod * mesh.shape[ax]) == 0:
                out.append(ax)
                prod *= mesh.shape[ax]
        return tuple(out) or None

    b_ax = axes("act_batch", query.shape[0])
    h_ax = axes("act_kv_heads", key.shape[2])
    if b_ax is None and h_ax is None:
        return call(query, key, value, mask, segment_ids)
    x_spec = P(b_ax, None, h_ax, None)
    seg_spec = None
    if segment_ids is not None:
        seg_spec = P(b_ax, None)
        if isinstance(segment_ids, (tuple, list)):
            segment_ids, seg_spec = tuple(segment_ids), (seg_spec, seg_spec)
    mask_spec = None
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
        mask_spec = P(b_ax if mask.shape[0] > 1 else None, h_ax if mask.shape[1] > 1 else None)
    fn = jax.shard_map(call, mesh=mesh, in_specs=(x_spec, x_spec, x_spec, mask_spec, seg_spec),
                       out_specs=x_spec, check_vma=False)
    return fn(query, key, value, mask, segment_ids)


def _ring_attention(query, key, value, mask, scale, causal, segment_ids, mesh, seq_axis):
    from mmjax.kernels import ring_attention as ring

    if mesh is None:  # the current mesh (jax.set_mesh / mmjax.parallel.activate), as models run
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            raise AttentionInputError(
                "attention: implementation='ring' needs mesh= (a jax.sharding.Mesh with the "
                f"sequence axis {seq_axis!r}) or a current mesh (jax.set_mesh)"
            )
    if mask is not None:
        raise AttentionInputError(
            "attention: implementation='ring' takes causal= and segment_ids=, not a mask array; "
            "express padding as its own segment id (padding tokens then see only each other)"
        )
    try:
        return ring.ring_attention(query, key, value, mesh=mesh, seq_axis=seq_axis, causal=causal,
                                   segment_ids=segment_ids, scale=scale)
    except InputError as e:
        raise AttentionInputError(str(e)) from e


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
      implementation: "xla", "cudnn", "flash", "ring" or None (best for the platform: cuDNN or
        flash on GPU, flash on TPU, xla on CPU). "flash" runs the Pallas kernel (interpret mode
        on CPU: correct but slow); "ring" shards the sequence over `seq_axis` of `mesh` (no
        `mask` array: use causal / segment_ids).
      mesh, seq_axis: for "ring", the mesh and the axis the sequence is sharded over
        (mesh=None: the current mesh set by jax.set_mesh / mmjax.parallel.activate).
    Returns:
      [batch, q_len, heads, head_dim] in the input dtype.
    """
    _check_inputs(query, key, value, mask, segment_ids)
    if implementation is None:
        implementation = _default_implementation(query, key, mask, segment_ids)
    if implementation not in IMPLEMENTATIONS:
        raise AttentionInputError(
            f"attention: unknown implementation {implementation!r}; choose one of {IMPLEMENTATIONS} or None"
        )
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    if implementation == "flash":
        return _flash_attention(query, key, value, mask, scale, causal, segment_ids)
    if implementation == "ring":
        return _ring_attention(query, key, value, mask, scale, causal, segment_ids, mesh, seq_axis)
    if implementation == "cudnn":
        return _cudnn_attention(query, key, value, mask, scale, causal, segment_ids)
    t, s = query.shape[1], key.shape[1]
    full_mask = combine_masks(t, s, mask=mask, causal=causal, segment_ids=segment_ids)
    return attention_reference(query, key, value, full_mask, scale)
