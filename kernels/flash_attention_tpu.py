"""TPU (Mosaic) kernels for `mmjax.kernels.flash_attention` (backend="mosaic").

The pure-JAX reference, the front end and the benchmark live in `flash_attention.py`, the
block-size config, call spec and tile logic both backends share in `flash_attention_common.py`;
this file holds only the TPU kernels. Inputs arrive padded in the
[batch, seq, heads, head_dim] layout and are transposed to heads-major [batch, heads, seq,
head_dim] so every tile's last two dims are (seq tile, head_dim), as Mosaic wants.

TPU style differs from the Triton kernels: a TPU core runs the grid sequentially, so the key
axis (forward, dQ) or the (group head, query) axes (dK/dV) are "arbitrary" grid dimensions whose
iterations accumulate into VMEM scratch (m, l, acc), initialised at the first and written out at
the last iteration. Causal tiles above the diagonal are skipped with `pl.when`, and their index
maps are clamped to the last useful tile so the pipeline does not fetch them.

Validated on CPU under `pltpu.force_tpu_interpret_mode()` only; not yet run on a TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from mmjax.kernels.flash_attention_common import (
    MASK_VALUE,
    _dot,
    _first_q_block,
    _kv_blocks_visible,
    _Spec,
    _tile_visible,
)


def _iota(shape, dim, start):
    return start + lax.broadcasted_iota(jnp.int32, shape, dim)


def _mask_tile(mask_ref, spec: _Spec):
    if mask_ref is None:
        return None
    return mask_ref[...]  # [bq|1, bk|1]


def _fwd_kernel(
    q_ref,
    k_ref,
    v_ref,
    qseg_ref,
    kvseg_ref,
    mask_ref,
    o_ref,
    lse_ref,
    m_sc,
    l_sc,
    acc_sc,
    *,
    spec: _Spec,
    bq: int,
    bk: int,
    num_kv_blocks: int,
):
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(j < _kv_blocks_visible(spec, i, bq, bk, num_kv_blocks))
    def _step():
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = _dot(q, k, (1, 1)) * spec.scale  # [bq, bk]
        vis = _tile_visible(
            spec,
            _iota((bq, bk), 0, i * bq),
            _iota((bq, bk), 1, j * bk),
            None if qseg_ref is None else qseg_ref[...],
            None if kvseg_ref is None else kvseg_ref[...],
            _mask_tile(mask_ref, spec),
            (bq, bk),
        )
        if vis is not None:
            s = jnp.where(vis, s, MASK_VALUE)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        corr = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new)
        if vis is not None:
            p = jnp.where(vis, p, 0.0)
        l_sc[...] = l_sc[...] * corr + jnp.sum(p, axis=1, keepdims=True)
        acc_sc[...] = acc_sc[...] * corr + _dot(p.astype(v.dtype), v, (1, 0))
        m_sc[...] = m_new

    @pl.when(j == num_kv_blocks - 1)
    def _finish():
        l = l_sc[...]
        empty = l == 0.0
        l_safe = jnp.where(empty, 1.0, l)
        o_ref[...] = (acc_sc[...] / l_safe).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, -jnp.inf, m_sc[...] + jnp.log(l_safe))


def _dq_kernel(
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
    dq_sc,
    *,
    spec: _Spec,
    bq: int,
    bk: int,
    num_kv_blocks: int,
):
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(j < _kv_blocks_visible(spec, i, bq, bk, num_kv_blocks))
    def _step():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s = _dot(q, k, (1, 1)) * spec.scale
        vis = _tile_visible(
            spec,
            _iota((bq, bk), 0, i * bq),
            _iota((bq, bk), 1, j * bk),
            None if qseg_ref is None else qseg_ref[...],
            None if kvseg_ref is None else kvseg_ref[...],
            _mask_tile(mask_ref, spec),
            (bq, bk),
        )
        p = jnp.exp(s - lse_ref[...])
        if vis is not None:
            p = jnp.where(vis, p, 0.0)
        ds = p * (_dot(do, v, (1, 1)) - delta_ref[...])
        dq_sc[...] = dq_sc[...] + _dot(ds.astype(k.dtype), k, (1, 0))

    @pl.when(j == num_kv_blocks - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * spec.scale).astype(dq_ref.dtype)


def _dkv_kernel(
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
    dk_sc,
    dv_sc,
    *,
    spec: _Spec,
    bq: int,
    bk: int,
    num_q_blocks: int,
    group: int,
):
    j, g, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((g == 0) & (i == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(i >= _first_q_block(spec, j, bq, bk))
    def _step():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s = _dot(q, k, (1, 1)) * spec.scale
        vis = _tile_visible(
            spec,
            _iota((bq, bk), 0, i * bq),
            _iota((bq, bk), 1, j * bk),
            None if qseg_ref is None else qseg_ref[...],
            None if kvseg_ref is None else kvseg_ref[...],
            _mask_tile(mask_ref, spec),
            (bq, bk),
        )
        p = jnp.exp(s - lse_ref[...])
        if vis is not None:
            p = jnp.where(vis, p, 0.0)
        dv_sc[...] = dv_sc[...] + _dot(p.astype(do.dtype), do, (0, 0))
        ds = p * (_dot(do, v, (1, 1)) - delta_ref[...])
        dk_sc[...] = dk_sc[...] + _dot(ds.astype(q.dtype), q, (0, 0))

    @pl.when((g == group - 1) & (i == num_q_blocks - 1))
    def _finish():
        dk_ref[...] = (dk_sc[...] * spec.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _heads_major(x):
    return None if x is None else jnp.transpose(x, (0, 2, 1, 3))


def _mask_block(spec: _Spec, bq: int, bk: int, head_of, q_of, k_of):
    bm, nm, tm, sm = spec.mask_shape
    return pl.BlockSpec(
        (None, None, bq if tm > 1 else 1, bk if sm > 1 else 1),
        lambda *ids: (
            ids[0] if bm > 1 else 0,
            head_of(*ids) if nm > 1 else 0,
            q_of(*ids) if tm > 1 else 0,
            k_of(*ids) if sm > 1 else 0,
        ),
    )


def _params(*semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def forward(spec: _Spec, q, k, v, q_seg, kv_seg, mask):
    """Padded [B, T, N, H] inputs -> (out [B, T, N, H], lse [B, N, T])."""
    b, t_pad, n, hp = q.shape
    s_pad, kh = k.shape[1], k.shape[2]
    g = n // kh
    bq, bk = spec.blocks.block_q, spec.blocks.block_k
    nq, nk = t_pad // bq, s_pad // bk

    def kv_block(bb, h, i, j):  # clamp skipped causal tiles to the last useful one: no refetch
        if not spec.causal:
            return j
        return jnp.minimum(j, jnp.maximum(_kv_blocks_visible(spec, i, bq, bk, nk) - 1, 0))

    in_specs = [
        pl.BlockSpec((None, None, bq, hp), lambda bb, h, i, j: (bb, h, i, 0)),
        pl.BlockSpec(
            (None, None, bk, hp), lambda bb, h, i, j: (bb, h // g, kv_block(bb, h, i, j), 0)
        ),
        pl.BlockSpec(
            (None, None, bk, hp), lambda bb, h, i, j: (bb, h // g, kv_block(bb, h, i, j), 0)
        ),
        None if q_seg is None else pl.BlockSpec((None, bq, 1), lambda bb, h, i, j: (bb, i, 0)),
        None
        if kv_seg is None
        else pl.BlockSpec((None, 1, bk), lambda bb, h, i, j: (bb, 0, kv_block(bb, h, i, j))),
        None
        if mask is None
        else _mask_block(spec, bq, bk, lambda bb, h, i, j: h, lambda bb, h, i, j: i, kv_block),
    ]
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, spec=spec, bq=bq, bk=bk, num_kv_blocks=nk),
        grid=(b, n, nq, nk),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, bq, hp), lambda bb, h, i, j: (bb, h, i, 0)),
            pl.BlockSpec((None, None, bq, 1), lambda bb, h, i, j: (bb, h, i, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, n, t_pad, hp), q.dtype),
            jax.ShapeDtypeStruct((b, n, t_pad, 1), jnp.float32),
        ],
        scratch_shapes=[
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, hp), jnp.float32),
        ],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        name="mmjax_flash_fwd_tpu",
    )(
        _heads_major(q),
        _heads_major(k),
        _heads_major(v),
        None if q_seg is None else q_seg[:, :, None],
        None if kv_seg is None else kv_seg[:, None, :],
        mask,
    )
    return _heads_major(out), lse[..., 0]


def backward(spec: _Spec, q, k, v, q_seg, kv_seg, mask, do, lse, delta):
    """Padded inputs, lse/delta [B, N, T] -> (dq, dk, dv) fp32 in [B, seq, heads, H]."""
    b, t_pad, n, hp = q.shape
    s_pad, kh = k.shape[1], k.shape[2]
    g = n // kh
    qh, kh_, vh, doh = _heads_major(q), _heads_major(k), _heads_major(v), _heads_major(do)
    lse4, delta4 = lse[..., None], delta[..., None]
    qs3 = None if q_seg is None else q_seg[:, :, None]
    ks3 = None if kv_seg is None else kv_seg[:, None, :]

    # dQ: grid (batch, head, q tile, k tile), the k axis accumulates
    bq, bk = spec.blocks.block_q_dq, spec.blocks.block_k_dq
    nq, nk = t_pad // bq, s_pad // bk

    def kv_block(bb, h, i, j):
        if not spec.causal:
            return j
        return jnp.minimum(j, jnp.maximum(_kv_blocks_visible(spec, i, bq, bk, nk) - 1, 0))

    row = pl.BlockSpec((None, None, bq, hp), lambda bb, h, i, j: (bb, h, i, 0))
    stat = pl.BlockSpec((None, None, bq, 1), lambda bb, h, i, j: (bb, h, i, 0))
    kvs = pl.BlockSpec(
        (None, None, bk, hp), lambda bb, h, i, j: (bb, h // g, kv_block(bb, h, i, j), 0)
    )
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, spec=spec, bq=bq, bk=bk, num_kv_blocks=nk),
        grid=(b, n, nq, nk),
        in_specs=[
            row,
            kvs,
            kvs,
            None if q_seg is None else pl.BlockSpec((None, bq, 1), lambda bb, h, i, j: (bb, i, 0)),
            None
            if kv_seg is None
            else pl.BlockSpec((None, 1, bk), lambda bb, h, i, j: (bb, 0, kv_block(bb, h, i, j))),
            None
            if mask is None
            else _mask_block(spec, bq, bk, lambda bb, h, i, j: h, lambda bb, h, i, j: i, kv_block),
            row,
            stat,
            stat,
        ],
        out_specs=row,
        out_shape=jax.ShapeDtypeStruct(qh.shape, jnp.float32),
        scratch_shapes=[pltpu.VMEM((bq, hp), jnp.float32)],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        name="mmjax_flash_dq_tpu",
    )(qh, kh_, vh, qs3, ks3, mask, doh, lse4, delta4)

    # dK, dV: grid (batch, kv head, k tile, group head, q tile), the last two accumulate
    bq, bk = spec.blocks.block_q_dkv, spec.blocks.block_k_dkv
    nq, nk = t_pad // bq, s_pad // bk

    def q_block(bb, h, j, gg, i):
        if not spec.causal:
            return i
        return jnp.maximum(i, jnp.minimum(_first_q_block(spec, j, bq, bk), nq - 1))

    qrow = pl.BlockSpec(
        (None, None, bq, hp), lambda bb, h, j, gg, i: (bb, h * g + gg, q_block(bb, h, j, gg, i), 0)
    )
    qstat = pl.BlockSpec(
        (None, None, bq, 1), lambda bb, h, j, gg, i: (bb, h * g + gg, q_block(bb, h, j, gg, i), 0)
    )
    kvt = pl.BlockSpec((None, None, bk, hp), lambda bb, h, j, gg, i: (bb, h, j, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, spec=spec, bq=bq, bk=bk, num_q_blocks=nq, group=g),
        grid=(b, kh, nk, g, nq),
        in_specs=[
            qrow,
            kvt,
            kvt,
            None
            if q_seg is None
            else pl.BlockSpec(
                (None, bq, 1), lambda bb, h, j, gg, i: (bb, q_block(bb, h, j, gg, i), 0)
            ),
            None
            if kv_seg is None
            else pl.BlockSpec((None, 1, bk), lambda bb, h, j, gg, i: (bb, 0, j)),
            None
            if mask is None
            else _mask_block(
                spec, bq, bk, lambda bb, h, j, gg, i: h * g + gg, q_block, lambda bb, h, j, gg, i: j
            ),
            qrow,
            qstat,
            qstat,
        ],
        out_specs=[kvt, kvt],
        out_shape=[
            jax.ShapeDtypeStruct(kh_.shape, jnp.float32),
            jax.ShapeDtypeStruct(vh.shape, jnp.float32),
        ],
        scratch_shapes=[pltpu.VMEM((bk, hp), jnp.float32), pltpu.VMEM((bk, hp), jnp.float32)],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
        name="mmjax_flash_dkv_tpu",
    )(qh, kh_, vh, qs3, ks3, mask, doh, lse4, delta4)
    return _heads_major(dq), _heads_major(dk), _heads_major(dv)
