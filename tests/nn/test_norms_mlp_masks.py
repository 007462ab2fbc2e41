"""Norms, MLPs, dense layers and the mask builder, pinned against direct formulas."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.nn import MLP, DenseGeneral, GatedMLP, LayerNorm, RMSNorm
from mmjax.nn.mlp import quick_gelu
from mmjax.ops import masks


def _x(shape=(2, 3, 8), seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * 3 + 1, jnp.float32)


def test_rmsnorm_formula():
    x = _x()
    layer = RMSNorm(eps=1e-5)
    params = layer.init(jax.random.PRNGKey(0), x)
    scale = jnp.linspace(0.5, 2, 8)
    params = {"params": {"scale": scale}}
    expected = x / np.sqrt(np.mean(np.square(x), -1, keepdims=True) + 1e-5) * scale
    np.testing.assert_allclose(layer.apply(params, x), expected, rtol=1e-5)


def test_layernorm_formula():
    x = _x()
    layer = LayerNorm(eps=1e-5)
    p = {"params": {"scale": jnp.linspace(0.5, 2, 8), "bias": jnp.arange(8.0)}}
    mu, var = np.mean(x, -1, keepdims=True), np.var(x, -1, keepdims=True)
    expected = (x - mu) / np.sqrt(var + 1e-5) * p["params"]["scale"] + p["params"]["bias"]
    np.testing.assert_allclose(layer.apply(p, x), expected, rtol=1e-5, atol=1e-5)


def test_bf16_compute_keeps_fp32_params():
    x = _x()
    layer = GatedMLP(16, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    params = nn.meta.unbox(layer.init(jax.random.PRNGKey(0), x))
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    assert layer.apply(params, x).dtype == jnp.bfloat16


def test_swiglu_formula():
    x = _x()
    layer = GatedMLP(16)
    p = nn.meta.unbox(layer.init(jax.random.PRNGKey(1), x))["params"]
    g, u, d = p["gate"]["kernel"], p["up"]["kernel"], p["down"]["kernel"]
    expected = (jax.nn.silu(x @ g) * (x @ u)) @ d
    np.testing.assert_allclose(GatedMLP(16).apply({"params": p}, x), expected, rtol=1e-5, atol=1e-5)


def test_mlp_activations():
    x = _x()
    for act, fn in [("gelu", lambda z: jax.nn.gelu(z, approximate=False)), ("quick_gelu", quick_gelu)]:
        layer = MLP(16, activation=act)
        p = nn.meta.unbox(layer.init(jax.random.PRNGKey(1), x))["params"]
        expected = fn(x @ p["fc1"]["kernel"] + p["fc1"]["bias"]) @ p["fc2"]["kernel"] + p["fc2"]["bias"]
        np.testing.assert_allclose(layer.apply({"params": p}, x), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(quick_gelu(jnp.array(1.0)), 1 / (1 + np.exp(-1.702)), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown activation"):
        MLP(4, activation="swish2").init(jax.random.PRNGKey(0), x)


def test_dense_general_multi_axis_and_logical_names():
    x = _x((2, 3, 4, 5))
    layer = DenseGeneral(7, ("heads", "head_dim", "embed"), axis=(-2, -1), use_bias=True)
    v = layer.init(jax.random.PRNGKey(0), x)
    spec = nn.get_partition_spec(v)["params"]
    assert tuple(spec["kernel"]) == ("heads", "head_dim", "embed")
    assert tuple(spec["bias"]) == ("embed",)
    p = nn.meta.unbox(v)["params"]
    expected = np.einsum("abcd,cde->abe", x, p["kernel"]) + p["bias"]
    np.testing.assert_allclose(layer.apply(v, x), expected, rtol=1e-5, atol=1e-5)


def test_make_attention_mask_patterns():
    valid = jnp.array([[1, 1, 1, 1, 0]], bool)
    causal = masks.make_attention_mask(valid, jnp.ones((1, 5)))[0, 0]
    np.testing.assert_array_equal(causal[:4, :4], np.tril(np.ones((4, 4), bool)))
    assert not causal[:, 4].any() and not causal[4].any()
    full = masks.make_attention_mask(valid, jnp.zeros((1, 5)))[0, 0]
    np.testing.assert_array_equal(full[:4, :4], np.ones((4, 4), bool))
    prefix = masks.prefix_lm_mask(valid, jnp.array([2]))[0, 0]
    expected = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(prefix[:4, :4], expected)


def test_segment_and_window_masks():
    seg = jnp.array([[1, 1, 2, 2, 0]])
    m = masks.segment_mask(seg, seg)[0, 0]
    assert m[0, 1] and not m[1, 2] and m[2, 3] and not m[3, 4]
    pos = jnp.arange(6)[None]
    w = masks.sliding_window_mask(pos, pos, 3)[0] & masks.causal_mask(6, 6)
    assert w[5, 3] and not w[5, 2] and w[2, 0]
    assert masks.and_masks(None, None) is None
