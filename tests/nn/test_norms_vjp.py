"""The norms' hand-written backward passes equal autodiff of the plain formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.nn.norms import layer_norm, rms_norm


def rms_reference(x, scale, eps, dtype):
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps)
    return y.astype(dtype) * scale.astype(dtype)


def ln_reference(x, scale, bias, eps, dtype):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, -1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), -1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps) * scale + bias).astype(dtype)


@pytest.mark.parametrize("shape", [(3, 5, 16), (7, 33)])
def test_rms_norm_values_and_grads(shape):
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], shape) * 3 + 1
    scale = 1 + 0.1 * jax.random.normal(k[1], shape[-1:])
    w = jax.random.normal(k[2], shape)  # a random cotangent through a weighted sum
    ours = lambda x, s: jnp.sum(w * rms_norm(x, s, 1e-6, jnp.float32))  # noqa: E731
    ref = lambda x, s: jnp.sum(w * rms_reference(x, s, 1e-6, jnp.float32))  # noqa: E731
    np.testing.assert_allclose(ours(x, scale), ref(x, scale), rtol=1e-6)
    for a, b in zip(jax.grad(ours, (0, 1))(x, scale), jax.grad(ref, (0, 1))(x, scale)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 5, 16), (7, 33)])
def test_layer_norm_values_and_grads(shape):
    k = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(k[0], shape) * 3 + 1
    scale = 1 + 0.1 * jax.random.normal(k[1], shape[-1:])
    bias = 0.1 * jax.random.normal(k[2], shape[-1:])
    w = jax.random.normal(k[3], shape)
    ours = lambda x, s, b: jnp.sum(w * layer_norm(x, s, b, 1e-5, jnp.float32))  # noqa: E731
    ref = lambda x, s, b: jnp.sum(w * ln_reference(x, s, b, 1e-5, jnp.float32))  # noqa: E731
    np.testing.assert_allclose(ours(x, scale, bias), ref(x, scale, bias), rtol=1e-6)
    for a, b in zip(jax.grad(ours, (0, 1, 2))(x, scale, bias), jax.grad(ref, (0, 1, 2))(x, scale, bias)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_inputs_give_bf16_outputs_and_fp32_statistics():
    x = (jax.random.normal(jax.random.key(2), (4, 64)) * 50).astype(jnp.bfloat16)
    y = rms_norm(x, jnp.ones((64,)), 1e-6, jnp.bfloat16)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32),
                               np.asarray(rms_reference(x, jnp.ones((64,)), 1e-6, jnp.bfloat16), np.float32))
    g = jax.grad(lambda x: jnp.sum(rms_norm(x, jnp.ones((64,)), 1e-6, jnp.bfloat16).astype(jnp.float32)))(x)
    assert g.dtype == jnp.bfloat16 and np.isfinite(np.asarray(g, np.float32)).all()
