"""BLIP's pretraining objectives as pure functions of model outputs (no parameters, no model code).

  * `itc_loss(image_feat, text_feat, temperature)`: image-text contrastive loss, CLIP's symmetric
    InfoNCE (`mmjax.ops.losses.clip_loss`) on the cosines divided by `temperature`.
  * `itc_queue_loss(image_feat, text_feat, image_queue, text_queue, temperature, ...)`: the same
    with older (momentum-encoder) features as extra negatives: image i is scored against the
    batch's texts and the queued texts [B + Q], and the other way round; the targets are the
    one-hot positives, or soft targets from `momentum_targets` (momentum distillation).
  * `momentum_targets(...)`: BLIP's soft ITC targets alpha * softmax(momentum sims / temperature)
    + (1 - alpha) * one-hot.
  * `itc_momentum_loss(image_feat, text_feat, m_image_feat, m_text_feat, image_queue,
    text_queue, temperature, alpha, ...)`: ALBEF/BLIP's ITC with momentum distillation: online
    image features against the momentum encoder's texts of the batch + the text queue (and
    online texts against momentum images + the image queue), soft targets from
    `momentum_targets`.
  * `class_targets(batch_class, queue_class)`: the idx-aware hard targets of BLIP's retrieval
    fine-tune: every column of the same class (>= 0) is a positive, rows normalised.
  * `momentum_update(ema, online, m)`: ema <- m * ema + (1 - m) * online over any pytree.
  * `queue_push(queue, feats, ptr)`: a FIFO feature queue [Q, dim] as a ring buffer: the rows
    ptr .. ptr + B (mod Q) are overwritten; returns (queue, new ptr).
  * `sample_hard_negatives(rng, sim, temperature, exclude)`: for each image a negative text drawn
    with probability proportional to softmax(sim[i] / temperature) over the texts not excluded
    (the positive always is), and for each text a negative image the same way (columns).
  * `itm_loss(logits, labels)`: the 2-way image-text matching cross-entropy (label 1 = match).
  * `lm_loss(logits, tokens, mask, label_smoothing)`: captioning cross-entropy, logits at t
    predicting token t + 1, padding (mask 0) ignored, optional label smoothing (the target
    distribution (1 - eps) one-hot + eps / vocab, torch's convention; BLIP trains with 0.1).

Conventions: features are [batch, dim] and L2-normalised (what `Blip.itc` returns); row i of
the images matches row i of the texts; `temperature` divides the cosines (BLIP learns it, from
0.07, clipped to [0.001, 0.5]); all math is float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mmjax.errors import InputError
from mmjax.ops.losses import clip_loss

_HP = jax.lax.Precision.HIGHEST


def _check_feats(image_feat, text_feat, who: str) -> None:
    if image_feat.ndim != 2 or text_feat.ndim != 2 or image_feat.shape != text_feat.shape:
        raise InputError(f"{who}: image {tuple(image_feat.shape)} and text {tuple(text_feat.shape)} "
                         "features must both be [batch, dim] (row i of each is a matching pair)")


def itc_loss(image_feat: jax.Array, text_feat: jax.Array, temperature: jax.Array | float) -> jax.Array:
    """Symmetric InfoNCE over the batch: (CE(img->txt) + CE(txt->img)) / 2 on cos / temperature."""
    _check_feats(image_feat, text_feat, "itc_loss")
    return clip_loss(image_feat, text_feat, 1.0 / jnp.asarray(temperature, jnp.float32))


def _soft_ce(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over rows of -sum_j targets[i, j] log softmax(logits[i])_j."""
    return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1))


def _one_hot_targets(batch: int, width: int) -> jax.Array:
    return jax.nn.one_hot(jnp.arange(batch), width, dtype=jnp.float32)


def momentum_targets(m_image_feat: jax.Array, m_text_feat: jax.Array, image_queue: jax.Array,
                     text_queue: jax.Array, temperature: jax.Array | float, alpha: float,
                     hard: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Soft ITC targets from the momentum encoder's features: (i2t [B, B + Q], t2i [B, B + Q]),
    alpha * softmax(m_sim / temperature) + (1 - alpha) * hard, hard = one-hot on the diagonal
    of the first B columns (or the given [B, B + Q] rows, e.g. `class_targets`; the same for
    both directions). Gradients are stopped."""
    _check_feats(m_image_feat, m_text_feat, "momentum_targets")
    img, txt = m_image_feat.astype(jnp.float32), m_text_feat.astype(jnp.float32)
    t = jax.lax.stop_gradient(jnp.asarray(temperature, jnp.float32))
    all_txt = jnp.concatenate([txt, text_queue.astype(jnp.float32)])
    all_img = jnp.concatenate([img, image_queue.astype(jnp.float32)])
    if hard is None:
        hard = _one_hot_targets(img.shape[0], all_txt.shape[0])
    elif hard.shape != (img.shape[0], all_txt.shape[0]):
        raise InputError(f"momentum_targets: hard targets {tuple(hard.shape)} must be [B, B + Q] = "
                         f"{(img.shape[0], all_txt.shape[0])}")
    i2t = jax.nn.softmax(jnp.einsum("id,jd->ij", img, all_txt, precision=_HP) / t, axis=-1)
    t2i = jax.nn.softmax(jnp.einsum("id,jd->ij", txt, all_img, precision=_HP) / t, axis=-1)
    soft = lambda p: jax.lax.stop_gradient(alpha * p + (1.0 - alpha) * hard)  # noqa: E731
    return soft(i2t), soft(t2i)


def class_targets(batch_class: jax.Array, queue_class: jax.Array) -> jax.Array:
    """[B, B + Q] hard ITC targets: row i spreads 1 evenly over the columns (batch, then queue)
    whose class equals batch_class[i] (>= 0; class -1 = unknown matches nothing); its own
    column i is always a positive (BLIP's idx-aware `sim_targets = pos_idx / pos_idx.sum(1)`)."""
    b = batch_class.shape[0]
    cols = jnp.concatenate([batch_class, queue_class]).astype(jnp.int32)
    pos = (batch_class.astype(jnp.int32)[:, None] == cols[None, :]) & (batch_class[:, None] >= 0)
    pos = pos | (jnp.arange(cols.shape[0])[None, :] == jnp.arange(b)[:, None])
    pos = pos.astype(jnp.float32)
    return pos / jnp.sum(pos, axis=-1, keepdims=True)


def itc_momentum_loss(image_feat: jax.Array, text_feat: jax.Array, m_image_feat: jax.Array,
                      m_text_feat: jax.Array, image_queue: jax.Array, text_queue: jax.Array,
                      temperature: jax.Array | float, alpha: float,
                      hard: jax.Array | None = None) -> jax.Array:
    """ITC with momentum distillation (ALBEF, BLIP): logits_i2t = image_feat @ [m_text_feat;
    text_queue].T / temperature, logits_t2i = text_feat @ [m_image_feat; image_queue].T /
    temperature, each against `momentum_targets(..., alpha, hard)`; (CE_i2t + CE_t2i) / 2. The
    momentum features and queues are constants (gradients stopped); the gradient reaches the
    online features and the temperature. Queues may be empty ([0, dim]: batch only)."""
    _check_feats(image_feat, text_feat, "itc_momentum_loss")
    _check_feats(m_image_feat, m_text_feat, "itc_momentum_loss (momentum features)")
    if (image_queue.ndim != 2 or image_queue.shape != text_queue.shape
            or image_queue.shape[1] != image_feat.shape[1] or m_image_feat.shape != image_feat.shape):
        raise InputError(f"itc_momentum_loss: queues image {tuple(image_queue.shape)} / text "
                         f"{tuple(text_queue.shape)} must both be [Q, {image_feat.shape[1]}] and the "
                         f"momentum features {tuple(m_image_feat.shape)} like the online ones "
                         f"{tuple(image_feat.shape)}")
    sg = lambda x: jax.lax.stop_gradient(x.astype(jnp.float32))  # noqa: E731
    m_img, m_txt, iq, tq = sg(m_image_feat), sg(m_text_feat), sg(image_queue), sg(text_queue)
    targets = momentum_targets(m_img, m_txt, iq, tq, temperature, alpha, hard)
    t = jnp.asarray(temperature, jnp.float32)
    img, txt = image_feat.astype(jnp.float32), text_feat.astype(jnp.float32)
    logits_i2t = jnp.einsum("id,jd->ij", img, jnp.concatenate([m_txt, tq]), precision=_HP) / t
    logits_t2i = jnp.einsum("id,jd->ij", txt, jnp.concatenate([m_img, iq]), precision=_HP) / t
    return 0.5 * (_soft_ce(logits_i2t, targets[0]) + _soft_ce(logits_t2i, targets[1]))


def itc_queue_loss(image_feat: jax.Array, text_feat: jax.Array, image_queue: jax.Array,
                   text_queue: jax.Array, temperature: jax.Array | float, *,
                   targets: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """ITC with queued negatives: image i against [batch texts; text_queue] [B + Q] and text i
    against [batch images; image_queue]; targets None = one-hot on the diagonal, else
    (i2t, t2i) soft targets [B, B + Q] (`momentum_targets`). The queues are constants
    (gradients stopped). Returns (CE_i2t + CE_t2i) / 2."""
    _check_feats(image_feat, text_feat, "itc_queue_loss")
    if image_queue.ndim != 2 or image_queue.shape != text_queue.shape or image_queue.shape[1] != image_feat.shape[1]:
        raise InputError(f"itc_queue_loss: queues image {tuple(image_queue.shape)} / text "
                         f"{tuple(text_queue.shape)} must both be [Q, {image_feat.shape[1]}]")
    img, txt = image_feat.astype(jnp.float32), text_feat.astype(jnp.float32)
    t = jnp.asarray(temperature, jnp.float32)
    all_txt = jnp.concatenate([txt, jax.lax.stop_gradient(text_queue.astype(jnp.float32))])
    all_img = jnp.concatenate([img, jax.lax.stop_gradient(image_queue.astype(jnp.float32))])
    logits_i2t = jnp.einsum("id,jd->ij", img, all_txt, precision=_HP) / t
    logits_t2i = jnp.einsum("id,jd->ij", txt, all_img, precision=_HP) / t
    if targets is None:
        hard = _one_hot_targets(img.shape[0], all_txt.shape[0])
        targets = (hard, hard)
    for tgt in targets:
        if tgt.shape != logits_i2t.shape:
            raise InputError(f"itc_queue_loss: targets {tuple(tgt.shape)} must be [B, B + Q] = "
                             f"{tuple(logits_i2t.shape)}")
    return 0.5 * (_soft_ce(logits_i2t, targets[0]) + _soft_ce(logits_t2i, targets[1]))


def momentum_update(ema: Any, online: Any, m: float | jax.Array) -> Any:
    """ema * m + online * (1 - m), leaf by leaf (the momentum encoder's update, m ~ 0.995)."""
    return jax.tree_util.tree_map(lambda e, o: m * e + (1.0 - m) * o, ema, online)


def queue_push(queue: jax.Array, feats: jax.Array, ptr: jax.Array | int) -> tuple[jax.Array, jax.Array]:
    """Write feats [B, dim] into the ring buffer queue [Q, dim] at rows ptr, ptr+1, ... (mod Q);
    returns (new queue, (ptr + B) mod Q). B <= Q."""
    if feats.ndim != 2 or queue.ndim != 2 or feats.shape[1] != queue.shape[1]:
        raise InputError(f"queue_push: feats {tuple(feats.shape)} and queue {tuple(queue.shape)} must "
                         "be [B, dim] and [Q, dim]")
    size, batch = queue.shape[0], feats.shape[0]
    if batch > size:
        raise InputError(f"queue_push: {batch} rows do not fit a queue of {size}")
    rows = (jnp.asarray(ptr, jnp.int32) + jnp.arange(batch)) % size
    new = queue.at[rows].set(jax.lax.stop_gradient(feats).astype(queue.dtype))
    return new, (jnp.asarray(ptr, jnp.int32) + batch) % size


def sample_hard_negatives(rng: jax.Array, sim: jax.Array, temperature: jax.Array | float = 1.0,
                          exclude: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(negative text index per image [B], negative image index per text [B]).

    sim [B, B]: image i x text j similarities (e.g. ITC cosines). Image i draws text j with
    probability ∝ exp(sim[i, j] / temperature) over j not excluded; text j draws image i with
    probability ∝ exp(sim[i, j] / temperature) over i not excluded. exclude [B, B] bool marks
    pairs that are not negatives (other correct descriptions); the diagonal is always excluded.
    A row whose every candidate is excluded falls back to a uniform draw over the others (the
    positive is still never drawn). No gradient flows through the draw.
    """
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] < 2:
        raise InputError(f"sample_hard_negatives: sim must be [B, B] with B >= 2, got {tuple(sim.shape)}")
    b = sim.shape[0]
    diag = jnp.eye(b, dtype=bool)
    banned = diag if exclude is None else (diag | exclude.astype(bool))
    logits = jax.lax.stop_gradient(sim.astype(jnp.float32)) / jnp.asarray(temperature, jnp.float32)

    def draw(key, lg, ban):  # rows of lg are queries, columns candidates
        stuck = jnp.all(ban, axis=-1, keepdims=True)
        lg = jnp.where(stuck, 0.0, lg)
        ban = jnp.where(stuck, diag, ban)
        return jax.random.categorical(key, jnp.where(ban, -jnp.inf, lg), axis=-1)

    k1, k2 = jax.random.split(rng)
    return draw(k1, logits, banned), draw(k2, logits.T, banned.T)


def itm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean 2-way cross-entropy of ITM logits [N, 2] against labels [N] (1 = match, 0 = not)."""
    if logits.ndim != 2 or logits.shape[-1] != 2 or labels.shape != logits.shape[:1]:
        raise InputError(f"itm_loss: logits must be [N, 2] and labels [N], got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels.astype(jnp.int32)[:, None], axis=-1))


def lm_loss(logits: jax.Array, tokens: jax.Array, mask: jax.Array | None = None,
            label_smoothing: float = 0.0, *, return_sums: bool = False):
    """Captioning cross-entropy: logits [B, T, vocab] at position t predict tokens[:, t + 1];
    mask [B, T] (1 = real token; None = all) -- a target counts where its own mask is set, so
    padding is ignored and the first token (the [DEC] prompt) is never a target. Label
    smoothing eps: target = (1 - eps) one-hot + eps / vocab. Returns the mean over counted
    targets, or (sum, count) with `return_sums`."""
    if logits.ndim != 3 or tokens.shape != logits.shape[:2]:
        raise InputError(f"lm_loss: logits {tuple(logits.shape)} must be [B, T, vocab] and tokens "
                         f"{tuple(tokens.shape)} [B, T]")
    if not 0.0 <= label_smoothing < 1.0:
        raise InputError(f"lm_loss: label_smoothing must be in [0, 1), got {label_smoothing}")
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    targets = tokens[:, 1:].astype(jnp.int32)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)
    weights = jnp.ones_like(nll) if mask is None else mask[:, 1:].astype(jnp.float32)
    total, count = jnp.sum(nll * weights), jnp.sum(weights)
    if return_sums:
        return total, count
    return total / jnp.maximum(count, 1.0)
