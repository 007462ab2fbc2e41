"""AIM's objective, apart from the model (`mmjax.models.aim`).

* `normalize_patches(patches, eps)`: per-patch normalised pixels, MAE's targets (AIM: "normalized
  pixel targets as in MAE"): each patch minus its mean, divided by sqrt(var + eps), eps 1e-6,
  var the *unbiased* variance over the patch's pixels (MAE's `target.var(dim=-1)`, torch's
  default correction 1). A constant patch (empty background) becomes all zeros.
* `aim_targets(images, patch_hw)`: `patchify` (row-major patches, (row, column, channel)
  pixels: the layout the model's head predicts) then `normalize_patches`.
* `prefix_loss_mask(prefix_len, num_patches)`: [B, N-1] bool, True where the target patch
  j + 1 (predicted at position j) lies after the prefix: j + 1 >= K.
* `aim_loss(predictions, targets, prefix_len, kind)`: position i predicts patch i + 1; mean over
  the non-prefix target patches (and their pixels) of the squared error ("l2", the paper's MSE)
  or the absolute error ("l1"). Prefix patches are never targets: their outputs saw them
  (bidirectional prefix). Targets get no gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmjax.errors import ConfigError, InputError

KINDS = ("l2", "l1")
NORM_PIX_EPS = 1e-6  # MAE's (`norm_pix_loss`)


def normalize_patches(patches: jax.Array, eps: float = NORM_PIX_EPS) -> jax.Array:
    """[..., P] -> [..., P]: (x - mean) / sqrt(unbiased var + eps) over the last axis."""
    x = patches.astype(jnp.float32)
    p = x.shape[-1]
    if p < 2:
        raise InputError(f"normalize_patches: a patch needs at least 2 pixels to normalise, got {p}")
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.sum((x - mean) ** 2, axis=-1, keepdims=True) / (p - 1)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def aim_targets(images: jax.Array, patch_hw: tuple[int, int], eps: float = NORM_PIX_EPS,
                normalize: bool = True) -> jax.Array:
    """[B, H, W, C] -> [B, N, ph*pw*C] pixel targets of every patch (normalised per patch unless
    `normalize=False`), in `mmjax.models.vit.patchify`'s layout."""
    patches = patchify(images, patch_hw)
    return normalize_patches(patches, eps) if normalize else patches.astype(jnp.float32)


def patchify(images: jax.Array, patch_hw: tuple[int, int]) -> jax.Array:
    """[B, H, W, C] -> [B, N, ph*pw*C], the layout of `mmjax.models.vit.patchify` (ops cannot
    import models; tested equal), with an error naming the patch size when it does not divide."""
    b, h, w, c = images.shape
    ph, pw = patch_hw
    if h % ph or w % pw:
        raise InputError(f"aim_targets: images {h}x{w} are not divisible by patch_size {ph}x{pw}")
    x = images.reshape(b, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // ph) * (w // pw), ph * pw * c)


def prefix_loss_mask(prefix_len: jax.Array, num_patches: int) -> jax.Array:
    """[B, N-1] bool: True at prediction position j when its target patch j + 1 is not in the
    prefix (j + 1 >= prefix_len[b])."""
    j = jnp.arange(1, num_patches)[None, :]
    return j >= jnp.asarray(prefix_len).reshape(-1, 1)


def aim_loss(predictions: jax.Array, targets: jax.Array, prefix_len: jax.Array, kind: str = "l2"
             ) -> jax.Array:
    """predictions, targets [B, N, P]; prefix_len [B]. Mean error over the non-prefix patches."""
    if kind not in KINDS:
        raise ConfigError(f"aim_loss kind {kind!r}: known {', '.join(KINDS)}")
    if predictions.shape != targets.shape or predictions.ndim != 3:
        raise InputError(f"aim_loss: predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} "
                         "must both be [batch, patches, pixels]")
    b, n, _ = predictions.shape
    if tuple(jnp.shape(prefix_len)) != (b,):
        raise InputError(f"aim_loss: prefix_len must be [batch={b}], got shape {tuple(jnp.shape(prefix_len))}")
    diff = predictions[:, :-1].astype(jnp.float32) - jax.lax.stop_gradient(targets[:, 1:].astype(jnp.float32))
    per = jnp.mean(diff ** 2 if kind == "l2" else jnp.abs(diff), axis=-1)  # [B, N-1]
    w = prefix_loss_mask(prefix_len, n).astype(jnp.float32)
    return jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)
