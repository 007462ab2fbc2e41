"""I-JEPA model and objective (`mmjax.models.ijepa`, `mmjax.ops.jepa_losses`): the context encoder
sees only its patches (in their places), the predictor's output per target block, layer-normed
gathered targets, the losses and schedules against numpy, and clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.data.multiblock import MultiBlockConfig, sample_multiblock
from mmjax.errors import ConfigError, InputError
from mmjax.models.ijepa import IJepa, IJepaConfig
from mmjax.models.vit import ViTConfig
from mmjax.ops.jepa_losses import (cosine_weight_decay, ema_momentum, ema_update, ijepa_loss,
                                   variance_covariance_loss)

CFG = IJepaConfig.from_variant("tiny")  # 32 px / patch 4: an 8 x 8 grid


@pytest.fixture(scope="module")
def setup():
    model = IJepa(CFG)
    images = jax.random.normal(jax.random.PRNGKey(0), (3, 32, 32, 3))
    ctx, tgt = sample_multiblock(MultiBlockConfig(grid=(8, 8), min_keep=4), 3, np.random.default_rng(0))
    ctx, tgt = jnp.asarray(ctx[0]), jnp.asarray(tgt)
    params = model.init(jax.random.PRNGKey(1), images, ctx, tgt)["params"]
    params = jax.tree_util.tree_map(  # nonzero biases / norms so positions and gathers matter
        lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(p.size), p.shape), params)
    return model, params, images, ctx, tgt


def test_shapes_and_context_sees_only_its_patches(setup):
    model, params, images, ctx, tgt = setup
    out = model.apply({"params": params}, images, ctx, tgt)
    assert out["context"].shape == (3, ctx.shape[1], 64)
    assert out["predictions"].shape == (*tgt.shape, 64)
    # changing the pixels of a patch outside the context leaves the context tokens unchanged ...
    outside = sorted(set(range(64)) - set(np.asarray(ctx[0]).tolist()))[0]
    r, c = divmod(outside, 8)
    poked = images.at[0, 4 * r:4 * r + 4, 4 * c:4 * c + 4].add(5.0)
    out2 = model.apply({"params": params}, poked, ctx, tgt)
    np.testing.assert_allclose(out2["context"], out["context"], atol=1e-6)
    # ... a patch inside changes them
    r, c = divmod(int(ctx[0, 0]), 8)
    out3 = model.apply({"params": params}, images.at[0, 4 * r:4 * r + 4, 4 * c:4 * c + 4].add(5.0), ctx, tgt)
    assert np.abs(np.asarray(out3["context"][0] - out["context"][0])).max() > 1e-3


def test_patches_keep_their_positions(setup):
    """Permuting the kept indices permutes the encoder's tokens (positions travel with the
    patches); keeping every patch equals the full-image encoder."""
    model, params, images, _, _ = setup
    enc = lambda keep: model.apply({"params": params}, images, keep=keep, return_intermediates=True,  # noqa: E731
                                   method=lambda m, x, **kw: m.encoder(x, **kw))[1]["final_hidden"]
    full = model.apply({"params": params}, images, return_intermediates=True,
                       method=lambda m, x, **kw: m.encoder(x, **kw))[1]["final_hidden"]
    ident = jnp.tile(jnp.arange(64)[None], (3, 1))
    np.testing.assert_allclose(enc(ident), full, atol=1e-5)
    perm = jnp.asarray(np.random.default_rng(0).permutation(64))
    np.testing.assert_allclose(enc(jnp.tile(perm[None], (3, 1))), full[:, perm], atol=1e-5)


def test_predictions_depend_on_target_positions_and_targets_are_normed(setup):
    model, params, images, ctx, tgt = setup
    same = jnp.stack([tgt[0], tgt[0], tgt[1]])
    pred = model.apply({"params": params}, images, ctx, same)["predictions"]
    np.testing.assert_allclose(pred[0], pred[1], atol=1e-6)  # one pass per target block
    assert np.abs(np.asarray(pred[0] - pred[2])).max() > 1e-3  # other positions, other predictions
    targets = model.apply({"params": params}, images, tgt, method=IJepa.targets)
    assert targets.shape == (*tgt.shape, 64)
    np.testing.assert_allclose(targets.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(targets.var(-1), 1.0, atol=1e-3)
    full = model.apply({"params": params}, images, return_intermediates=True,
                       method=lambda m, x, **kw: m.encoder(x, **kw))[1]["final_hidden"]
    h = np.asarray(full)
    h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(targets[2, 1], h[1, np.asarray(tgt[2, 1])], atol=1e-5)


def test_losses_and_schedules_against_numpy():
    rng = np.random.default_rng(0)
    p, t = rng.normal(size=(2, 3, 5, 4)).astype(np.float32) * 2, rng.normal(size=(2, 3, 5, 4)).astype(np.float32)
    d = np.abs(p - t)
    want = np.mean(np.where(d < 1, 0.5 * d ** 2, d - 0.5))
    np.testing.assert_allclose(ijepa_loss(jnp.asarray(p), jnp.asarray(t)), want, rtol=1e-6)
    np.testing.assert_allclose(ijepa_loss(jnp.asarray(p), jnp.asarray(t), "l2"), np.mean((p - t) ** 2), rtol=1e-6)
    g = jax.grad(lambda t_: ijepa_loss(jnp.asarray(p), t_))(jnp.asarray(t))
    assert float(jnp.abs(g).max()) == 0.0  # targets are constants
    assert float(ema_momentum(0, 100)) == pytest.approx(0.996) and float(ema_momentum(100, 100)) == 1.0
    assert float(ema_momentum(50, 100)) == pytest.approx(0.998)
    assert float(cosine_weight_decay(0, 10)) == pytest.approx(0.04)
    assert float(cosine_weight_decay(10, 10)) == pytest.approx(0.4)
    assert float(cosine_weight_decay(5, 10)) == pytest.approx(0.22)
    ema = ema_update({"w": jnp.ones(2)}, {"w": jnp.zeros(2)}, 0.996)
    np.testing.assert_allclose(ema["w"], 0.996)
    with pytest.raises(InputError, match="differ in shape"):
        ijepa_loss(jnp.zeros((2, 3)), jnp.zeros((3, 2)))
    with pytest.raises(ConfigError, match="kind"):
        ijepa_loss(jnp.zeros(2), jnp.zeros(2), "l1")


def test_bad_configs_and_indices(setup):
    model, params, images, ctx, tgt = setup
    with pytest.raises(ConfigError, match="class_token=False"):
        IJepaConfig(encoder=ViTConfig(image_size=32, patch_size=4, dim=64, num_layers=1, num_heads=4, mlp_dim=64))
    with pytest.raises(ConfigError, match="unknown I-JEPA variant"):
        IJepaConfig.from_variant("huge")
    with pytest.raises(InputError, match=r"outside \[0, 64\)"):
        model.apply({"params": params}, images, ctx.at[0, 0].set(64), tgt)
    with pytest.raises(InputError, match=r"\[T, B, K\]"):
        model.apply({"params": params}, images, ctx, tgt[0])
    with pytest.raises(InputError, match="batch 2, the images 3"):
        model.apply({"params": params}, images, ctx[:2], tgt)


def test_padded_index_lists_change_nothing_at_the_valid_tokens(setup):
    """One image (nothing cut): the padded call with validity masks gives the unpadded call's
    context tokens, predictions and pooled features at every valid position."""
    model, params, images, _, _ = setup
    x = images[:1]
    ctx, ctx_ok, tgt, tgt_ok = (jnp.asarray(a) for a in sample_multiblock(
        MultiBlockConfig(grid=(8, 8), min_keep=4), 1, np.random.default_rng(2), pad=True))
    kc, kt = int(ctx_ok.sum()), int(tgt_ok[0].sum())
    assert kc < ctx.shape[-1] and np.all(np.asarray(tgt_ok.sum(-1)) == kt)  # one target size per batch
    padded = model.apply({"params": params}, x, ctx[0], tgt, ctx_ok[0], tgt_ok)
    plain = model.apply({"params": params}, x, ctx[0][:, :kc], tgt[:, :, :kt])
    np.testing.assert_allclose(padded["context"][:, :kc], plain["context"], atol=1e-5)
    np.testing.assert_allclose(padded["predictions"][:, :, :kt], plain["predictions"], atol=1e-5)
    enc = lambda m, im, **kw: m.encoder(im, **kw)  # noqa: E731
    pooled_pad = model.apply({"params": params}, x, keep=ctx[0], keep_valid=ctx_ok[0], method=enc)
    pooled = model.apply({"params": params}, x, keep=ctx[0][:, :kc], method=enc)
    np.testing.assert_allclose(pooled_pad, pooled, atol=1e-5)
    # the loss over valid tokens only
    p, t = jnp.ones((1, 1, 3, 2)), jnp.zeros((1, 1, 3, 2))
    mask = jnp.asarray([[[True, False, False]]])
    assert float(ijepa_loss(p.at[..., 1:, :].set(9.0), t, "l2", mask=mask)) == pytest.approx(1.0)


def test_variance_covariance_terms_against_numpy():
    """C-JEPA's anti-collapse terms: VICReg's formulas by hand; a collapsed batch costs gamma,
    decorrelated unit-variance embeddings cost ~0, and the variance term's gradient pushes a
    collapsing dimension apart."""
    z = np.random.default_rng(0).normal(size=(32, 6)) * np.array([0.1, 0.5, 1.0, 2.0, 0.2, 1.5])
    z[:, 1] += 0.8 * z[:, 3]  # one correlated pair
    var, cov = variance_covariance_loss(jnp.asarray(z, jnp.float32))
    c = np.cov(z, rowvar=False)  # unbiased, as VICReg
    want_var = np.mean(np.maximum(0.0, 1.0 - np.sqrt(np.diag(c) + 1e-4)))
    want_cov = (np.sum(c ** 2) - np.sum(np.diag(c) ** 2)) / 6
    np.testing.assert_allclose([float(var), float(cov)], [want_var, want_cov], rtol=1e-4)
    same = jnp.ones((8, 4))
    v0, c0 = variance_covariance_loss(same)
    assert float(v0) == pytest.approx(1.0 - 1e-2, abs=1e-4) and float(c0) == 0.0
    x = np.random.default_rng(1).normal(size=(64, 4))
    white = np.linalg.qr(x - x.mean(0))[0] * np.sqrt(63)  # zero-mean, orthogonal, unit (unbiased) variance
    v1, c1 = variance_covariance_loss(jnp.asarray(white, jnp.float32))
    assert float(v1) < 1e-5 and float(c1) < 1e-8
    g = jax.grad(lambda x: variance_covariance_loss(x)[0])(jnp.asarray(z, jnp.float32))
    spread = np.sum(np.asarray(g)[:, 0] * (z[:, 0] - z[:, 0].mean()))
    assert spread < 0  # descending the gradient widens the small-variance dimension
    with pytest.raises(InputError, match="batch >= 2"):
        variance_covariance_loss(jnp.ones((1, 4)))
