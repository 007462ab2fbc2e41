"""AIM's objective (`mmjax.ops.aim_losses`): MAE's per-patch normalisation and the patch layout
against numpy, the loss against numpy, prefix patches ignored (value and gradient), errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import ConfigError, InputError
from mmjax.models.vit import patchify as vit_patchify
from mmjax.ops.aim_losses import aim_loss, aim_targets, normalize_patches, patchify, prefix_loss_mask


def test_normalisation_and_layout_against_numpy():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 8, 12, 3)).astype(np.float32)
    images[0, :4, :4] = 0.25  # one constant patch
    np.testing.assert_array_equal(patchify(jnp.asarray(images), (4, 4)), vit_patchify(jnp.asarray(images), (4, 4)))
    want = np.zeros((2, 6, 48))
    for b in range(2):
        for r in range(2):
            for c in range(3):
                p = images[b, 4 * r:4 * r + 4, 4 * c:4 * c + 4].reshape(-1).astype(np.float64)
                want[b, 3 * r + c] = (p - p.mean()) / np.sqrt(p.var(ddof=1) + 1e-6)  # MAE: unbiased var
    got = aim_targets(jnp.asarray(images), (4, 4))
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_array_equal(got[0, 0], 0.0)  # a constant patch normalises to zeros
    raw = aim_targets(jnp.asarray(images), (4, 4), normalize=False)
    np.testing.assert_allclose(normalize_patches(raw), got, atol=1e-6)
    with pytest.raises(InputError, match="not divisible by patch_size 5x5"):
        aim_targets(jnp.asarray(images), (5, 5))


def test_loss_against_numpy_and_prefix_patches_are_ignored():
    rng = np.random.default_rng(1)
    pred = rng.normal(size=(3, 6, 4)).astype(np.float32)
    tgt = rng.normal(size=(3, 6, 4)).astype(np.float32)
    k = np.array([1, 3, 5], np.int32)
    err = ((pred[:, :-1] - tgt[:, 1:]) ** 2).mean(-1)  # position j predicts patch j + 1
    w = (np.arange(1, 6)[None] >= k[:, None]).astype(np.float64)
    np.testing.assert_array_equal(prefix_loss_mask(jnp.asarray(k), 6), w.astype(bool))
    np.testing.assert_allclose(aim_loss(jnp.asarray(pred), jnp.asarray(tgt), jnp.asarray(k)),
                               (err * w).sum() / w.sum(), rtol=1e-6)
    l1 = np.abs(pred[:, :-1] - tgt[:, 1:]).mean(-1)
    np.testing.assert_allclose(aim_loss(jnp.asarray(pred), jnp.asarray(tgt), jnp.asarray(k), "l1"),
                               (l1 * w).sum() / w.sum(), rtol=1e-6)
    # changing the predictions of prefix patches (and the last position, which predicts nothing)
    # or the prefix targets changes nothing; their gradient is zero
    pred2, tgt2 = pred.copy(), tgt.copy()
    pred2[1, :2] += 9.0
    pred2[:, -1] += 9.0
    tgt2[2, :5] -= 9.0
    loss = lambda p, t: aim_loss(jnp.asarray(p), jnp.asarray(t), jnp.asarray(k))  # noqa: E731
    np.testing.assert_allclose(loss(pred2, tgt2), loss(pred, tgt), rtol=1e-6)
    g = np.asarray(jax.grad(lambda p: aim_loss(p, jnp.asarray(tgt), jnp.asarray(k)))(jnp.asarray(pred)))
    assert np.all(g[1, :2] == 0) and np.all(g[2, :4] == 0) and np.all(g[:, -1] == 0)
    assert np.all(np.abs(g[1, 2:5]).sum(-1) > 0)
    gt = jax.grad(lambda t: aim_loss(jnp.asarray(pred), t, jnp.asarray(k)))(jnp.asarray(tgt))
    assert float(jnp.abs(gt).max()) == 0.0  # targets are constants


def test_loss_errors():
    z = jnp.zeros((2, 4, 3))
    with pytest.raises(ConfigError, match="kind"):
        aim_loss(z, z, jnp.ones(2, jnp.int32), "mse")
    with pytest.raises(InputError, match="must both be"):
        aim_loss(z, jnp.zeros((2, 4, 2)), jnp.ones(2, jnp.int32))
    with pytest.raises(InputError, match=r"prefix_len must be \[batch=2\]"):
        aim_loss(z, z, jnp.ones(3, jnp.int32))
