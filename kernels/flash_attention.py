"""Blockwise exact attention (FlashAttention-2) as Pallas kernels, forward and backward.

Layout as `mmjax.ops.attention`: q [batch, q_len, heads, head_dim], k/v [batch, kv_len,
kv_heads, head_dim] (kv_heads divides heads: MHA, GQA, MQA), out like q.

    from mmjax.kernels.flash_attention import flash_attention
    out = flash_attention(q, k, v, causal=True)                  # differentiable (custom_vjp)
    out, lse = flash_attention_forward(q, k, v, causal=True)     # lse [batch, heads, q_len]

Algorithm (docs/kernels.md has the long form). The grid runs one program per (query tile,
batch, head); it walks the key/value tiles keeping a running row max `m`, a running sum `l` and
an unnormalised output `acc` in fp32 (online softmax), rescaling `acc` and `l` by
`exp(m_old - m_new)` when the max grows. At the end `out = acc / l` and the log-sum-exp
`lse = m + log(l)` is saved. The backward pass never stores the [q_len, kv_len] matrix either:
two kernels recompute each tile's probabilities as `p = exp(s - lse)`; one owns a key/value tile
and loops over query tiles (and over the query heads of its GQA group) to accumulate dK, dV;
the other owns a query tile and loops over key/value tiles to accumulate dQ, using
`delta = rowsum(out * d_out)`.

Masking: `causal` (bottom-right aligned: query i sees key j iff j <= i + kv_len - q_len;
key tiles that are entirely in the future are never visited), `segment_ids` (packed
documents, [batch, seq] or a (q, kv) pair), and an optional boolean `mask` broadcastable to
[batch, heads, q_len, kv_len] that is read tile by tile (a [batch, 1, 1, kv_len] padding mask
costs O(kv_len); a full mask costs what it weighs, one byte per entry). Rows that can see no key
return zeros (lse = -inf), like the reference. Lengths that are not multiples of the tile
size are padded internally and masked.

Backends:
  "triton"  GPU kernels through Pallas' Triton lowering. On CPU they run with interpret=True
            (that is how the tests run them; interpret mode is for correctness, not speed).
  "mosaic"  TPU kernels through Mosaic (pltpu): grid over key tiles with VMEM scratch
            accumulators. On CPU they run under `pltpu.force_tpu_interpret_mode()`.
Neither has been run on real GPU/TPU hardware yet (see docs/kernels.md).

fp32 and bf16/fp16 inputs; scores, softmax statistics and all accumulators are fp32. On GPU
fp32 inputs use full-precision (IEEE) dots, not TF32, so fp32 results match the reference to
~1e-6; bf16 is the fast path.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mmjax.errors import InputError
from mmjax.kernels.flash_attention_common import (  # shared with flash_attention_tpu; re-exported
    LN2,
    LOG2E,
    MASK_VALUE,
    BlockSizes,
    _dot,
    _first_q_block,
    _kv_blocks_visible,
    _padded_multiple,
    _Spec,
    _tile_visible,
)

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MAX_HEAD_DIM = 256
BACKENDS = ("triton", "mosaic")




# ----------------------------------------------------------------------------------------
# Pure-JAX reference (materialises [q_len, kv_len]; the ground truth for tests)
# ----------------------------------------------------------------------------------------


def _split_segments(segment_ids):
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise InputError(
                "flash_attention: segment_ids pair must be (q_segment_ids, kv_segment_ids)"
            )
        return segment_ids[0], segment_ids[1]
    return segment_ids, segment_ids


def visibility(
    q_len: int,
    kv_len: int,
    *,
    causal: bool = False,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> jax.Array | None:
    """Which keys each query sees, broadcastable to [batch, heads, q_len, kv_len] (None = all)."""
    vis = None
    if causal:
        qi = jnp.arange(q_len)[:, None] + (kv_len - q_len)
        vis = (jnp.arange(kv_len)[None, :] <= qi)[None, None]
    if q_segment_ids is not None:
        seg = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]
        vis = seg if vis is None else vis & seg
    if mask is not None:
        m = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape)).astype(bool)
        vis = m if vis is None else vis & m
    return vis


def flash_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: Any = None,
    mask: jax.Array | None = None,
    scale: float | None = None,
    return_lse: bool = False,
):
    """The same function as `flash_attention`, in plain JAX with the full score matrix.

    Returns out [batch, q_len, heads, head_dim] (input dtype), and with `return_lse` also the
    log-sum-exp [batch, heads, q_len] (fp32; -inf on rows that see no key).
    """
    b, t, n, h = q.shape
    s_len, kh = k.shape[1], k.shape[2]
    g = n // kh
    scale = 1.0 / math.sqrt(h) if scale is None else float(scale)
    q_seg, kv_seg = _split_segments(segment_ids)
    qg = q.reshape(b, t, kh, g, h)
    s = (
        jnp.einsum(
            "btkgh,bskh->bkgts",
            qg,
            k,
            preferred_element_type=jnp.float32,
            precision=lax.Precision.HIGHEST,
        )
        * scale
    )
    vis = visibility(t, s_len, causal=causal, q_segment_ids=q_seg, kv_segment_ids=kv_seg, mask=mask)
    if vis is not None:
        # [B|1, N|1, T, S] -> [B|1, K|1, G|1, T, S]
        vis = (
            vis[:, :, None]
            if vis.shape[1] == 1
            else vis.reshape(vis.shape[0], kh, g, *vis.shape[2:])
        )
        s = jnp.where(vis, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    p = jnp.exp(s - m)
    if vis is not None:
        p = jnp.where(vis, p, 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    probs = p / jnp.where(l > 0, l, 1.0)
    out = (
        jnp.einsum(
            "bkgts,bskh->btkgh", probs, v.astype(jnp.float32), precision=lax.Precision.HIGHEST
        )
        .reshape(b, t, n, h)
        .astype(q.dtype)
    )
    if not return_lse:
        return out
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)[..., 0]
    return out, lse.reshape(b, n, t)


def reference_backward(
    q,
    k,
    v,
    out,
    lse,
    d_out,
    *,
    causal=False,
    segment_ids=None,
    mask=None,
    scale=None,
):
    """Gradients of attention given the saved log-sum-exp, in plain JAX: (dq, dk, dv) in fp32.

    `lse` [batch, heads, q_len] may come from a larger computation (ring attention passes the
    global lse of rows whose keys are spread over devices): this computes the contribution of
    these keys, `p = exp(s - lse)`, `delta = rowsum(out * d_out)` with the global `out`.
    """
    b, t, n, h = q.shape
    s_len, kh = k.shape[1], k.shape[2]
    g = n // kh
    scale = 1.0 / math.sqrt(h) if scale is None else float(scale)
    q_seg, kv_seg = _split_segments(segment_ids)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    hp = lax.Precision.HIGHEST
    qg = f32(q).reshape(b, t, kh, g, h)
    dog = f32(d_out).reshape(b, t, kh, g, h)
    s = jnp.einsum("btkgh,bskh->bkgts", qg, f32(k), precision=hp) * scale
    lse_g = lse.reshape(b, kh, g, t)[..., None]
    p = jnp.exp(s - jnp.where(jnp.isfinite(lse_g), lse_g, 0.0))
    vis = visibility(t, s_len, causal=causal, q_segment_ids=q_seg, kv_segment_ids=kv_seg, mask=mask)
    if vis is not None:
        vis = (
            vis[:, :, None]
            if vis.shape[1] == 1
            else vis.reshape(vis.shape[0], kh, g, *vis.shape[2:])
        )
        p = jnp.where(vis, p, 0.0)
    p = jnp.where(jnp.isfinite(lse_g), p, 0.0)
    delta = jnp.einsum("btkgh,btkgh->bkgt", f32(out).reshape(b, t, kh, g, h), dog, precision=hp)
    dv = jnp.einsum("bkgts,btkgh->bskh", p, dog, precision=hp)
    dp = jnp.einsum("btkgh,bskh->bkgts", dog, f32(v), precision=hp)
    ds = p * (dp - delta[..., None]) * scale
    dq = jnp.einsum("bkgts,bskh->btkgh", ds, f32(k), precision=hp).reshape(b, t, n, h)
    dk = jnp.einsum("bkgts,btkgh->bskh", ds, qg, precision=hp)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------
# Triton (GPU) kernels: one program per tile, inner fori_loop over the other axis
# ----------------------------------------------------------------------------------------


def _load_mask(mask_ref, head, q_start, bq, k_start, bk, tq: int, tk: int):
    """Tile of the (possibly broadcast) mask: rows/cols of size 1 stay size 1."""
    rows = pl.ds(q_start, bq) if tq > 1 else pl.ds(0, 1)
    cols = pl.ds(k_start, bk) if tk > 1 else pl.ds(0, 1)
    if head is None:
        return mask_ref[rows, cols]
    return mask_ref[head, rows, cols]


def _fwd_kernel_triton(
    q_ref,
    k_ref,
    v_ref,
    qseg_ref,
    kvseg_ref,
    mask_ref,
    o_ref,
    lse_ref,
    *,
    spec: _Spec,
    bq: int,
    bk: int,
    num_kv_blocks: int,
):
    i = pl.program_id(0)
    q = q_ref[...]  # [bq, H]
    hp = q.shape[-1]
    rows = i * bq + jnp.arange(bq)[:, None]
    q_seg = qseg_ref[pl.ds(i * bq, bq)][:, None] if qseg_ref is not None else None
    c = spec.scale * LOG2E  # work in base 2: exp2 is the native instruction

    def body(j, carry):
        acc, m, l = carry
        ks = j * bk
        k = k_ref[pl.ds(ks, bk), :]
        s = _dot(q, k, (1, 1)) * c  # [bq, bk]
        cols = ks + jnp.arange(bk)[None, :]
        kv_seg = kvseg_ref[pl.ds(ks, bk)][None, :] if kvseg_ref is not None else None
        mt = None
        if mask_ref is not None:
            mt = _load_mask(
                mask_ref, None, i * bq, bq, ks, bk, spec.mask_shape[2], spec.mask_shape[3]
            )
        vis = _tile_visible(spec, rows, cols, q_seg, kv_seg, mt, (bq, bk))
        if vis is not None:
            s = jnp.where(vis, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        corr = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        if vis is not None:
            p = jnp.where(vis, p, 0.0)
        l = l * corr + jnp.sum(p, axis=1)
        v = v_ref[pl.ds(ks, bk), :]
        acc = acc * corr[:, None] + _dot(p.astype(v.dtype), v, (1, 0))
        return acc, m_new, l

    init = (
        jnp.zeros((bq, hp), jnp.float32),
        jnp.full((bq,), MASK_VALUE, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    acc, m, l = lax.fori_loop(0, _kv_blocks_visible(spec, i, bq, bk, num_kv_blocks), body, init)
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) * LN2)


def _dq_kernel_triton(
    q_ref,
    k_ref,
    v_ref,
    qseg_ref,
    kvseg_ref,
    mask_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dq_ref,
    *,
    spec: _Spec,
    bq: int,
    bk: int,
    num_kv_blocks: int,
):
    i = pl.program_id(0)
    q = q_ref[...]
    do = do_ref[...]
    lse2 = lse_ref[...] * LOG2E  # [bq]
    delta = delta_ref[...]
    rows = i * bq + jnp.arange(bq)[:, None]
    q_seg = qseg_ref[pl.ds(i * bq, bq)][:, None] if qseg_ref is not None else None
    c = spec.scale * LOG2E

    def body(j, dq):
        ks = j * bk
        k = k_ref[pl.ds(ks, bk), :]
        v = v_ref[pl.ds(ks, bk), :]
        s = _dot(q, k, (1, 1)) * c
        cols = ks + jnp.arange(bk)[None, :]
        kv_seg = kvseg_ref[pl.ds(ks, bk)][None, :] if kvseg_ref is not None else None
        mt = None
        if mask_ref is not None:
            mt = _load_mask(
                mask_ref, None, i * bq, bq, ks, bk, spec.mask_shape[2], spec.mask_shape[3]
            )
        vis = _tile_visible(spec, rows, cols, q_seg, kv_seg, mt, (bq, bk))
        p = jnp.exp2(s - lse2[:, None])
        if vis is not None:
            p = jnp.where(vis, p, 0.0)
        dp = _dot(do, v, (1, 1))
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, (1, 0))

    dq = lax.fori_loop(
        0, _kv_blocks_visible(spec, i, bq, bk, num_kv_blocks), body, jnp.zeros(q.shape, jnp.float32)
    )
    dq_ref[...] = (dq * spec.scale).astype(dq_ref.dtype)


def _dkv_kernel_triton(
    q_ref,
    k_ref,
    v_ref,
    qseg_ref,
    kvseg_ref,
    mask_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    *,
    spec: _Spec,
    bq: int,
    bk: int,
    num_q_blocks: int,
    group: int,
):
    """One program per (key tile, batch, kv head); loops over the GQA group and query tiles."""
    j = pl.program_id(0)
    k = k_ref[...]  # [bk, H]
    v = v_ref[...]
    cols = j * bk + jnp.arange(bk)[None, :]
    kv_seg = kvseg_ref[pl.ds(j * bk, bk)][None, :] if kvseg_ref is not None else None
    c = spec.scale * LOG2E
    first = _first_q_block(spec, j, bq, bk)
    n_q = jnp.maximum(num_q_blocks - first, 0)
    mask_heads = spec.mask_shape is not None and spec.mask_shape[1] > 1

    def body(idx, carry):
        dk, dv = carry
        g = lax.div(idx, n_q)
        qi = first + lax.rem(idx, n_q)
        qs = qi * bq
        q = q_ref[pl.ds(qs, bq), g, :]
        do = do_ref[pl.ds(qs, bq), g, :]
        lse2 = lse_ref[g, pl.ds(qs, bq)] * LOG2E
        delta = delta_ref[g, pl.ds(qs, bq)]
        s = _dot(q, k, (1, 1)) * c  # [bq, bk]
        rows = qs + jnp.arange(bq)[:, None]
        q_seg = qseg_ref[pl.ds(qs, bq)][:, None] if qseg_ref is not None else None
        mt = None
        if mask_ref is not None:
            mt = _load_mask(
                mask_ref,
                g if mask_heads else 0,
                qs,
                bq,
                j * bk,
                bk,
                spec.mask_shape[2],
                spec.mask_shape[3],
            )
        vis = _tile_visible(spec, rows, cols, q_seg, kv_seg, mt, (bq, bk))
        p = jnp.exp2(s - lse2[:, None])
        if vis is not None:
            p = jnp.where(vis, p, 0.0)
        dv = dv + _dot(p.astype(do.dtype), do, (0, 0))
        dp = _dot(do, v, (1, 1))
        ds = p * (dp - delta[:, None])
        dk = dk + _dot(ds.astype(q.dtype), q, (0, 0))
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, group * n_q, body, (zeros, zeros))
    dk_ref[...] = (dk * spec.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _mask_spec_fwd(spec: _Spec, t_pad: int, s_pad: int, group: int, per_kv_head: bool):
    """BlockSpec for the padded int8 mask [Bm, Nm, Tm, Sm]: whole rows/cols, broadcast dims kept."""
    bm, nm, tm, sm = spec.mask_shape
    tm_p, sm_p = (t_pad if tm > 1 else 1), (s_pad if sm > 1 else 1)
    if per_kv_head:  # grid (j, b, kh): the group's query heads
        nb = group if nm > 1 else 1
        return pl.BlockSpec(
            (None, nb, tm_p, sm_p), lambda j, b, h: (b if bm > 1 else 0, h if nm > 1 else 0, 0, 0)
        )
    return pl.BlockSpec(
        (None, None, tm_p, sm_p), lambda i, b, h: (b if bm > 1 else 0, h if nm > 1 else 0, 0, 0)
    )


def _triton_params(spec: _Spec, head_dim: int):
    warps, stages = spec.blocks.launch(head_dim)
    if spec.interpret:
        return {}
    from jax.experimental.pallas import triton as plgpu

    return {"compiler_params": plgpu.CompilerParams(num_warps=warps, num_stages=stages)}


def _fwd_triton(spec: _Spec, q, k, v, q_seg, kv_seg, mask):
    b, t_pad, n, hp = q.shape
    s_pad, kh = k.shape[1], k.shape[2]
    g = n // kh
    bq, bk = spec.blocks.block_q, spec.blocks.block_k
    kernel = functools.partial(
        _fwd_kernel_triton, spec=spec, bq=bq, bk=bk, num_kv_blocks=s_pad // bk
    )
    in_specs = [
        pl.BlockSpec((None, bq, None, hp), lambda i, bb, h: (bb, i, h, 0)),
        pl.BlockSpec((None, s_pad, None, hp), lambda i, bb, h: (bb, 0, h // g, 0)),
        pl.BlockSpec((None, s_pad, None, hp), lambda i, bb, h: (bb, 0, h // g, 0)),
        None if q_seg is None else pl.BlockSpec((None, t_pad), lambda i, bb, h: (bb, 0)),
        None if kv_seg is None else pl.BlockSpec((None, s_pad), lambda i, bb, h: (bb, 0)),
        None if mask is None else _mask_spec_fwd(spec, t_pad, s_pad, g, False),
    ]
    out, lse = pl.pallas_call(
        kernel,
        grid=(t_pad // bq, b, n),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, bq, None, hp), lambda i, bb, h: (bb, i, h, 0)),
            pl.BlockSpec((None, None, bq), lambda i, bb, h: (bb, h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, n, t_pad), jnp.float32),
        ],
        interpret=spec.interpret,
        name="mmjax_flash_fwd",
        **_triton_params(spec, hp),
    )(q, k, v, q_seg, kv_seg, mask)
    return out, lse


def _bwd_triton(spec: _Spec, q, k, v, q_seg, kv_seg, mask, do, lse, delta):
    b, t_pad, n, hp = q.shape
    s_pad, kh = k.shape[1], k.shape[2]
    g = n // kh
    blk = spec.blocks
    common = dict(interpret=spec.interpret, **_triton_params(spec, hp))

    # dQ: grid over (query tile, batch, head)
    bq, bk = blk.block_q_dq, blk.block_k_dq
    dq = pl.pallas_call(
        functools.partial(_dq_kernel_triton, spec=spec, bq=bq, bk=bk, num_kv_blocks=s_pad // bk),
        grid=(t_pad // bq, b, n),
        in_specs=[
            pl.BlockSpec((None, bq, None, hp), lambda i, bb, h: (bb, i, h, 0)),
            pl.BlockSpec((None, s_pad, None, hp), lambda i, bb, h: (bb, 0, h // g, 0)),
            pl.BlockSpec((None, s_pad, None, hp), lambda i, bb, h: (bb, 0, h // g, 0)),
            None if q_seg is None else pl.BlockSpec((None, t_pad), lambda i, bb, h: (bb, 0)),
            None if kv_seg is None else pl.BlockSpec((None, s_pad), lambda i, bb, h: (bb, 0)),
            None if mask is None else _mask_spec_fwd(spec, t_pad, s_pad, g, False),
            pl.BlockSpec((None, bq, None, hp), lambda i, bb, h: (bb, i, h, 0)),
            pl.BlockSpec((None, None, bq), lambda i, bb, h: (bb, h, i)),
            pl.BlockSpec((None, None, bq), lambda i, bb, h: (bb, h, i)),
        ],
        out_specs=pl.BlockSpec((None, bq, None, hp), lambda i, bb, h: (bb, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, jnp.float32),
        name="mmjax_flash_dq",
        **common,
    )(q, k, v, q_seg, kv_seg, mask, do, lse, delta)

    # dK, dV: grid over (key tile, batch, kv head); each program loops over its query heads
    bq, bk = blk.block_q_dkv, blk.block_k_dkv
    dk, dv = pl.pallas_call(
        functools.partial(
            _dkv_kernel_triton, spec=spec, bq=bq, bk=bk, num_q_blocks=t_pad // bq, group=g
        ),
        grid=(s_pad // bk, b, kh),
        in_specs=[
            pl.BlockSpec((None, t_pad, g, hp), lambda j, bb, h: (bb, 0, h, 0)),
            pl.BlockSpec((None, bk, None, hp), lambda j, bb, h: (bb, j, h, 0)),
            pl.BlockSpec((None, bk, None, hp), lambda j, bb, h: (bb, j, h, 0)),
            None if q_seg is None else pl.BlockSpec((None, t_pad), lambda j, bb, h: (bb, 0)),
            None if kv_seg is None else pl.BlockSpec((None, s_pad), lambda j, bb, h: (bb, 0)),
            None if mask is None else _mask_spec_fwd(spec, t_pad, s_pad, g, True),
            pl.BlockSpec((None, t_pad, g, hp), lambda j, bb, h: (bb, 0, h, 0)),
            pl.BlockSpec((None, g, t_pad), lambda j, bb, h: (bb, h, 0)),
            pl.BlockSpec((None, g, t_pad), lambda j, bb, h: (bb, h, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, bk, None, hp), lambda j, bb, h: (bb, j, h, 0)),
            pl.BlockSpec((None, bk, None, hp), lambda j, bb, h: (bb, j, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(k.shape, jnp.float32),
            jax.ShapeDtypeStruct(v.shape, jnp.float32),
        ],
        name="mmjax_flash_dkv",
        **common,
    )(q, k, v, q_seg, kv_seg, mask, do, lse, delta)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------
# Front end: padding, dispatch, custom_vjp
# ----------------------------------------------------------------------------------------


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _pad_axis(x, axis: int, size: int, value=0):
    if x is None or x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _fit_blocks(blocks: BlockSizes, q_len: int, kv_len: int) -> BlockSizes:
    """Shrink tiles longer than the sequence (to its next power of two, at least 16)."""
    tq = max(16, pl.next_power_of_2(q_len))
    tk = max(16, pl.next_power_of_2(kv_len))
    return dataclasses.replace(
        blocks,
        block_q=min(blocks.block_q, tq),
        block_k=min(blocks.block_k, tk),
        block_q_dkv=min(blocks.block_q_dkv, tq),
        block_k_dkv=min(blocks.block_k_dkv, tk),
        block_q_dq=min(blocks.block_q_dq, tq),
        block_k_dq=min(blocks.block_k_dq, tk),
    )


def _padded_inputs(spec: _Spec, q, k, v, q_seg, kv_seg, mask):
    """Pad seq to the tile multiple and head_dim to a power of two >= 16 (zeros change nothing:
    they add 0 to every score and give 0 output columns that are sliced off)."""
    t_pad = _round_up(spec.q_len, _padded_multiple(spec, "q"))
    s_pad = _round_up(spec.kv_len, _padded_multiple(spec, "k"))
    hp = max(16, pl.next_power_of_2(spec.head_dim))
    q = _pad_axis(_pad_axis(q, 1, t_pad), 3, hp)
    k = _pad_axis(_pad_axis(k, 1, s_pad), 3, hp)
    v = _pad_axis(_pad_axis(v, 1, s_pad), 3, hp)
    q_seg = _pad_axis(q_seg, 1, t_pad) if q_seg is not None else None
    kv_seg = _pad_axis(kv_seg, 1, s_pad) if kv_seg is not None else None
    if mask is not None:
        mask = mask.astype(jnp.int8)
        if mask.shape[2] > 1:
            mask = _pad_axis(mask, 2, t_pad)
        if mask.shape[3] > 1:
            mask = _pad_axis(mask, 3, s_pad)
    return q, k, v, q_seg, kv_seg, mask


def _forward(spec: _Spec, q, k, v, q_seg, kv_seg, mask):
    """(out [B, T, N, H] input dtype, lse [B, N, T] fp32) for unpadded inputs."""
    t, h = spec.q_len, spec.head_dim
    qp, kp, vp, qs, ks, mp = _padded_inputs(spec, q, k, v, q_seg, kv_seg, mask)
    if spec.backend == "mosaic":
        from mmjax.kernels import flash_attention_tpu as tpu

        out, lse = tpu.forward(spec, qp, kp, vp, qs, ks, mp)
    else:
        out, lse = _fwd_triton(spec, qp, kp, vp, qs, ks, mp)
    return out[:, :t, :, :h], lse[:, :, :t]


def _backward(spec: _Spec, q, k, v, q_seg, kv_seg, mask, out, lse, do, delta=None):
    """(dq, dk, dv) in fp32 for unpadded inputs; lse and delta may be global (ring attention)."""
    t, s, h = spec.q_len, spec.kv_len, spec.head_dim
    if delta is None:
        delta = jnp.einsum("btnh,btnh->bnt", out.astype(jnp.float32), do.astype(jnp.float32))
    qp, kp, vp, qs, ks, mp = _padded_inputs(spec, q, k, v, q_seg, kv_seg, mask)
    t_pad, hp = qp.shape[1], qp.shape[3]
    dop = _pad_axis(_pad_axis(do.astype(q.dtype), 1, t_pad), 3, hp)
    lsep = _pad_axis(lse, 2, t_pad)  # padded rows: do = 0 and delta = 0, so they add nothing
    deltap = _pad_axis(delta, 2, t_pad)
    if spec.backend == "mosaic":
        from mmjax.kernels import flash_attention_tpu as tpu

        dq, dk, dv = tpu.backward(spec, qp, kp, vp, qs, ks, mp, dop, lsep, deltap)
    else:
        dq, dk, dv = _bwd_triton(spec, qp, kp, vp, qs, ks, mp, dop, lsep, deltap)
    return dq[:, :t, :, :h], dk[:, :s, :, :h], dv[:, :s, :, :h]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(spec, q, k, v, q_seg, kv_seg, mask):
    return _forward(spec, q, k, v, q_seg, kv_seg, mask)[0]


def _flash_fwd(spec, q, k, v, q_seg, kv_seg, mask):
    out, lse = _forward(spec, q, k, v, q_seg, kv_seg, mask)
    return out, (q, k, v, q_seg, kv_seg, mask, out, lse)


def _flash_bwd(spec, res, do):
    q, k, v, q_seg, kv_seg, mask, out, lse = res
    dq, dk, dv = _backward(spec, q, k, v, q_seg, kv_seg, mask, out, lse, do)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def check_supported(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    """Raise InputError naming the limit when these inputs are outside what the kernels do."""
    for name, x in (("query", q), ("key", k), ("value", v)):
        if x.ndim != 4:
            raise InputError(
                f"flash_attention: {name} must be [batch, seq, heads, head_dim], "
                f"got shape {tuple(x.shape)}"
            )
    if q.dtype not in SUPPORTED_DTYPES or not (q.dtype == k.dtype == v.dtype):
        raise InputError(
            f"flash_attention: dtypes must be one of float32/bfloat16/float16 and "
            f"equal, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if q.shape[-1] > MAX_HEAD_DIM:
        raise InputError(
            f"flash_attention: head_dim {q.shape[-1]} is above the kernel limit "
            f"{MAX_HEAD_DIM}; use implementation='xla'"
        )
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise InputError(
            f"flash_attention: shapes do not fit: q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[2] % k.shape[2]:
        raise InputError(
            f"flash_attention: heads {q.shape[2]} not a multiple of kv_heads {k.shape[2]}"
        )


def _default_backend() -> str:
    return "mosaic" if jax.default_backend() == "tpu" else "triton"


def make_spec(
    q,
    k,
    *,
    causal=False,
    has_segments=False,
    mask_shape=None,
    scale=None,
    block_sizes: BlockSizes | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
) -> _Spec:
    """The static description of one call (tiles fitted to the lengths)."""
    backend = backend or _default_backend()
    if backend not in BACKENDS:
        raise InputError(f"flash_attention: unknown backend {backend!r}; choose one of {BACKENDS}")
    platform = jax.default_backend()
    if interpret is None:
        interpret = platform == "cpu"
    blocks = block_sizes or BlockSizes.for_platform(
        "tpu" if backend == "mosaic" else "gpu", q.shape[-1]
    )
    blocks = _fit_blocks(blocks, q.shape[1], k.shape[1])
    h = q.shape[-1]
    return _Spec(
        causal=bool(causal),
        scale=1.0 / math.sqrt(h) if scale is None else float(scale),
        q_len=q.shape[1],
        kv_len=k.shape[1],
        head_dim=h,
        blocks=blocks,
        backend=backend,
        interpret=bool(interpret),
        has_segments=has_segments,
        mask_shape=None if mask_shape is None else tuple(int(d) for d in mask_shape),
    )


def _prepare(q, k, v, segment_ids, mask):
    check_supported(q, k, v)
    q_seg, kv_seg = _split_segments(segment_ids)
    if q_seg is not None:
        if q_seg.shape != q.shape[:2] or kv_seg.shape != k.shape[:2]:
            raise InputError(
                f"flash_attention: segment_ids must be [batch, q_len] / [batch, kv_len] "
                f"= {q.shape[:2]} / {k.shape[:2]}, got {q_seg.shape} / {kv_seg.shape}"
            )
        q_seg, kv_seg = q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)
    if mask is not None:
        if mask.ndim > 4:
            raise InputError(f"flash_attention: mask rank must be <= 4, got {mask.shape}")
        mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
        full = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
        if any(m not in (1, f) for m, f in zip(mask.shape, full)):
            raise InputError(f"flash_attention: mask {mask.shape} does not broadcast to {full}")
    return q_seg, kv_seg, mask


def _prepare_call(q, k, v, segment_ids, mask, *, causal, scale, block_sizes, backend, interpret):
    """Validated inputs and the static spec shared by the public entry points."""
    q_seg, kv_seg, mask = _prepare(q, k, v, segment_ids, mask)
    spec = make_spec(q, k, causal=causal, has_segments=q_seg is not None,
                     mask_shape=None if mask is None else mask.shape, scale=scale,
                     block_sizes=block_sizes, backend=backend, interpret=interpret)
    return spec, q_seg, kv_seg, mask


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: jax.Array | Sequence[jax.Array] | None = None,
    mask: jax.Array | None = None,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Exact attention in tiles, differentiable (see the module docstring).

    Args:
      q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim].
      causal: bottom-right aligned causal mask; future key tiles are skipped.
      segment_ids: [batch, seq] int (self-attention) or a (q [batch, q_len], kv [batch, kv_len])
        pair; a query attends only to keys with the same id.
      mask: bool broadcastable to [batch, heads, q_len, kv_len], True = attend.
      scale: logit scale, default 1/sqrt(head_dim).
      block_sizes: tiles and launch parameters (default: `BlockSizes.for_platform`).
      backend: "triton" (GPU) or "mosaic" (TPU); default from the platform.
      interpret: run the kernels in Pallas interpret mode (default: on CPU).
    Returns:
      [batch, q_len, heads, head_dim] in the input dtype.
    """
    spec, q_seg, kv_seg, mask = _prepare_call(
        q, k, v, segment_ids, mask, causal=causal, scale=scale, block_sizes=block_sizes,
        backend=backend, interpret=interpret)
    return _flash(spec, q, k, v, q_seg, kv_seg, mask)


def flash_attention_forward(
    q,
    k,
    v,
    *,
    causal=False,
    segment_ids=None,
    mask=None,
    scale=None,
    block_sizes=None,
    backend=None,
    interpret=None,
):
    """Forward only: (out [batch, q_len, heads, head_dim], lse [batch, heads, q_len] fp32).

    Not differentiable by itself; ring attention pairs it with `flash_attention_backward`."""
    spec, q_seg, kv_seg, mask = _prepare_call(
        q, k, v, segment_ids, mask, causal=causal, scale=scale, block_sizes=block_sizes,
        backend=backend, interpret=interpret)
    return _forward(spec, q, k, v, q_seg, kv_seg, mask)


def flash_attention_backward(
    q,
    k,
    v,
    out,
    lse,
    d_out,
    *,
    causal=False,
    segment_ids=None,
    mask=None,
    scale=None,
    delta=None,
    block_sizes=None,
    backend=None,
    interpret=None,
):
    """(dq, dk, dv) in fp32 from the saved `lse` [batch, heads, q_len].

    `out`, `lse` (and `delta = rowsum(out * d_out)` [batch, heads, q_len], computed when None)
    may be those of a larger attention whose keys include these: the result is then the
    contribution of these keys (ring attention sums it over the ring)."""
    spec, q_seg, kv_seg, mask = _prepare_call(
        q, k, v, segment_ids, mask, causal=causal, scale=scale, block_sizes=block_sizes,
        backend=backend, interpret=interpret)
    return _backward(spec, q, k, v, q_seg, kv_seg, mask, out, lse, d_out, delta)


# ----------------------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """Time flash vs the XLA reference at one shape: `python -m mmjax.kernels.flash_attention`.

    On CPU the kernel runs in interpret mode: the numbers say nothing about GPU/TPU speed."""
    import argparse
    import time

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    dtype = jnp.dtype(a.dtype)
    kq = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq[0], (a.batch, a.seq, a.heads, a.head_dim), dtype)
    kvh = a.kv_heads or a.heads
    k = jax.random.normal(kq[1], (a.batch, a.seq, kvh, a.head_dim), dtype)
    v = jax.random.normal(kq[2], (a.batch, a.seq, kvh, a.head_dim), dtype)
    fns = {
        "flash": jax.jit(functools.partial(flash_attention, causal=a.causal)),
        "reference": jax.jit(functools.partial(flash_attention_reference, causal=a.causal)),
    }
    outs = {}
    for name, fn in fns.items():
        outs[name] = fn(q, k, v).block_until_ready()
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            fn(q, k, v).block_until_ready()
            times.append(time.perf_counter() - t0)
        flops = 4 * a.batch * a.heads * a.seq * a.seq * a.head_dim * (0.5 if a.causal else 1.0)
        t = sorted(times)[len(times) // 2]
        print(f"{name:10s} {t * 1e3:9.2f} ms  {flops / t / 1e12:8.3f} TFLOP/s")
    err = jnp.max(
        jnp.abs(outs["flash"].astype(jnp.float32) - outs["reference"].astype(jnp.float32))
    )
    print(f"max |flash - reference| = {float(err):.2e}  ({jax.devices()[0].device_kind})")


if __name__ == "__main__":
    main()
