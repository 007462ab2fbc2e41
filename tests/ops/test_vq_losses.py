"""`mmjax.ops.vq_losses` against numpy: nearest codes, the two beta weightings (same value,
different gradients), reconstruction losses, the EMA codebook update, dead-code restart, the
codebook statistics, and clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import ConfigError, InputError
from mmjax.ops import vq_losses as V

RNG = np.random.default_rng(0)


def test_nearest_codes_equal_brute_force_argmin():
    z = RNG.normal(size=(3, 4, 5, 6)).astype(np.float32)
    codebook = RNG.normal(size=(11, 6)).astype(np.float32)
    ids = np.asarray(V.nearest_codes(jnp.asarray(z), jnp.asarray(codebook)))
    brute = np.argmin(((z[..., None, :] - codebook) ** 2).sum(-1), axis=-1)
    assert ids.shape == (3, 4, 5) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids, brute)
    # a vector equal to a code picks it
    np.testing.assert_array_equal(V.nearest_codes(jnp.asarray(codebook[[7, 2]]), jnp.asarray(codebook)), [7, 2])


def test_straight_through_value_and_gradient():
    z = jnp.asarray(RNG.normal(size=(4, 3)), jnp.float32)
    zq = jnp.asarray(RNG.normal(size=(4, 3)), jnp.float32)
    w = jnp.asarray(RNG.normal(size=(4, 3)), jnp.float32)
    np.testing.assert_allclose(V.straight_through(z, zq), zq, atol=1e-6)
    gz, gq = jax.grad(lambda a, b: jnp.sum(w * V.straight_through(a, b)), argnums=(0, 1))(z, zq)
    np.testing.assert_allclose(gz, w, atol=1e-6)  # identity to the encoder
    np.testing.assert_allclose(gq, 0.0)  # nothing to the codes


@pytest.mark.parametrize("beta_on", ["commitment", "codebook"])
def test_vq_loss_weightings_against_numpy(beta_on):
    """VQ-VAE paper (beta on commitment = taming legacy=False) and taming's legacy=True (beta on
    the codebook term): the same value (both terms are ||z - z_q||^2), different gradients."""
    beta = 0.25
    z = RNG.normal(size=(2, 3, 3, 4)).astype(np.float32)
    zq = RNG.normal(size=(2, 3, 3, 4)).astype(np.float32)
    n = z.size
    value, (gz, gq) = jax.value_and_grad(lambda a, b: V.vq_loss(a, b, beta, beta_on), argnums=(0, 1))(
        jnp.asarray(z), jnp.asarray(zq))
    d2 = np.mean((z - zq) ** 2)
    np.testing.assert_allclose(value, (1 + beta) * d2, rtol=1e-5)
    w_commit, w_code = (beta, 1.0) if beta_on == "commitment" else (1.0, beta)
    np.testing.assert_allclose(gz, w_commit * 2 * (z - zq) / n, rtol=1e-4, atol=1e-7)  # encoder side
    np.testing.assert_allclose(gq, w_code * 2 * (zq - z) / n, rtol=1e-4, atol=1e-7)  # codebook side
    # EMA codebook: no codebook term, beta on commitment only
    v2, (gz2, gq2) = jax.value_and_grad(lambda a, b: V.vq_loss(a, b, beta, "commitment", False), argnums=(0, 1))(
        jnp.asarray(z), jnp.asarray(zq))
    np.testing.assert_allclose(v2, beta * d2, rtol=1e-5)
    np.testing.assert_allclose(gq2, 0.0)
    np.testing.assert_allclose(gz2, beta * 2 * (z - zq) / n, rtol=1e-4, atol=1e-7)


def test_reconstruction_losses_and_psnr():
    x = RNG.uniform(size=(3, 4, 4, 1)).astype(np.float32)
    y = RNG.uniform(size=(3, 4, 4, 1)).astype(np.float32)
    np.testing.assert_allclose(V.reconstruction_loss(jnp.asarray(x), jnp.asarray(y), "l2"), np.mean((x - y) ** 2), rtol=1e-5)
    np.testing.assert_allclose(V.reconstruction_loss(jnp.asarray(x), jnp.asarray(y), "l1"), np.mean(np.abs(x - y)), rtol=1e-5)
    np.testing.assert_allclose(V.psnr(jnp.asarray(x), jnp.asarray(y)),
                               10 * np.log10(1.0 / np.mean((x - y) ** 2, axis=(1, 2, 3))), rtol=1e-5)


def _numpy_ema(size, embed_sum, z, ids, decay, eps):
    k = len(size)
    counts = np.bincount(ids, minlength=k).astype(np.float64)
    sums = np.zeros_like(embed_sum)
    for v, i in zip(z, ids):
        sums[i] += v
    size = decay * size + (1 - decay) * counts
    embed_sum = decay * embed_sum + (1 - decay) * sums
    n = size.sum()
    smoothed = (size + eps) / (n + k * eps) * n
    return size, embed_sum, embed_sum / smoothed[:, None]


def test_ema_codebook_update_against_numpy():
    k, d = 6, 3
    codebook = RNG.normal(size=(k, d))
    stats = V.ema_init(jnp.asarray(codebook, jnp.float32))
    # the initial statistics reproduce the initial codebook
    np.testing.assert_allclose(stats["embed_sum"] / stats["cluster_size"][:, None], codebook, rtol=1e-6)
    size, embed_sum = np.ones(k), codebook.copy()
    for step in range(3):
        z = RNG.normal(size=(2, 5, d))
        ids = RNG.integers(0, k - 1, size=(2, 5))  # code k-1 never used: its row decays toward 0
        stats, new = V.ema_codebook_update(stats, jnp.asarray(z, jnp.float32), jnp.asarray(ids), 0.99, 1e-5)
        size, embed_sum, ref = _numpy_ema(size, embed_sum, z.reshape(-1, d), ids.reshape(-1), 0.99, 1e-5)
        np.testing.assert_allclose(stats["cluster_size"], size, rtol=1e-5)
        np.testing.assert_allclose(stats["embed_sum"], embed_sum, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new, ref, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="decay"):
        V.ema_codebook_update(stats, jnp.zeros((2, d)), jnp.zeros((2,), jnp.int32), 1.0)


def test_dead_code_restart_replaces_only_unused_codes():
    k, d = 5, 2
    codebook = jnp.asarray(RNG.normal(size=(k, d)), jnp.float32) + 100.0  # far from every z
    z = jnp.asarray(RNG.normal(size=(4, 3, d)), jnp.float32)
    unused = jnp.zeros((k,), jnp.int32)
    counts = jnp.asarray([3.0, 0.0, 9.0, 0.0, 0.0])
    for _ in range(3):
        unused = V.update_unused(unused, counts)
    np.testing.assert_array_equal(unused, [0, 3, 0, 3, 3])
    unused = unused.at[4].set(1)  # code 4 was used recently
    new, unused2, dead = V.restart_dead_codes(codebook, unused, z, jax.random.PRNGKey(0), threshold=3)
    np.testing.assert_array_equal(dead, [False, True, False, True, False])
    np.testing.assert_array_equal(unused2, [0, 0, 0, 0, 1])
    new, flat = np.asarray(new), np.asarray(z).reshape(-1, d)
    np.testing.assert_array_equal(new[[0, 2, 4]], np.asarray(codebook)[[0, 2, 4]])
    for i in (1, 3):  # each restarted code is one of the batch's encoder outputs, distinct ones
        assert np.min(np.abs(flat - new[i]).sum(-1)) == 0.0
    assert not np.array_equal(new[1], new[3])
    stats = V.restart_ema_stats(V.ema_init(codebook), jnp.asarray(new), dead)
    np.testing.assert_allclose(stats["embed_sum"] / stats["cluster_size"][:, None], new, rtol=1e-6)
    with pytest.raises(ConfigError, match="threshold"):
        V.restart_dead_codes(codebook, unused, z, jax.random.PRNGKey(0), threshold=0)


def test_codebook_statistics():
    ids = jnp.asarray([[0, 0, 1, 3], [3, 3, 3, 0]])
    counts = V.code_counts(ids, 5)
    np.testing.assert_array_equal(counts, [3, 1, 0, 4, 0])
    assert float(V.codebook_usage(counts)) == pytest.approx(3 / 5)
    p = np.array([3, 1, 4]) / 8
    assert float(V.codebook_perplexity(counts)) == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-5)
    assert float(V.codebook_perplexity(jnp.ones(7))) == pytest.approx(7.0, rel=1e-5)


def test_bad_inputs_are_clear():
    with pytest.raises(ConfigError, match="beta_on"):
        V.vq_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), beta_on="encoder")
    with pytest.raises(InputError, match="differ in shape"):
        V.vq_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
    with pytest.raises(ConfigError, match="reconstruction loss"):
        V.reconstruction_loss(jnp.zeros(3), jnp.zeros(3), "l3")
    with pytest.raises(InputError, match="dim 3, the codebook 4"):
        V.nearest_codes(jnp.zeros((2, 3)), jnp.zeros((5, 4)))
