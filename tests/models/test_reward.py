"""mmjax reward / value model (no transformers): output shapes and dtypes, pooling at the last
real token (right padding, left padding, no mask, an empty row), the decoder is `Llama`
unchanged, param names and logical axes, config normalisation and errors, the family record.
Parity with transformers' LlamaForSequenceClassification is in
tests/parity/test_convert_reward.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import ConfigError, InputError
from mmjax.models import build_model, example_inputs, family_of
from mmjax.models.llama import Llama, LlamaConfig
from mmjax.models.reward import RewardConfig, RewardModel, last_real_index

TEXT = LlamaConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
                   max_len=32, pad_token_id=0)
CFG = RewardConfig(text=TEXT)


def random_params(model, seed=0, boxed=False):
    """Random params of the init's shapes (traced, not compiled): norm scales around 1, the
    rest N(0, 0.2)."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *example_inputs("reward", model.config))["params"]
    if boxed:
        return shapes
    shapes = nn.meta.unbox(shapes)
    rng = np.random.default_rng(seed)
    leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)
    values = [jnp.asarray((1.0 if "scale" in jax.tree_util.keystr(path) else 0.0)
                          + 0.2 * rng.normal(size=leaf.shape), leaf.dtype) for path, leaf in leaves]
    return jax.tree_util.tree_unflatten(tree, values)


@pytest.fixture(scope="module")
def setup():
    model = RewardModel(CFG)
    params = random_params(model)
    apply = jax.jit(lambda p, t, m: model.apply({"params": p}, t, input_mask=m))
    return model, params, apply


def _tokens(seed=0, b=3, t=8):
    return jnp.asarray(np.random.default_rng(seed).integers(1, TEXT.vocab_size, size=(b, t)), jnp.int32)


def test_values_are_the_head_on_the_llama_final_hidden(setup):
    model, params, apply = setup
    tokens = _tokens()
    mask = jnp.ones(tokens.shape, bool)
    out = apply(params, tokens, mask)
    assert set(out) == {"values", "rewards"}
    assert out["values"].shape == (3, 8) and out["values"].dtype == jnp.float32
    assert out["rewards"].shape == (3,) and out["rewards"].dtype == jnp.float32
    _, inter = Llama(CFG.text).apply({"params": params["language_model"]}, tokens, input_mask=mask,
                                     return_intermediates=True)
    head = np.asarray(inter["final_hidden"]) @ np.asarray(params["score"]["kernel"])[:, 0]
    np.testing.assert_allclose(np.asarray(out["values"]), head, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out["rewards"]), np.asarray(out["values"])[:, -1])


def test_rewards_pool_the_last_real_token_with_right_and_left_padding(setup):
    model, params, apply = setup
    tokens = _tokens(1, b=1, t=5)
    alone = apply(params, tokens, jnp.ones((1, 5), bool))
    pad = jnp.zeros((1, 3), jnp.int32)
    right = apply(params, jnp.concatenate([tokens, pad], 1),
                  jnp.asarray([[True] * 5 + [False] * 3]))
    left = apply(params, jnp.concatenate([pad, tokens], 1),
                 jnp.asarray([[False] * 3 + [True] * 5]))
    for out in (right, left):
        np.testing.assert_allclose(np.asarray(out["rewards"]), np.asarray(alone["rewards"]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(right["values"])[:, :5], np.asarray(alone["values"]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(left["values"])[:, 3:], np.asarray(alone["values"]), atol=1e-5)


def test_last_real_index_rule():
    mask = jnp.asarray([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(np.asarray(last_real_index(mask, 4, 4)), [1, 3, 2, 0])
    np.testing.assert_array_equal(np.asarray(last_real_index(None, 2, 4)), [3, 3])
    model = RewardModel(CFG)
    params = random_params(model, seed=1)
    tokens = _tokens(2, b=2, t=4)
    out = model.apply({"params": params}, tokens)  # no mask: the last position
    np.testing.assert_array_equal(np.asarray(out["rewards"]), np.asarray(out["values"])[:, -1])


def test_param_names_logical_axes_and_count():
    boxed = random_params(RewardModel(CFG), boxed=True)
    assert set(boxed) == {"language_model", "score"}
    assert "lm_head" not in boxed["language_model"]  # the decoder's LM head is not part of it
    assert set(boxed["score"]) == {"kernel"}
    assert boxed["score"]["kernel"].names == ("embed", None)
    assert boxed["score"]["kernel"].value.shape == (TEXT.dim, 1)
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves)
    assert CFG.num_params() == sum(x.value.size for x in leaves)
    biased = random_params(RewardModel(CFG.replace(head_bias=True)), boxed=True)
    assert biased["score"]["bias"].value.shape == (1,)


def test_intermediates_bf16_and_the_family_record():
    cfg = RewardConfig(text=TEXT.replace(dtype="bfloat16"))
    module, config = build_model("reward", cfg.to_dict())
    assert isinstance(module, RewardModel) and config == cfg and family_of(cfg) == "reward"
    params = random_params(module)
    out, inter = module.apply({"params": params}, _tokens(3, b=2, t=4), return_intermediates=True)
    assert out["values"].dtype == jnp.float32 and out["rewards"].dtype == jnp.float32
    assert len(inter["hidden_states"]) == TEXT.num_layers + 1 and "final_hidden" in inter
    assert RewardConfig.from_variant("tiny").text == LlamaConfig.from_variant("tiny", tie_embeddings=True)


def test_config_normalises_the_decoder_head_and_fails_early():
    untied = RewardConfig(text=TEXT.replace(tie_embeddings=False))
    assert untied.text.tie_embeddings  # no lm_head param in a reward model
    assert RewardConfig.from_dict(untied.to_dict()) == untied
    assert (CFG.vocab_size, CFG.dim, CFG.max_len, CFG.pad_token_id) == (64, 32, 32, 0)
    with pytest.raises(ConfigError, match="RewardConfig.text must be a LlamaConfig"):
        RewardConfig(text=3)
    with pytest.raises(ConfigError, match="head_init_std must be a positive number"):
        RewardConfig(text=TEXT, head_init_std=0.0)
    with pytest.raises(ConfigError, match="head_bias must be true or false"):
        RewardConfig(text=TEXT, head_bias="yes")
    with pytest.raises(ConfigError, match="unknown config key.*'txt'.*did you mean 'text'"):
        RewardConfig.from_dict({"txt": {}})
    with pytest.raises(ConfigError, match="unknown reward model variant 'tiniest'"):
        RewardConfig.from_variant("tiniest")


def test_bad_inputs_are_the_decoders_errors(setup):
    model, params, _ = setup
    with pytest.raises(InputError, match="input_mask must have shape"):
        model.apply({"params": params}, _tokens(b=1, t=4), input_mask=jnp.ones((1, 3), bool))
    with pytest.raises(InputError, match="exactly one of tokens"):
        model.apply({"params": params})
