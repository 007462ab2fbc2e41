"""The LLaMA module on its own: cache, packing, padding, axes, dtypes, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import ConfigError, InputError
from mmjax.models.llama import Llama, LlamaConfig, segment_positions
from mmjax.parallel.rules import LOGICAL_PARAM_AXES

CFG = LlamaConfig.from_variant("tiny", max_len=64)


@pytest.fixture(scope="module")
def model_and_params():
    model = Llama(CFG)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    return model, variables


def tokens(b, t, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (b, t)), jnp.int32)


def test_every_param_has_logical_axes(model_and_params):
    _, variables = model_and_params
    specs = nn.get_partition_spec(variables)["params"]
    leaves = jax.tree_util.tree_leaves_with_path(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert leaves
    shapes = jax.tree_util.tree_leaves(nn.meta.unbox(variables)["params"])
    for (path, spec), arr in zip(leaves, shapes):
        assert len(spec) == arr.ndim, path
        assert all(name in LOGICAL_PARAM_AXES for name in spec), (path, spec)


def test_num_params_formula(model_and_params):
    _, variables = model_and_params
    n = sum(x.size for x in jax.tree_util.tree_leaves(nn.meta.unbox(variables)))
    assert n == CFG.num_params()
    assert LlamaConfig.from_variant("llama-7b").num_params() == 6_738_415_616


def test_incremental_decode_with_cache_equals_full_forward(model_and_params):
    model, v = model_and_params
    x = tokens(2, 12)
    full = model.apply(v, x)
    cache = model.init_cache(2, 20)
    logits_a, cache = model.apply(v, x[:, :5], cache=cache)
    outs = [logits_a]
    for i in range(5, 12):
        step, cache = model.apply(v, x[:, i:i + 1], cache=cache)
        outs.append(step)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-5)
    assert int(cache.index) == 12 and cache.lengths.tolist() == [12, 12]


def test_cache_holds_only_kv_heads():
    c = LlamaConfig.from_variant("tiny", num_heads=8, num_kv_heads=2, dim=64)
    cache = Llama(c).init_cache(1, 10, dtype=jnp.bfloat16)
    assert cache.k[0].shape == (1, 10, 2, 8)
    assert cache.nbytes() == 10 * c.kv_cache_bytes_per_token(2)
    # SYSTEMS.md: hidden 4096, 32 layers, fp16 (MHA) -> 512 KB per token
    assert LlamaConfig.from_variant("llama-7b").kv_cache_bytes_per_token(2) == 512 * 1024


def test_left_padding_with_cache_matches_unpadded(model_and_params):
    model, v = model_and_params
    x = tokens(1, 6, seed=3)
    alone = model.apply(v, x)
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), x], 1)
    mask = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1, 1]], bool)
    logits, _ = model.apply(v, padded, input_mask=mask, cache=model.init_cache(1, 16))
    np.testing.assert_allclose(logits[:, 3:], alone, atol=2e-5)


def test_right_padding_without_cache(model_and_params):
    model, v = model_and_params
    x = tokens(1, 6, seed=4)
    padded = jnp.concatenate([x, jnp.zeros((1, 2), jnp.int32)], 1)
    mask = jnp.array([[1] * 6 + [0] * 2], bool)
    np.testing.assert_allclose(model.apply(v, padded, input_mask=mask)[:, :6], model.apply(v, x), atol=2e-5)


def test_packed_documents_do_not_attend_to_each_other(model_and_params):
    model, v = model_and_params
    a, b = tokens(1, 5, seed=1), tokens(1, 4, seed=2)
    packed = jnp.concatenate([a, b], 1)
    seg = jnp.array([[1] * 5 + [2] * 4])
    np.testing.assert_array_equal(segment_positions(seg), [[0, 1, 2, 3, 4, 0, 1, 2, 3]])
    out = model.apply(v, packed, segment_ids=seg)
    np.testing.assert_allclose(out[:, :5], model.apply(v, a), atol=2e-5)
    np.testing.assert_allclose(out[:, 5:], model.apply(v, b), atol=2e-5)


def test_prefix_lm_attention_mask_changes_only_prefix(model_and_params):
    from mmjax.ops.masks import prefix_lm_mask

    model, v = model_and_params
    x = tokens(1, 8, seed=5)
    base = model.apply(v, x)
    # the extra mask is ANDed with causal: a full prefix mask leaves causal logits unchanged
    same = model.apply(v, x, attention_mask=prefix_lm_mask(jnp.ones((1, 8), bool), jnp.array([8])))
    np.testing.assert_allclose(same, base, atol=1e-6)


def test_intermediates(model_and_params):
    model, v = model_and_params
    logits, out = model.apply(v, tokens(2, 7), return_intermediates=True)
    assert len(out["hidden_states"]) == CFG.num_layers + 1
    assert out["final_hidden"].shape == (2, 7, CFG.dim)


def test_sliding_window_limits_context():
    c = CFG.replace(sliding_window=3)
    model = Llama(c)
    v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    x = tokens(1, 10, seed=6)
    y = x.at[0, 0].set((x[0, 0] + 1) % c.vocab_size)  # change only the first token
    lx, ly = model.apply(v, x), model.apply(v, y)
    # with 2 layers and window 3, position p depends on tokens >= p - 4: later logits unchanged
    np.testing.assert_allclose(lx[:, 5:], ly[:, 5:], atol=1e-6)
    assert np.abs(lx[:, :3] - ly[:, :3]).max() > 1e-4
    # and the cache path applies the same window
    cache = model.init_cache(1, 16)
    lc, cache = model.apply(v, x[:, :4], cache=cache)
    steps = [lc]
    for i in range(4, 10):
        s, cache = model.apply(v, x[:, i:i + 1], cache=cache)
        steps.append(s)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), lx, atol=2e-5)


def test_bf16_compute_and_remat(model_and_params):
    _, v = model_and_params
    x = tokens(2, 8)
    ref = Llama(CFG).apply(v, x)
    bf = Llama(CFG.replace(dtype="bfloat16")).apply(v, x)
    assert bf.dtype == jnp.float32  # logits returned in fp32
    assert float(jnp.max(jnp.abs(bf - ref))) < 0.1
    remat = Llama(CFG.replace(remat=True))
    np.testing.assert_allclose(remat.apply(v, x), ref, atol=1e-6)
    g = jax.grad(lambda p: remat.apply({"params": p}, x).sum())(nn.meta.unbox(v["params"]))
    g_ref = jax.grad(lambda p: Llama(CFG).apply({"params": p}, x).sum())(nn.meta.unbox(v["params"]))
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_tied_embeddings_have_no_head():
    c = CFG.replace(tie_embeddings=True)
    v = Llama(c).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    assert "lm_head" not in v["params"]
    assert sum(x.size for x in jax.tree_util.tree_leaves(nn.meta.unbox(v))) == c.num_params()


def test_bad_inputs(model_and_params):
    model, v = model_and_params
    with pytest.raises(InputError, match="outside the vocabulary"):
        model.apply(v, jnp.array([[1, 2, CFG.vocab_size]]))
    with pytest.raises(InputError, match=r"\[batch, seq\]"):
        model.apply(v, jnp.array([1, 2, 3]))
    with pytest.raises(InputError, match="exceeds max_len"):
        model.apply(v, jnp.zeros((1, CFG.max_len + 1), jnp.int32))
    with pytest.raises(InputError, match="input_mask must have shape"):
        model.apply(v, jnp.zeros((1, 4), jnp.int32), input_mask=jnp.ones((1, 5), bool))
    with pytest.raises(InputError, match="integer"):
        model.apply(v, jnp.zeros((1, 4), jnp.float32))


def test_config_errors():
    with pytest.raises(ConfigError, match="num_kv_heads"):
        LlamaConfig(dim=64, num_heads=4, num_kv_heads=3, mlp_dim=8)
    with pytest.raises(ConfigError, match="not divisible"):
        LlamaConfig(dim=65, num_heads=4, mlp_dim=8)
    with pytest.raises(ConfigError, match="did you mean 'num_heads'"):
        LlamaConfig.from_dict({"num_head": 4})
    with pytest.raises(ConfigError, match="unknown LLaMA variant"):
        LlamaConfig.from_variant("llama9-1t")
    c = LlamaConfig.from_variant("llama3.1-8b")
    assert LlamaConfig.from_dict(c.to_dict()) == c


def test_dropout_only_in_training_mode():
    config = LlamaConfig.from_variant("tiny", dropout=0.3)
    model = Llama(config)
    tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    params = nn.meta.unbox(model.init(jax.random.key(0), tokens)["params"])
    plain = Llama(config.replace(dropout=0.0)).apply({"params": params}, tokens)
    np.testing.assert_array_equal(model.apply({"params": params}, tokens), plain)
    a = model.apply({"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.key(1)})
    b = model.apply({"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.key(1)})
    c = model.apply({"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, plain) and not np.allclose(a, c)
    with pytest.raises(ConfigError, match="dropout"):
        LlamaConfig.from_variant("tiny", dropout=1.0)
