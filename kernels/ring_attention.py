"""Ring attention: exact attention with the sequence sharded over one mesh axis.

    from mmjax.kernels.ring_attention import ring_attention
    out = ring_attention(q, k, v, mesh=mesh, seq_axis="seq", causal=True)
    # or: mmjax.ops.attention(q, k, v, causal=True, implementation="ring", mesh=mesh)

Layout as `mmjax.ops.attention` ([batch, seq, heads, head_dim], GQA by fewer K/V heads). Inside
`jax.shard_map` each of the `n` devices on `seq_axis` keeps its query block; the key/value
blocks travel round the ring with `lax.ppermute` (device d sends to d + 1), one hop per step,
and each step's partial result (out_s, lse_s) is merged into the running one with the
online-softmax rule

    lse = log(exp(lse_a) + exp(lse_b)),   out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b.

The backward pass (`custom_vjp`) saves only the local q, k, v, out and lse, then sends K, V
round the ring again together with their gradient accumulators dK, dV: every device adds the
contribution of its queries (tiles recomputed from the saved lse) and, after a last hop, each
dK/dV block arrives back at its owner. dQ stays local. Memory per device is O(seq / n).

Causal load balancing (`layout="zigzag"`, the default for causal): the sequence is cut into 2n
chunks and device d holds chunks d and 2n-1-d. Then every ring step is exactly half of a full
block's work on every device (all queries x the first key chunk when the keys come from an
earlier device, the second query chunk x all keys when from a later one), so no device idles on
fully masked blocks. With `layout="contiguous"` device d holds chunk d and skips the blocks
from later devices (device 0 idles n-1 steps of n). The zigzag reordering is done inside the
shard_map with two half-size `ppermute`s (and undone on the output); callers that already
feed tokens in zigzag order (see `zigzag_indices`) pass `inputs_in_zigzag_order=True` and get
the output in the same order.

Per-block work: the Pallas flash kernel (`block_impl="flash"`, default on GPU/TPU) or plain XLA
on the [local_q, local_kv] tile (`"xla"`, default on CPU; the flash kernel in interpret mode
also works on CPU, only slower).

Other mesh axes stay as they are: the batch dimension is sharded over `batch_axes` (default:
the mesh's other axes of size > 1 whose product divides the batch, except `head_axes`) and the
heads over `head_axes` (default: "tensor" when it divides the K/V heads).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P
from mmjax.kernels import flash_attention as fa

from mmjax.errors import InputError

LAYOUTS = ("zigzag", "contiguous")
BLOCK_IMPLS = ("flash", "xla")


@dataclasses.dataclass(frozen=True)
class _RingSpec:
    axis: str
    n: int
    causal: bool
    scale: float
    zigzag: bool
    block_impl: str
    block_sizes: fa.BlockSizes | None
    interpret: bool | None


def zigzag_indices(seq_len: int, n: int) -> np.ndarray:
    """Token order of the zigzag layout: position p of the result holds original token idx[p].

    Chunk the sequence into 2n equal chunks; device d's shard is chunks (d, 2n-1-d)."""
    if seq_len % (2 * n):
        raise InputError(
            f"ring attention (zigzag): sequence length {seq_len} is not divisible "
            f"by 2 x ring size = {2 * n}"
        )
    c = seq_len // (2 * n)
    chunks = [np.arange(i * c, (i + 1) * c) for i in range(2 * n)]
    return np.concatenate([np.concatenate([chunks[d], chunks[2 * n - 1 - d]]) for d in range(n)])


# ----------------------------------------------------------------------------------------
# Per-block attention: (out, lse) forward and lse-based backward
# ----------------------------------------------------------------------------------------


def _block_fwd(spec: _RingSpec, q, k, v, q_seg, kv_seg, causal: bool):
    seg = None if q_seg is None else (q_seg, kv_seg)
    if spec.block_impl == "flash":
        return fa.flash_attention_forward(
            q,
            k,
            v,
            causal=causal,
            segment_ids=seg,
            scale=spec.scale,
            block_sizes=spec.block_sizes,
            interpret=spec.interpret,
        )
    out, lse = fa.flash_attention_reference(
        q, k, v, causal=causal, segment_ids=seg, scale=spec.scale, return_lse=True
    )
    return out.astype(jnp.float32), lse


def _block_bwd(spec: _RingSpec, q, k, v, q_seg, kv_seg, out, lse, do, delta, causal: bool):
    seg = None if q_seg is None else (q_seg, kv_seg)
    if spec.block_impl == "flash":
        return fa.flash_attention_backward(
            q,
            k,
            v,
            out,
            lse,
            do,
            causal=causal,
            segment_ids=seg,
            scale=spec.scale,
            delta=delta,
            block_sizes=spec.block_sizes,
            interpret=spec.interpret,
        )
    return fa.reference_backward(
        q, k, v, out, lse, do, causal=causal, segment_ids=seg, scale=spec.scale
    )


def _merge(acc, lse, out_s, lse_s):
    """Online-softmax merge of two partial results over disjoint key sets.

    acc [B, T, N, H] fp32, lse [B, N, T]; rows with lse = -inf (no key yet) take weight 0."""
    new = jnp.maximum(lse, lse_s)
    finite = jnp.isfinite(new)
    base = jnp.where(finite, new, 0.0)
    total = jnp.exp(lse - base) + jnp.exp(lse_s - base)
    new = jnp.where(finite, base + jnp.log(jnp.where(finite, total, 1.0)), -jnp.inf)
    w_a = jnp.where(finite, jnp.exp(lse - jnp.where(finite, new, 0.0)), 0.0)
    w_b = jnp.where(finite, jnp.exp(lse_s - jnp.where(finite, new, 0.0)), 0.0)
    tr = lambda w: jnp.transpose(w, (0, 2, 1))[..., None]  # [B, N, T] -> [B, T, N, 1]
    return acc * tr(w_a) + out_s.astype(jnp.float32) * tr(w_b), new


def _rotate(spec: _RingSpec, tree):
    perm = [(d, (d + 1) % spec.n) for d in range(spec.n)]
    return jax.tree_util.tree_map(lambda x: lax.ppermute(x, spec.axis, perm), tree)


def _halves(x, axis: int = 1):
    c = x.shape[axis] // 2
    return lax.slice_in_dim(x, 0, c, axis=axis), lax.slice_in_dim(x, c, 2 * c, axis=axis)


def _opt_half(x, which: int):
    return None if x is None else _halves(x)[which]


# ----------------------------------------------------------------------------------------
# Forward / backward of the ring on one device (inside shard_map)
# ----------------------------------------------------------------------------------------


def _ring_forward(spec: _RingSpec, q, k, v, q_seg, kv_seg):
    me = lax.axis_index(spec.axis)
    b, t, n_heads, h = q.shape
    # step 0: the local block (for causal: the diagonal block, plain causal in local order)
    out0, lse0 = _block_fwd(spec, q, k, v, q_seg, kv_seg, spec.causal)
    acc, lse = _merge(
        jnp.zeros((b, t, n_heads, h), jnp.float32),
        jnp.full((b, n_heads, t), -jnp.inf, jnp.float32),
        out0,
        lse0,
    )

    def step(s, carry):
        acc, lse, kv = carry
        kv = _rotate(spec, kv)
        k_, v_, kv_seg_ = kv
        src = (me - s) % spec.n  # the device these keys came from

        def full(acc, lse):
            return _merge(acc, lse, *_block_fwd(spec, q, k_, v_, q_seg, kv_seg_, False))

        if not spec.causal:
            acc, lse = full(acc, lse)
        elif not spec.zigzag:  # contiguous: earlier devices fully visible, later ones not at all
            acc, lse = lax.cond(src < me, full, lambda a, l: (a, l), acc, lse)
        else:

            def earlier(acc, lse):  # all queries x the first key chunk
                return _merge(
                    acc,
                    lse,
                    *_block_fwd(
                        spec, q, _halves(k_)[0], _halves(v_)[0], q_seg, _opt_half(kv_seg_, 0), False
                    ),
                )

            def later(acc, lse):  # the second query chunk x all keys
                o_s, l_s = _block_fwd(
                    spec, _halves(q)[1], k_, v_, _opt_half(q_seg, 1), kv_seg_, False
                )
                a1, a2 = _halves(acc)
                l1, l2 = _halves(lse, axis=2)
                a2, l2 = _merge(a2, l2, o_s, l_s)
                return jnp.concatenate([a1, a2], 1), jnp.concatenate([l1, l2], 2)

            acc, lse = lax.cond(src < me, earlier, later, acc, lse)
        return acc, lse, kv

    acc, lse, _ = lax.fori_loop(1, spec.n, step, (acc, lse, (k, v, kv_seg)))
    return acc.astype(q.dtype), lse


def _ring_backward(spec: _RingSpec, q, k, v, q_seg, kv_seg, out, lse, do):
    me = lax.axis_index(spec.axis)
    f32 = jnp.float32
    delta = jnp.einsum("btnh,btnh->bnt", out.astype(f32), do.astype(f32))
    dq, dk, dv = _block_bwd(spec, q, k, v, q_seg, kv_seg, out, lse, do, delta, spec.causal)

    def step(s, carry):
        dq, kv = carry
        kv = _rotate(spec, kv)
        k_, v_, kv_seg_, dk_, dv_ = kv
        src = (me - s) % spec.n

        def full(dq, dk_, dv_):
            gq, gk, gv = _block_bwd(spec, q, k_, v_, q_seg, kv_seg_, out, lse, do, delta, False)
            return dq + gq, dk_ + gk, dv_ + gv

        if not spec.causal:
            dq, dk_, dv_ = full(dq, dk_, dv_)
        elif not spec.zigzag:
            dq, dk_, dv_ = lax.cond(src < me, full, lambda *a: a, dq, dk_, dv_)
        else:

            def earlier(dq, dk_, dv_):  # all queries x first key chunk
                gq, gk, gv = _block_bwd(
                    spec,
                    q,
                    _halves(k_)[0],
                    _halves(v_)[0],
                    q_seg,
                    _opt_half(kv_seg_, 0),
                    out,
                    lse,
                    do,
                    delta,
                    False,
                )
                pad = lambda g, x: jnp.concatenate([_halves(x)[0] + g, _halves(x)[1]], 1)
                return dq + gq, pad(gk, dk_), pad(gv, dv_)

            def later(dq, dk_, dv_):  # second query chunk x all keys
                h = lambda x, axis=1: _halves(x, axis)[1]
                gq, gk, gv = _block_bwd(
                    spec,
                    h(q),
                    k_,
                    v_,
                    _opt_half(q_seg, 1),
                    kv_seg_,
                    h(out),
                    h(lse, 2),
                    h(do),
                    h(delta, 2),
                    False,
                )
                dq = jnp.concatenate([_halves(dq)[0], _halves(dq)[1] + gq], 1)
                return dq, dk_ + gk, dv_ + gv

            dq, dk_, dv_ = lax.cond(src < me, earlier, later, dq, dk_, dv_)
        return dq, (k_, v_, kv_seg_, dk_, dv_)

    dq, (_, _, _, dk, dv) = lax.fori_loop(1, spec.n, step, (dq, (k, v, kv_seg, dk, dv)))
    dk, dv = _rotate(spec, (dk, dv))  # one last hop: each block's gradient reaches its owner
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(spec, q, k, v, q_seg, kv_seg):
    return _ring_forward(spec, q, k, v, q_seg, kv_seg)[0]


def _ring_fwd(spec, q, k, v, q_seg, kv_seg):
    out, lse = _ring_forward(spec, q, k, v, q_seg, kv_seg)
    return out, (q, k, v, q_seg, kv_seg, out, lse)


def _ring_bwd(spec, res, do):
    q, k, v, q_seg, kv_seg, out, lse = res
    dq, dk, dv = _ring_backward(spec, q, k, v, q_seg, kv_seg, out, lse, do)
    return dq, dk, dv, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


# ----------------------------------------------------------------------------------------
# Zigzag reordering inside shard_map: two half-size ppermutes
# ----------------------------------------------------------------------------------------


def _chunk_home(m: int, n: int) -> int:
    """Device that holds chunk m (of 2n) in the zigzag layout."""
    return m if m < n else 2 * n - 1 - m


def _to_zigzag(x, axis_name: str, n: int):
    """Contiguous shard (chunks 2d, 2d+1) -> zigzag shard (chunks d, 2n-1-d), along axis 1."""
    even, odd = _halves(x)
    me = lax.axis_index(axis_name)
    got_even = lax.ppermute(even, axis_name, [(d, _chunk_home(2 * d, n)) for d in range(n)])
    got_odd = lax.ppermute(odd, axis_name, [(d, _chunk_home(2 * d + 1, n)) for d in range(n)])
    # device e receives chunks e and 2n-1-e (one even, one odd); chunk e goes first
    first_is_even = me % 2 == 0
    return jnp.concatenate(
        [jnp.where(first_is_even, got_even, got_odd), jnp.where(first_is_even, got_odd, got_even)],
        1,
    )


def _from_zigzag(x, axis_name: str, n: int):
    """Inverse of `_to_zigzag`."""
    first, second = _halves(x)
    me = lax.axis_index(axis_name)
    first_is_even = me % 2 == 0
    even = jnp.where(first_is_even, first, second)  # the even-numbered chunk this device holds
    odd = jnp.where(first_is_even, second, first)
    back_even = lax.ppermute(even, axis_name, [(_chunk_home(2 * d, n), d) for d in range(n)])
    back_odd = lax.ppermute(odd, axis_name, [(_chunk_home(2 * d + 1, n), d) for d in range(n)])
    return jnp.concatenate([back_even, back_odd], 1)


# ----------------------------------------------------------------------------------------
# Front end
# ----------------------------------------------------------------------------------------


def _default_axes(mesh, seq_axis: str, batch: int, kv_heads: int, batch_axes, head_axes):
    sizes = dict(mesh.shape)
    if head_axes is None:
        head_axes = tuple(
            a
            for a in ("tensor",)
            if a in sizes and a != seq_axis and sizes[a] > 1 and kv_heads % sizes[a] == 0
        )
    if batch_axes is None:
        batch_axes, prod = [], 1
        for a in mesh.axis_names:
            if a == seq_axis or a in head_axes or sizes[a] == 1:
                continue
            if batch % (prod * sizes[a]) == 0:
                batch_axes.append(a)
                prod *= sizes[a]
        batch_axes = tuple(batch_axes)
    return tuple(batch_axes), tuple(head_axes)


def ring_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mesh: jax.sharding.Mesh,
    seq_axis: str = "seq",
    causal: bool = False,
    segment_ids: jax.Array | Sequence[jax.Array] | None = None,
    scale: float | None = None,
    layout: str | None = None,
    inputs_in_zigzag_order: bool = False,
    block_impl: str | None = None,
    block_sizes: fa.BlockSizes | None = None,
    interpret: bool | None = None,
    batch_axes: Sequence[str] | None = None,
    head_axes: Sequence[str] | None = None,
) -> jax.Array:
    """Attention with q, k, v sharded along the sequence over `seq_axis` of `mesh`.

    Args:
      q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim]. Both
        lengths must be divisible by the ring size (by twice it for the zigzag layout).
      causal: causal mask (needs q_len == kv_len).
      segment_ids: [batch, seq] or a (q, kv) pair of packed-document ids; kv ids travel with K/V.
      layout: "zigzag" (default when causal) or "contiguous" (see the module docstring).
      inputs_in_zigzag_order: q, k, v, segment ids are already in `zigzag_indices` order; the
        output is returned in that order (saves the two reordering ppermutes).
      block_impl: "flash" (Pallas kernel; default on GPU/TPU) or "xla" (default on CPU).
      batch_axes, head_axes: mesh axes that shard batch / heads (defaults in module docstring).
    Returns:
      [batch, q_len, heads, head_dim] in the input dtype, sharded like q.
    """
    fa.check_supported(q, k, v)
    if seq_axis not in mesh.axis_names:
        raise InputError(f"ring attention: mesh has no axis {seq_axis!r} (axes: {mesh.axis_names})")
    n = int(mesh.shape[seq_axis])
    b, t, _, h = q.shape
    s = k.shape[1]
    layout = layout or ("zigzag" if causal else "contiguous")
    if layout not in LAYOUTS:
        raise InputError(f"ring attention: unknown layout {layout!r}; choose one of {LAYOUTS}")
    zigzag = causal and layout == "zigzag" and n > 1
    if causal and t != s:
        raise InputError(f"ring attention: causal needs q_len == kv_len, got {t} and {s}")
    for name, length in (("query", t), ("key/value", s)):
        if length % n:
            raise InputError(
                f"ring attention: {name} sequence length {length} is not divisible by "
                f"the ring size {n} (mesh axis {seq_axis!r})"
            )
        if zigzag and length % (2 * n):
            raise InputError(
                f"ring attention (zigzag layout): {name} sequence length {length} is "
                f"not divisible by 2 x ring size = {2 * n}"
            )
    block_impl = block_impl or ("xla" if jax.default_backend() == "cpu" else "flash")
    if block_impl not in BLOCK_IMPLS:
        raise InputError(
            f"ring attention: unknown block_impl {block_impl!r}; choose one of {BLOCK_IMPLS}"
        )
    q_seg, kv_seg = fa._split_segments(segment_ids)
    if q_seg is not None:
        if q_seg.shape != (b, t) or kv_seg.shape != (b, s):
            raise InputError(
                f"ring attention: segment_ids must be [batch, q_len] / [batch, kv_len] "
                f"= {(b, t)} / {(b, s)}, got {q_seg.shape} / {kv_seg.shape}"
            )
        q_seg, kv_seg = q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)
    spec = _RingSpec(
        axis=seq_axis,
        n=n,
        causal=bool(causal),
        scale=1.0 / math.sqrt(h) if scale is None else float(scale),
        zigzag=zigzag,
        block_impl=block_impl,
        block_sizes=block_sizes,
        interpret=interpret,
    )
    bax, hax = _default_axes(mesh, seq_axis, b, k.shape[2], batch_axes, head_axes)
    bspec = bax if bax else None
    hspec = hax if hax else None
    x_spec = P(bspec, seq_axis, hspec, None)
    seg_spec = P(bspec, seq_axis)
    reorder = zigzag and not inputs_in_zigzag_order

    def local(q, k, v, q_seg, kv_seg):
        if reorder:
            zz = functools.partial(_to_zigzag, axis_name=seq_axis, n=n)
            q, k, v = zz(q), zz(k), zz(v)
            q_seg = None if q_seg is None else zz(q_seg)
            kv_seg = None if kv_seg is None else zz(kv_seg)
        out = _ring(spec, q, k, v, q_seg, kv_seg)
        return _from_zigzag(out, seq_axis, n) if reorder else out

    seg_specs = (None, None) if q_seg is None else (seg_spec, seg_spec)
    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(x_spec, x_spec, x_spec) + seg_specs,
        out_specs=x_spec,
        check_vma=False,
    )
    return fn(q, k, v, q_seg, kv_seg)
