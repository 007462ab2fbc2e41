"""Int8 weight-only kernels (`mmjax.nn.quant`): the rounding error is at most half a step per
output channel, DenseGeneral with `kernel_scale` computes with the dequantized kernel, and a
scanned stack keeps one scale per layer."""

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.nn import quant
from mmjax.nn.linear import DenseGeneral


def test_quantize_error_and_dense_dequantizes():
    layer = DenseGeneral(features=(4, 8), kernel_axes=("embed", "heads", "head_dim"))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 16))
    params = __import__("flax").linen.meta.unbox(layer.init(jax.random.PRNGKey(0), x)["params"])
    layout = quant.dense_layout(layer, x)
    assert layout == {"": (1, 2)}  # the root module: 1 input dim, 2 output dims
    q = quant.quantize_kernels(params, {"": (1, 2)})
    assert q["kernel"].dtype == jnp.int8 and q[quant.SCALE].shape == (4, 8)
    deq = quant.dequantize(q["kernel"], q[quant.SCALE])
    step = np.abs(np.asarray(params["kernel"])).max(axis=0) / 127.0
    assert np.all(np.abs(np.asarray(deq) - np.asarray(params["kernel"])) <= step / 2 + 1e-7)
    y_q = layer.apply({"params": q}, x)
    y_deq = layer.apply({"params": {"kernel": deq}}, x)
    np.testing.assert_allclose(y_q, y_deq, rtol=1e-6, atol=1e-6)
    assert not np.allclose(y_q, layer.apply({"params": params}, x), atol=1e-7)  # it is lossy
    back = quant.dequantize_kernels(q)
    assert set(back) == {"kernel"} and back["kernel"].dtype == jnp.float32


def test_stacked_kernels_keep_a_scale_per_layer():
    kernel = jax.random.normal(jax.random.PRNGKey(0), (3, 16, 8)) * jnp.arange(1, 4)[:, None, None]
    q, s = quant.quantize(kernel, n_lead=1, n_in=1)
    assert q.shape == (3, 16, 8) and s.shape == (3, 8)
    np.testing.assert_allclose(s, np.abs(np.asarray(kernel)).max(axis=1) / 127.0, rtol=1e-6)
    assert quant.lead_dims(q.shape, s.shape) == 1
    np.testing.assert_allclose(quant.dequantize(q, s), kernel, atol=float(s.max()) / 2 + 1e-6)


def test_int8_dense_gradient_wrt_its_input():
    """The custom backward pass (dequantize again, no float kernel kept) gives jax.grad of the
    dequantized dense."""
    layer = DenseGeneral(features=8, kernel_axes=("embed", "mlp"))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 16))
    params = __import__("flax").linen.meta.unbox(layer.init(jax.random.PRNGKey(0), x)["params"])
    q = quant.quantize_kernels(params, {"": (1, 1)})
    deq = {"kernel": quant.dequantize(q["kernel"], q[quant.SCALE])}
    f = lambda p: lambda x: jnp.sum(jnp.sin(layer.apply({"params": p}, x)))  # noqa: E731
    np.testing.assert_allclose(jax.grad(f(q))(x), jax.grad(f(deq))(x), rtol=1e-5, atol=1e-6)
