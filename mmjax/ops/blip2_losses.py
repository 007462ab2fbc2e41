"""BLIP-2 stage-1 objectives that differ from BLIP's (`mmjax.ops.blip_losses` holds the shared
ones: `itm_loss`, `lm_loss`, `sample_hard_negatives`).

  * `max_query_similarity(image_feats, text_feat)`: [B_img, Q, E] x [B_txt, E] -> [B_img, B_txt],
    the best of the Q query outputs' cosines with the text's [CLS] feature (features already L2
    normalised) -- BLIP-2's ITC similarity, also what `mmjax.models.blip2.Blip2.itc` returns.
  * `itc_similarity_loss(sim, temperature)`: symmetric InfoNCE on that matrix: (CE over texts
    for each image + CE over images for each text) / 2, positives on the diagonal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmjax.errors import InputError

_HP = jax.lax.Precision.HIGHEST


def max_query_similarity(image_feats: jax.Array, text_feat: jax.Array) -> jax.Array:
    if image_feats.ndim != 3 or text_feat.ndim != 2 or image_feats.shape[-1] != text_feat.shape[-1]:
        raise InputError(f"max_query_similarity: image_feats must be [B, Q, E] and text_feat [B', E], got "
                         f"{tuple(image_feats.shape)} and {tuple(text_feat.shape)}")
    return jnp.einsum("iqe,te->itq", image_feats.astype(jnp.float32), text_feat.astype(jnp.float32),
                      precision=_HP).max(-1)


def itc_similarity_loss(sim: jax.Array, temperature: jax.Array | float) -> jax.Array:
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise InputError(f"itc_similarity_loss: sim must be [B, B] (row i and column i a pair), got "
                         f"{tuple(sim.shape)}")
    logits = sim.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    idx = jnp.arange(sim.shape[0])
    i2t = -jnp.mean(jax.nn.log_softmax(logits, axis=-1)[idx, idx])
    t2i = -jnp.mean(jax.nn.log_softmax(logits, axis=0)[idx, idx])
    return (i2t + t2i) / 2
