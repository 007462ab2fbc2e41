"""mmjax BERT on its own (no PyTorch): named intermediates, the pooler, logical axis names and
the param count, padding / causal / cross-attention masks doing what they say, scan = loop,
the family record, config validation and clear errors for bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import ConfigError, InputError
from mmjax.models import abstract_params, build_model, family_of
from mmjax.models.bert import Bert, BertConfig
from mmjax.nn.transformer import stack_layer_params

RNG = jax.random.PRNGKey(0)


def batch(config, b=3, t=10, seed=0):
    """Random ids and types, rows right-padded to lengths t, t-3, t-6."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, config.vocab_size, size=(b, t))
    types = rng.integers(0, config.type_vocab_size, size=(b, t))
    mask = np.ones((b, t), bool)
    for i in range(1, b):
        mask[i, t - 3 * i:] = False
    tokens[~mask] = 0
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(types, jnp.int32), jnp.asarray(mask)


def randomised(params, seed=1, scale=0.2):
    """Every leaf perturbed, so that biases and norms are not at their zero / one init."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return tree.unflatten([x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def encoder():
    config = BertConfig.from_variant("tiny")
    model = Bert(config)
    tokens, types, mask = batch(config)
    variables = jax.jit(model.init)(RNG, tokens, types, mask)
    return model, variables, randomised(nn.unbox(variables["params"]))


@pytest.fixture(scope="module")
def decoder():
    config = BertConfig.from_variant("tiny-decoder")
    model = Bert(config)
    tokens, types, mask = batch(config)
    states = jnp.ones((3, 5, config.cross_width))
    variables = jax.jit(model.init)(RNG, tokens, types, mask, states)
    return model, variables, randomised(nn.unbox(variables["params"]), seed=2)


def test_intermediates_and_pooler(encoder):
    model, _, params = encoder
    c = model.config
    tokens, types, mask = batch(c)
    last, out = model.apply({"params": params}, tokens, types, mask, return_intermediates=True)
    assert last.shape == (3, 10, c.dim) and last.dtype == jnp.float32
    assert len(out["hidden_states"]) == c.num_layers + 1
    np.testing.assert_array_equal(out["hidden_states"][-1], last)
    np.testing.assert_array_equal(out["last_hidden_state"], last)
    pooled = jnp.tanh(last[:, 0] @ params["pooler"]["kernel"] + params["pooler"]["bias"])
    np.testing.assert_allclose(out["pooler_output"], pooled, atol=1e-6)
    # post-norm: every layer output is LayerNorm-ed (mean ~ bias mean, not drifting)
    assert np.isfinite(np.asarray(last)).all()
    # params without the pooler (a checkpoint saved without one) run and return no pooler_output
    no_pooler = {k: v for k, v in params.items() if k != "pooler"}
    last2, out2 = model.apply({"params": no_pooler}, tokens, types, mask, return_intermediates=True)
    assert "pooler_output" not in out2
    np.testing.assert_array_equal(last2, last)


def test_every_param_has_logical_axis_names_and_count(encoder, decoder):
    for model, variables, _ in (encoder, decoder):
        leaves = jax.tree_util.tree_leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
        assert leaves
        for leaf in leaves:
            assert isinstance(leaf, nn.Partitioned), type(leaf)
            assert len(leaf.names) == leaf.value.ndim
        plain = nn.unbox(variables["params"])
        assert sum(x.size for x in jax.tree_util.tree_leaves(plain)) == model.config.num_params()
    cross = nn.unbox(decoder[1]["params"])["layers_0"]["cross_attn"]
    assert cross["key"]["kernel"].shape == (48, 4, 16)  # keys read encoder_width-wide states
    # the family record's example inputs create every param (cross-attention included)
    model = decoder[0]
    shapes = abstract_params("bert", model, model.config)
    assert jax.tree_util.tree_map(lambda x: x.shape, shapes) == jax.tree_util.tree_map(
        lambda x: x.shape, nn.unbox(decoder[1]["params"]))


def test_padding_and_token_types(encoder):
    model, _, params = encoder
    tokens, types, mask = batch(model.config)
    apply = jax.jit(lambda t, y, m: model.apply({"params": params}, t, y, m))
    base = apply(tokens, types, mask)
    # padded positions are never attended: changing them leaves real tokens' states as they were
    noisy = jnp.where(mask, tokens, 7)
    np.testing.assert_allclose(np.asarray(apply(noisy, types, mask))[np.asarray(mask)],
                               np.asarray(base)[np.asarray(mask)], atol=1e-6)
    # row 2 alone, unpadded, gives the same states on its real tokens
    n = int(mask[2].sum())
    alone = apply(tokens[2:3, :n], types[2:3, :n], None)
    np.testing.assert_allclose(alone[0], base[2, :n], atol=1e-5)
    # token types matter, and omitted types mean type 0
    assert np.abs(np.asarray(apply(tokens, (types + 1) % 3, mask) - base)).max() > 1e-2
    np.testing.assert_allclose(apply(tokens, None, mask), apply(tokens, jnp.zeros_like(types), mask), atol=1e-6)


def test_causal_and_cross_attention_masks(decoder):
    model, _, params = decoder
    c = model.config
    tokens, types, mask = batch(c)
    states = jnp.asarray(np.random.default_rng(3).normal(size=(3, 5, c.cross_width)), jnp.float32)
    enc_mask = jnp.asarray(np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], bool))
    apply = jax.jit(lambda t, s, em: model.apply({"params": params}, t, types, mask, s, em))
    base = np.asarray(apply(tokens, states, enc_mask))
    # causal: later tokens do not change earlier positions
    later = tokens.at[:, 6:].set(5)
    np.testing.assert_allclose(np.asarray(apply(later, states, enc_mask))[:, :6], base[:, :6], atol=1e-6)
    assert np.abs(np.asarray(apply(later, states, enc_mask))[0, 6:] - base[0, 6:]).max() > 1e-2
    # masked context positions are not read; real ones are
    hidden = jnp.where(enc_mask[..., None], states, 100.0)
    np.testing.assert_allclose(np.asarray(apply(tokens, hidden, enc_mask)), base, atol=1e-5)
    assert np.abs(np.asarray(apply(tokens, states * 2, enc_mask)) - base).max() > 1e-2
    # without encoder states the cross-attention sub-blocks are skipped (HF BertModel's rule)
    plain = model.apply({"params": params}, tokens, types, mask)
    assert plain.shape == base.shape and np.abs(np.asarray(plain) - base).max() > 1e-2


def test_scan_layers_equals_loop(encoder):
    model, _, params = encoder
    tokens, types, mask = batch(model.config)
    scanned = Bert(model.config.replace(scan_layers=True, remat=True))
    stacked = stack_layer_params(params)
    a = model.apply({"params": params}, tokens, types, mask)
    b = scanned.apply({"params": stacked}, tokens, types, mask)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_family_record():
    module, config = build_model("bert", {"vocab_size": 50, "dim": 32, "num_layers": 1, "num_heads": 2,
                                          "mlp_dim": 64, "max_len": 8})
    assert isinstance(module, Bert) and family_of(config) == "bert"
    assert BertConfig.from_dict(config.to_dict()) == config
    assert BertConfig.from_variant("MiniLM-L6-H384").dim == 384


@pytest.mark.parametrize("kw, needle", [
    (dict(dim=30, num_heads=4), "not divisible"),
    (dict(activation="gelu_fast"), "activation"),
    (dict(encoder_width=32), "cross_attention=True"),
    (dict(num_layers=0), "num_layers"),
    (dict(pad_token_id=500), "pad_token_id"),
    (dict(remat_policy="some"), "remat_policy"),
    (dict(dtype="float33"), "dtype"),
])
def test_config_errors(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        BertConfig.from_variant("tiny", **kw)
    with pytest.raises(ConfigError, match="did you mean 'num_layers'"):
        BertConfig.from_dict({"num_layer": 2})


def test_bad_inputs_name_value_and_limit(encoder, decoder):
    model, _, params = encoder
    c = model.config
    tokens, types, mask = batch(c)

    def run(*args, m=model, p=params):
        return m.apply({"params": p}, *args)

    with pytest.raises(InputError, match=r"token type id 3 is outside \[0, 3\)"):
        run(tokens, types.at[0, 0].set(3), mask)
    with pytest.raises(InputError, match=r"token id 128 is outside \[0, 128\)"):
        run(tokens.at[1, 2].set(128), types, mask)
    with pytest.raises(InputError, match=r"token id -1"):
        run(tokens.at[1, 2].set(-1), types, mask)
    long = jnp.zeros((1, c.max_len + 1), jnp.int32)
    with pytest.raises(InputError, match=r"sequence length 33 exceeds max_position_embeddings \(max_len\) 32"):
        run(long)
    with pytest.raises(InputError, match="input_mask must have shape"):
        run(tokens, types, mask[:, :4])
    with pytest.raises(InputError, match="no cross-attention"):
        run(tokens, types, mask, jnp.zeros((3, 2, c.dim)))
    dmodel, _, dparams = decoder
    with pytest.raises(InputError, match="encoder_width=48"):
        run(tokens, types, mask, jnp.zeros((3, 2, 64)), m=dmodel, p=dparams)
    with pytest.raises(InputError, match="encoder_mask must have shape"):
        run(tokens, types, mask, jnp.zeros((3, 2, 48)), jnp.ones((3, 3), bool), m=dmodel, p=dparams)
