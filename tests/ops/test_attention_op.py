"""mmjax.ops.attention (xla): pinned against a direct numpy softmax attention."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from mmjax.ops import attention
from mmjax.ops.attention import AttentionInputError


def numpy_attention(q, k, v, mask=None, scale=None):
    """Naive reference: repeat K/V heads, full softmax, float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, n, h = q.shape
    rep = n // k.shape[2]
    k = np.repeat(k, rep, axis=2)
    v = np.repeat(v, rep, axis=2)
    scale = 1 / np.sqrt(h) if scale is None else scale
    logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
    if mask is not None:
        m = np.broadcast_to(mask, logits.shape)
        logits = np.where(m, logits, -np.inf)
    mx = np.max(logits, -1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0)
    p = np.exp(logits - mx)
    denom = p.sum(-1, keepdims=True)
    p = np.where(denom > 0, p / np.where(denom > 0, denom, 1), 0)
    return np.einsum("bnts,bsnh->btnh", p, v)


def rand(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("n,kv", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_matches_numpy_reference(n, kv):
    q, k, v = rand((2, 5, n, 8), 0), rand((2, 7, kv, 8), 1), rand((2, 7, kv, 8), 2)
    out = attention(q, k, v, implementation="xla")
    np.testing.assert_allclose(out, numpy_attention(q, k, v), atol=1e-5)


def test_causal_is_bottom_right_aligned():
    q, k, v = rand((1, 3, 2, 4), 0), rand((1, 5, 2, 4), 1), rand((1, 5, 2, 4), 2)
    out = attention(q, k, v, causal=True)
    mask = np.arange(5)[None, :] <= np.arange(3)[:, None] + 2
    np.testing.assert_allclose(out, numpy_attention(q, k, v, mask[None, None]), atol=1e-5)
    # square case: lower-triangular
    out_sq = attention(q, q, q, causal=True)
    np.testing.assert_allclose(out_sq, numpy_attention(q, q, q, np.tril(np.ones((3, 3), bool))), atol=1e-5)
    # the first query sees only the first key: output = v[0]
    np.testing.assert_allclose(out_sq[:, 0], q[:, 0], atol=1e-6)


def test_segment_ids_block_cross_document_attention():
    q, k, v = rand((1, 6, 2, 4), 0), rand((1, 6, 2, 4), 1), rand((1, 6, 2, 4), 2)
    seg = jnp.array([[1, 1, 1, 2, 2, 2]])
    out = attention(q, k, v, causal=True, segment_ids=seg)
    # each document alone gives the same result
    first = attention(q[:, :3], k[:, :3], v[:, :3], causal=True)
    second = attention(q[:, 3:], k[:, 3:], v[:, 3:], causal=True)
    np.testing.assert_allclose(out, jnp.concatenate([first, second], 1), atol=1e-6)


def test_arbitrary_mask_and_fully_masked_rows_are_zero():
    q, k, v = rand((2, 4, 2, 4), 0), rand((2, 6, 2, 4), 1), rand((2, 6, 2, 4), 2)
    mask = np.random.default_rng(3).random((2, 2, 4, 6)) > 0.5
    mask[0, :, 1, :] = False  # a row that can attend to nothing
    out = attention(q, k, v, mask=jnp.asarray(mask))
    np.testing.assert_allclose(out, numpy_attention(q, k, v, mask), atol=1e-5)
    assert np.all(np.asarray(out)[0, 1] == 0)


def test_padding_mask_broadcasts_from_batch_and_keys():
    q, k, v = rand((2, 3, 2, 4), 0), rand((2, 5, 2, 4), 1), rand((2, 5, 2, 4), 2)
    valid = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    out = attention(q, k, v, mask=valid[:, None, None, :])
    np.testing.assert_allclose(out[0], attention(q[:1], k[:1, :3], v[:1, :3])[0], atol=1e-6)


def test_bf16_inputs_accumulate_in_fp32():
    q, k, v = rand((1, 64, 2, 16), 0), rand((1, 64, 2, 16), 1), rand((1, 64, 2, 16), 2)
    out = attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), causal=True)
    assert out.dtype == jnp.bfloat16
    ref = numpy_attention(q, k, v, np.tril(np.ones((64, 64), bool)))
    assert np.max(np.abs(np.asarray(out, np.float32) - ref)) < 3e-2


def test_gradients_match_numerical_reference():
    q, k, v = rand((1, 4, 2, 4), 0), rand((1, 4, 1, 4), 1), rand((1, 4, 1, 4), 2)

    def loss(q, k, v):
        return jnp.sum(attention(q, k, v, causal=True) ** 2)

    def ref_loss(q, k, v):
        kr, vr = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
        s = jnp.einsum("btnh,bsnh->bnts", q, kr) / 2.0
        s = jnp.where(jnp.tril(jnp.ones((4, 4), bool)), s, -jnp.inf)
        return jnp.sum(jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, -1), vr) ** 2)

    for g, gr in zip(jax.grad(loss, (0, 1, 2))(q, k, v), jax.grad(ref_loss, (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g, gr, atol=1e-5)


def test_custom_scale():
    q, k, v = rand((1, 3, 2, 4), 0), rand((1, 3, 2, 4), 1), rand((1, 3, 2, 4), 2)
    np.testing.assert_allclose(attention(q, k, v, scale=0.3), numpy_attention(q, k, v, scale=0.3), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(q=(2, 3, 4), k=(2, 3, 2, 8)), "rank 4"),
        (dict(q=(2, 3, 3, 8), k=(2, 3, 2, 8)), "not a multiple"),
        (dict(q=(2, 3, 4, 8), k=(2, 3, 2, 4)), "head_dim"),
        (dict(q=(1, 3, 4, 8), k=(2, 3, 2, 8)), "batch"),
    ],
)
def test_bad_shapes_name_the_problem(kwargs, match):
    q = jnp.zeros(kwargs["q"])
    k = jnp.zeros(kwargs["k"])
    with pytest.raises(AttentionInputError, match=match):
        attention(q, k, k)


def test_bad_mask_and_implementation_errors():
    q = jnp.zeros((1, 3, 2, 4))
    with pytest.raises(AttentionInputError, match="boolean"):
        attention(q, q, q, mask=jnp.ones((3, 3)))
    with pytest.raises(AttentionInputError, match="does not broadcast"):
        attention(q, q, q, mask=jnp.ones((1, 1, 3, 4), bool))
    with pytest.raises(AttentionInputError, match="unknown implementation"):
        attention(q, q, q, implementation="fast")
    with pytest.raises(AttentionInputError, match="dtypes differ"):
        attention(q, q.astype(jnp.bfloat16), q)
    with pytest.raises(AttentionInputError, match="segment_ids"):
        attention(q, q, q, segment_ids=jnp.zeros((1, 4), jnp.int32))


def test_cudnn_without_gpu_is_a_clear_error():
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is present: cuDNN is usable")
    q = jnp.zeros((1, 4, 2, 8), jnp.bfloat16)
    with pytest.raises(AttentionInputError, match="cudnn"):
        attention(q, q, q, implementation="cudnn")


@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 2), (4, 1)])
def test_one_query_decoding_step_matches_the_dot_path(heads, kv_heads):
    """A batched single-query step (reductions over the cache layout) equals the same query
    scored by the batched-dot path (the first row of a two-query call), masks of every shape."""
    from mmjax.ops.attention import attention_reference

    r = np.random.default_rng(0)
    q = jnp.asarray(r.normal(size=(3, 1, heads, 16)), jnp.float32)
    k = jnp.asarray(r.normal(size=(3, 20, kv_heads, 16)), jnp.float32)
    v = jnp.asarray(r.normal(size=(3, 20, kv_heads, 16)), jnp.float32)
    masks = [None, jnp.asarray(r.random((3, 1, 1, 20)) > 0.3),
             jnp.asarray(r.random((3, heads, 1, 20)) > 0.3), jnp.zeros((3, 1, 1, 20), bool)]
    for mask in masks:
        two = None if mask is None else jnp.concatenate([mask, mask], 2)
        one_query = attention_reference(q, k, v, mask)
        dots = attention_reference(jnp.concatenate([q, q], 1), k, v, two)[:, :1]
        np.testing.assert_allclose(np.asarray(one_query), np.asarray(dots), atol=1e-6)
    assert not np.any(np.asarray(attention_reference(q, k, v, masks[-1])))  # no key: zeros
