"""I-JEPA's objective, apart from the model (`mmjax.models.ijepa`).

* `ijepa_loss(predictions, targets, kind)`: "smooth_l1" (Huber with beta 1, mean over every
  element: what the reference code trains with, `F.smooth_l1_loss`) or "l2" (mean squared
  error: what the paper writes). Targets are constants of the step (`stop_gradient`).
* `ema_momentum(step, total_steps)`: the target encoder's momentum, 0.996 -> 1.0 linearly over
  training (the reference's schedule with ipe_scale 1).
* `ema_update(target, online, m)`: target * m + online * (1 - m), leaf by leaf (the same update
  as ALBEF/BLIP's momentum encoder, `mmjax.ops.blip_losses.momentum_update`, reused).
* `cosine_weight_decay(step, total_steps)`: the reference's weight-decay schedule, 0.04 -> 0.4 on
  a cosine.
* `variance_covariance_loss(z)`: VICReg's variance and covariance terms (Bardes et al. 2022) over
  a batch of embeddings [B, D], the anti-collapse terms C-JEPA (Mo & Tong 2024) adds to I-JEPA:
  variance = mean over dims of relu(gamma - sqrt(var + eps)) (unbiased var over the batch),
  covariance = sum of the squared off-diagonal covariances / D. Not I-JEPA's own objective: an
  option of the task (`data.variance_weight`, `data.covariance_weight`, 0 = the paper's).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mmjax.errors import ConfigError, InputError
from mmjax.ops.blip_losses import momentum_update as ema_update  # noqa: F401 (re-export)

KINDS = ("smooth_l1", "l2")


def ijepa_loss(predictions: jax.Array, targets: jax.Array, kind: str = "smooth_l1", beta: float = 1.0,
               mask: jax.Array | None = None) -> jax.Array:
    """Mean over every element of smooth-L1 (beta) or squared error; targets get no gradient.
    `mask` (bool, broadcastable to predictions without their last axis, e.g. [T, B, K]) limits
    the mean to valid tokens (padded index lists)."""
    if kind not in KINDS:
        raise ConfigError(f"ijepa_loss kind {kind!r}: known {', '.join(KINDS)}")
    if predictions.shape != targets.shape:
        raise InputError(f"ijepa_loss: predictions {tuple(predictions.shape)} and targets "
                         f"{tuple(targets.shape)} differ in shape")
    diff = predictions.astype(jnp.float32) - jax.lax.stop_gradient(targets.astype(jnp.float32))
    if kind == "l2":
        per = diff ** 2
    else:
        a = jnp.abs(diff)
        per = jnp.where(a < beta, 0.5 * a ** 2 / beta, a - 0.5 * beta)
    if mask is None:
        return jnp.mean(per)
    w = jnp.broadcast_to(mask.astype(jnp.float32)[..., None], per.shape)
    return jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)


def ema_momentum(step: int | jax.Array, total_steps: int, start: float = 0.996, end: float = 1.0) -> jax.Array:
    """Linear from `start` at step 0 to `end` at `total_steps`."""
    if total_steps <= 0:
        raise ConfigError(f"ema_momentum: total_steps must be positive, got {total_steps}")
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)
    return start + (end - start) * frac


def cosine_weight_decay(step: int | jax.Array, total_steps: int, start: float = 0.04, end: float = 0.4) -> jax.Array:
    """start + (end - start) * (1 - cos(pi * t)) / 2, t = step / total_steps."""
    if total_steps <= 0:
        raise ConfigError(f"cosine_weight_decay: total_steps must be positive, got {total_steps}")
    t = jnp.clip(jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)
    return start + (end - start) * 0.5 * (1.0 - jnp.cos(math.pi * t))


def variance_covariance_loss(z: jax.Array, gamma: float = 1.0, eps: float = 1e-4) -> tuple[jax.Array, jax.Array]:
    """(variance, covariance) terms of VICReg over a batch `z` [B, D] (B >= 2); see the module
    docstring."""
    if z.ndim != 2 or z.shape[0] < 2:
        raise InputError(f"variance_covariance_loss needs embeddings [batch >= 2, dim], got shape {tuple(z.shape)}")
    z = z.astype(jnp.float32)
    n, d = z.shape
    zc = z - z.mean(0)
    cov = zc.T @ zc / (n - 1)
    std = jnp.sqrt(jnp.diagonal(cov) + eps)
    variance = jnp.mean(jax.nn.relu(gamma - std))
    off = cov - jnp.diag(jnp.diagonal(cov))
    return variance, jnp.sum(off ** 2) / d
