"""Losses as pure functions of model outputs (no parameters, no model code).

  * `token_cross_entropy(logits, targets, mask)`: mean softmax cross-entropy over the positions
    where mask is set (language modelling, classification).
  * `clip_loss(image_emb, text_emb, logit_scale)`: CLIP's symmetric contrastive loss (ITC): the
    cross-entropy of image->text and text->image logits against the diagonal `arange(n)`,
    averaged.
  * `siglip_loss(image_emb, text_emb, logit_scale, logit_bias)`: SigLIP's pairwise sigmoid loss,
    -sum_ij log sigmoid(z_ij * (scale * <img_i, txt_j> + bias)) / n with z = +1 on the diagonal
    and -1 elsewhere.

Conventions: embeddings are [batch, dim] and already L2-normalised (the models return them so);
`logit_scale` is the multiplier exp(t) (what `CLIP` / `SigLIP` return as `out["logit_scale"]`),
not the parameter t; row i of the images matches row i of the texts. All math is float32.

Data parallelism: with the batch sharded over a mesh axis, a contrastive loss needs every
device's features. Inside `jax.shard_map` pass `axis_name=` (one mesh axis or a tuple): each
device all-gathers both embeddings, scores its local rows against the global columns, and the
per-device sums are `psum`med, so the value (and, through all_gather's transpose, the gradient)
equals the single-device loss on the whole batch. `sharded_loss(loss_fn, mesh)` wraps a loss in
that shard_map for arrays sharded along their first axis. Under plain `jax.jit` with sharded
inputs the functions without `axis_name` are also exact (XLA inserts the collectives).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mmjax.errors import InputError

AxisName = str | Sequence[str] | None


def token_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None,
                        *, return_sums: bool = False):
    """Softmax cross-entropy of `logits` [..., vocab] against int `targets` [...].

    mask [...] (bool or 0/1 weights) selects the positions that count (None: all). Returns the
    mean over counted positions (0 when none count), or (sum, count) with `return_sums`, for
    accumulating over micro-batches or devices.
    """
    if targets.shape != logits.shape[:-1]:
        raise InputError(f"token_cross_entropy: targets {tuple(targets.shape)} must match logits "
                         f"{tuple(logits.shape)} without the last axis")
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    weights = jnp.ones_like(nll) if mask is None else mask.astype(jnp.float32)
    if weights.shape != nll.shape:
        raise InputError(f"token_cross_entropy: mask {tuple(weights.shape)} must match targets "
                         f"{tuple(nll.shape)}")
    total, count = jnp.sum(nll * weights), jnp.sum(weights)
    if return_sums:
        return total, count
    return total / jnp.maximum(count, 1.0)


def _check_pair(image_emb, text_emb, who: str) -> None:
    if image_emb.ndim != 2 or text_emb.ndim != 2:
        raise InputError(f"{who}: embeddings must be [batch, dim], got image {tuple(image_emb.shape)} "
                         f"and text {tuple(text_emb.shape)}")
    if image_emb.shape != text_emb.shape:
        raise InputError(f"{who}: image {tuple(image_emb.shape)} and text {tuple(text_emb.shape)} "
                         "embeddings must have the same shape (row i of each is a matching pair)")


def _gather(x: jax.Array, axis_name: AxisName) -> tuple[jax.Array, jax.Array]:
    """(x of every device along axis_name concatenated on axis 0, global row index of local
    row 0); without an axis name (x, 0)."""
    if axis_name is None:
        return x, jnp.zeros((), jnp.int32)
    gathered = jax.lax.all_gather(x, axis_name, tiled=True)
    return gathered, jax.lax.axis_index(axis_name) * x.shape[0]


def _psum(x: jax.Array, axis_name: AxisName) -> jax.Array:
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def clip_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array | float, *,
              axis_name: AxisName = None) -> jax.Array:
    """CLIP's symmetric contrastive loss: (CE(img->txt) + CE(txt->img)) / 2 against arange(n).

    image_emb, text_emb: [batch, dim] normalised (local rows when `axis_name` is given);
    logit_scale: the multiplier exp(t), a scalar. Returns a float32 scalar (the global mean).
    """
    _check_pair(image_emb, text_emb, "clip_loss")
    img = image_emb.astype(jnp.float32)
    txt = text_emb.astype(jnp.float32)
    scale = jnp.asarray(logit_scale, jnp.float32)
    img_all, offset = _gather(img, axis_name)
    txt_all, _ = _gather(txt, axis_name)
    labels = offset + jnp.arange(img.shape[0])
    hp = jax.lax.Precision.HIGHEST

    def ce_sum(rows, cols):  # rows [n_local, d] against every column [N, d]
        logits = scale * jnp.einsum("id,jd->ij", rows, cols, precision=hp)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.sum(jnp.take_along_axis(logp, labels[:, None], axis=-1))

    total = _psum(ce_sum(img, txt_all) + ce_sum(txt, img_all), axis_name)
    return total / (2.0 * img_all.shape[0])


def siglip_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array | float,
                logit_bias: jax.Array | float, *, axis_name: AxisName = None) -> jax.Array:
    """SigLIP's sigmoid loss: -sum_ij log sigmoid(z_ij (scale <img_i, txt_j> + bias)) / n, with
    z_ij = 1 for i == j and -1 otherwise (every pair is an independent binary problem).

    image_emb, text_emb: [batch, dim] normalised (local rows when `axis_name` is given);
    logit_scale: the multiplier exp(t'); logit_bias: b. Returns a float32 scalar; it equals
    Hugging Face `SiglipModel(return_loss=True)`'s loss on the same logits.
    """
    _check_pair(image_emb, text_emb, "siglip_loss")
    img = image_emb.astype(jnp.float32)
    txt = text_emb.astype(jnp.float32)
    txt_all, offset = _gather(txt, axis_name)
    logits = (jnp.asarray(logit_scale, jnp.float32)
              * jnp.einsum("id,jd->ij", img, txt_all, precision=jax.lax.Precision.HIGHEST)
              + jnp.asarray(logit_bias, jnp.float32))
    rows = offset + jnp.arange(img.shape[0])
    z = jnp.where(rows[:, None] == jnp.arange(txt_all.shape[0])[None, :], 1.0, -1.0)
    total = _psum(-jnp.sum(jax.nn.log_sigmoid(z * logits)), axis_name)
    return total / txt_all.shape[0]


def sharded_loss(loss_fn: Callable[..., jax.Array], mesh: jax.sharding.Mesh,
                 axis: str | tuple[str, ...] = "data", num_sharded: int = 2) -> Callable[..., jax.Array]:
    """`loss_fn` (one of the losses above) run under `jax.shard_map` over `axis` of `mesh`.

    The returned function takes the same positional arguments as `loss_fn`: the first
    `num_sharded` (the embeddings, [batch, dim]) are split along the batch over `axis`, the rest
    (scale, bias) are replicated; it returns the replicated scalar loss. Differentiable.
    """
    def local(*args):
        return loss_fn(*args, axis_name=axis)

    def wrapped(*args: Any) -> jax.Array:
        n = len(args)
        if n < num_sharded:
            raise InputError(f"sharded_loss: expected at least {num_sharded} arguments, got {n}")
        size = _axis_size(mesh, axis)
        batch = args[0].shape[0]
        if batch % size:
            raise InputError(f"sharded_loss: batch {batch} is not divisible by the {size} devices of "
                             f"mesh axis {axis!r}")
        specs = (P(axis),) * num_sharded + (P(),) * (n - num_sharded)
        return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())(*args)

    return wrapped


def _axis_size(mesh: jax.sharding.Mesh, axis: str | tuple[str, ...]) -> int:
    names = (axis,) if isinstance(axis, str) else tuple(axis)
    size = 1
    for name in names:
        if name not in mesh.shape:
            raise InputError(f"sharded_loss: mesh has no axis {name!r}; its axes are {tuple(mesh.shape)}")
        size *= mesh.shape[name]
    return size
