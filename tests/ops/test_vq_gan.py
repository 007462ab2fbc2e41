"""VQGAN's adversarial and perceptual loss math (`mmjax.ops.vq_losses`) against hand-written
numpy: hinge / vanilla discriminator losses, the generator loss, the adaptive weight's formula
and clip (and that no gradient flows through it), `disc_start` switching, the one-step
objective's stop-gradient split, the LPIPS-style distance, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import ConfigError, InputError
from mmjax.ops import vq_losses as V

RNG = np.random.default_rng(0)


def _softplus(x):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)


def test_discriminator_and_generator_losses_against_numpy():
    real = RNG.normal(size=(3, 2, 2, 1)).astype(np.float32) * 2
    fake = RNG.normal(size=(3, 2, 2, 1)).astype(np.float32) * 2
    hinge = 0.5 * (np.mean(np.maximum(0, 1 - real)) + np.mean(np.maximum(0, 1 + fake)))
    vanilla = 0.5 * (np.mean(_softplus(-real)) + np.mean(_softplus(fake)))
    np.testing.assert_allclose(V.discriminator_loss(jnp.asarray(real), jnp.asarray(fake), "hinge"), hinge, rtol=1e-6)
    np.testing.assert_allclose(V.discriminator_loss(jnp.asarray(real), jnp.asarray(fake), "vanilla"), vanilla,
                               rtol=1e-6)
    np.testing.assert_allclose(V.generator_loss(jnp.asarray(fake)), -np.mean(fake), rtol=1e-6)
    # a discriminator sure of both (real >> 1, fake << -1) has zero hinge loss
    assert float(V.discriminator_loss(jnp.full((2,), 3.0), jnp.full((2,), -3.0))) == 0.0


def test_adaptive_weight_is_the_clipped_gradient_norm_ratio_and_passes_no_gradient():
    rec = {"a": RNG.normal(size=(3, 4)), "b": RNG.normal(size=(5,))}
    gan = {"a": RNG.normal(size=(3, 4)) * 0.1, "b": RNG.normal(size=(5,)) * 0.1}
    n_rec = np.sqrt(sum(np.sum(v ** 2) for v in rec.values()))
    n_gan = np.sqrt(sum(np.sum(v ** 2) for v in gan.values()))
    w = V.adaptive_weight(jax.tree_util.tree_map(jnp.asarray, rec), jax.tree_util.tree_map(jnp.asarray, gan), 0.8)
    np.testing.assert_allclose(w, 0.8 * n_rec / (n_gan + 1e-4), rtol=1e-5)
    # a generator term with no gradient at the last layer: the ratio is clipped at 1e4
    np.testing.assert_allclose(V.adaptive_weight(jnp.ones(4), jnp.zeros(4), 0.5), 0.5 * 1e4, rtol=1e-6)
    g = jax.grad(lambda r, q: V.adaptive_weight(r, q), argnums=(0, 1))(jnp.ones(4), jnp.full(4, 0.5))
    np.testing.assert_array_equal(g[0], 0.0)
    np.testing.assert_array_equal(g[1], 0.0)


def test_adopt_weight_switches_on_at_disc_start():
    np.testing.assert_array_equal([float(V.adopt_weight(jnp.int32(s), 3)) for s in range(6)], [0, 0, 0, 1, 1, 1])
    assert float(V.adopt_weight(jnp.int32(0), 0)) == 1.0


def test_one_step_objective_routes_each_term_to_one_player():
    """total = L_vq(G) + f (w L_gen(G, sg D) + L_disc(sg G(x), D)) for a linear 'generator' and
    'discriminator': d/dD holds only f L_disc, d/dG only L_vq + f w L_gen."""
    x = jnp.asarray(RNG.normal(size=(6, 3)), jnp.float32)

    def total(g, d, factor):
        fake = x @ g
        vq = jnp.mean((fake - x) ** 2)
        gen = V.generator_loss(fake @ jax.lax.stop_gradient(d))
        disc = V.discriminator_loss(x @ d, jax.lax.stop_gradient(fake) @ d)
        return V.vqgan_total(vq, gen, disc, jnp.float32(0.7), factor)

    g0 = jnp.asarray(RNG.normal(size=(3, 3)), jnp.float32)
    d0 = jnp.asarray(RNG.normal(size=(3, 1)), jnp.float32)
    gg, gd = jax.grad(total, argnums=(0, 1))(g0, d0, 1.0)
    ref_g = jax.grad(lambda g: jnp.mean((x @ g - x) ** 2) + 0.7 * V.generator_loss(x @ g @ d0))(g0)
    ref_d = jax.grad(lambda d: V.discriminator_loss(x @ d, x @ g0 @ d))(d0)
    np.testing.assert_allclose(gg, ref_g, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gd, ref_d, rtol=1e-5, atol=1e-7)
    # before disc_start (f = 0): no discriminator gradient, the generator's is L_vq's
    gg0, gd0 = jax.grad(total, argnums=(0, 1))(g0, d0, 0.0)
    np.testing.assert_array_equal(gd0, 0.0)
    np.testing.assert_allclose(gg0, jax.grad(lambda g: jnp.mean((x @ g - x) ** 2))(g0), rtol=1e-6)


def _unit(f):
    return f / (np.sqrt(np.sum(f * f, -1, keepdims=True)) + 1e-10)


def test_perceptual_distance_against_numpy():
    fx = [RNG.normal(size=(2, 4, 4, 3)), RNG.normal(size=(2, 2, 2, 5))]
    fy = [RNG.normal(size=(2, 4, 4, 3)), RNG.normal(size=(2, 2, 2, 5))]
    ref = sum(np.mean(np.sum((_unit(a) - _unit(b)) ** 2, -1), axis=(1, 2)) for a, b in zip(fx, fy))
    j = [jnp.asarray(a, jnp.float32) for a in fx], [jnp.asarray(b, jnp.float32) for b in fy]
    d = V.perceptual_distance(*j)
    assert d.shape == (2,)
    np.testing.assert_allclose(d, ref, rtol=1e-5)
    w = [RNG.uniform(size=3), RNG.uniform(size=5)]  # LPIPS's learnt per-channel weights
    ref_w = sum(np.mean(np.sum((_unit(a) - _unit(b)) ** 2 * wl, -1), axis=(1, 2)) for a, b, wl in zip(fx, fy, w))
    np.testing.assert_allclose(V.perceptual_distance(*j, weights=w), ref_w, rtol=1e-5)
    # identical features: 0; each position's features rescaled: the same (channel-unit normalised)
    np.testing.assert_allclose(V.perceptual_distance(j[0], j[0]), 0.0, atol=1e-6)
    scaled = [a * jnp.asarray(RNG.uniform(0.5, 3.0, size=a.shape[:3] + (1,)), jnp.float32) for a in j[0]]
    np.testing.assert_allclose(V.perceptual_distance(scaled, j[1]), d, rtol=1e-4)


def test_bad_inputs_are_clear():
    with pytest.raises(ConfigError, match="discriminator loss 'lsgan'"):
        V.discriminator_loss(jnp.zeros(2), jnp.zeros(2), "lsgan")
    with pytest.raises(InputError, match="1 and 2 feature layers"):
        V.perceptual_distance([jnp.zeros((1, 2, 2, 3))], [jnp.zeros((1, 2, 2, 3))] * 2)
    with pytest.raises(InputError, match="layer 0 features"):
        V.perceptual_distance([jnp.zeros((1, 2, 2, 3))], [jnp.zeros((1, 2, 2, 4))])
