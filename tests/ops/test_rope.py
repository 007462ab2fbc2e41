"""RoPE: rotation math, relative-position property, and the checkpoint scalings."""

import math

import numpy as np
import jax.numpy as jnp
import pytest

from mmjax.ops.rope import RopeScaling, apply_rope, inverse_frequencies, sinusoidal_positions


def test_default_frequencies():
    inv = inverse_frequencies(8, 10000.0)
    np.testing.assert_allclose(inv, [1.0, 0.1, 0.01, 0.001], rtol=1e-6)
    assert inv.dtype == np.float32


def test_rotation_pairs_i_with_i_plus_half():
    x = jnp.zeros((1, 1, 1, 4)).at[..., 0].set(1.0)  # unit vector on feature 0
    inv = np.array([1.0, 0.0], np.float32)
    out = apply_rope(x, jnp.array([[1]]), inv)
    # feature 0 pairs with feature 2 (rotate-half layout): (cos 1, sin 1)
    np.testing.assert_allclose(out[0, 0, 0], [math.cos(1), 0, math.sin(1), 0], atol=1e-6)


def test_norm_preserved_and_dot_product_depends_on_relative_position():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)
    inv = inverse_frequencies(16, 10000.0)

    def dot(m, n):
        return float(jnp.sum(apply_rope(q, jnp.array([[m]]), inv) * apply_rope(k, jnp.array([[n]]), inv)))

    assert dot(7, 3) == pytest.approx(dot(104, 100), abs=1e-4)
    assert dot(7, 3) != pytest.approx(dot(7, 4), abs=1e-3)
    np.testing.assert_allclose(
        jnp.linalg.norm(apply_rope(q, jnp.array([[55]]), inv)), jnp.linalg.norm(q), rtol=1e-6
    )


def test_linear_scaling_divides_positions():
    inv = inverse_frequencies(16, 10000.0)
    inv_lin = inverse_frequencies(16, 10000.0, RopeScaling("linear", factor=4.0))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 1, 2, 16)), jnp.float32)
    np.testing.assert_allclose(
        apply_rope(x, jnp.array([[40]]), inv_lin), apply_rope(x, jnp.array([[10]]), inv), atol=1e-5
    )


def test_llama3_scaling_bands():
    """High frequencies untouched, low frequencies divided by factor, smooth in between."""
    s = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
    base = inverse_frequencies(128, 500000.0).astype(np.float64)
    scaled = inverse_frequencies(128, 500000.0, s).astype(np.float64)
    wavelen = 2 * np.pi / base
    high = wavelen < 8192 / 4.0
    low = wavelen > 8192 / 1.0
    mid = ~high & ~low
    assert high.any() and low.any() and mid.any()
    np.testing.assert_allclose(scaled[high], base[high], rtol=1e-6)
    np.testing.assert_allclose(scaled[low], base[low] / 8.0, rtol=1e-6)
    smooth = (8192 / wavelen[mid] - 1.0) / 3.0
    np.testing.assert_allclose(scaled[mid], (1 - smooth) * base[mid] / 8 + smooth * base[mid], rtol=1e-5)
    assert np.all(np.diff(scaled) < 0)  # still monotone


def test_bad_scaling_rejected():
    with pytest.raises(ValueError, match="rope_type"):
        RopeScaling("yarn", factor=2.0)
    with pytest.raises(ValueError, match="even head_dim"):
        inverse_frequencies(7, 10000.0)


def test_sinusoidal_table():
    t = sinusoidal_positions(10, 8)
    assert t.shape == (10, 8)
    np.testing.assert_allclose(t[0], [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_allclose(t[3, 0], math.sin(3.0), rtol=1e-6)
