"""The LLM on input embeddings and autoregressive-block masks (`mask_ar`): what every
vision-language family (BLIP-2, LLaVA, MiniGPT-4 soft prompts; prefix-LM) stands on."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import InputError
from mmjax.models.llama import Llama, LlamaConfig

CFG = LlamaConfig.from_variant("tiny", vocab_size=64, dim=32, num_heads=4, num_kv_heads=2,
                               mlp_dim=64, max_len=32)


@pytest.fixture(scope="module")
def model_params():
    model = Llama(CFG)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
    return model, params


def _tokens(b, t, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (b, t)), jnp.int32)


def test_embeddings_path_equals_tokens_path_exactly(model_params):
    model, params = model_params
    tokens = _tokens(2, 9)
    emb = model.apply({"params": params}, tokens, method="embed_tokens")
    assert emb.shape == (2, 9, CFG.dim)
    a = model.apply({"params": params}, tokens)
    b = model.apply({"params": params}, embeddings=emb)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_all_ones_mask_ar_is_the_causal_default_exactly(model_params):
    model, params = model_params
    tokens = _tokens(2, 7)
    mask = jnp.array([[1] * 7, [0, 0] + [1] * 5], bool)
    a = model.apply({"params": params}, tokens, input_mask=mask)
    b = model.apply({"params": params}, tokens, input_mask=mask, mask_ar=jnp.ones((2, 7), jnp.int32))
    np.testing.assert_array_equal(np.asarray(a)[mask], np.asarray(b)[mask])


def test_prefix_sees_later_prefix_text_never_sees_later_tokens(model_params):
    """mask_ar = [0,0,0,0,1,1,1,1]: a 4-token bidirectional prefix, then causal text."""
    model, params = model_params
    tokens = _tokens(1, 8)
    mask_ar = jnp.array([[0, 0, 0, 0, 1, 1, 1, 1]])
    base = np.asarray(model.apply({"params": params}, tokens, mask_ar=mask_ar))

    def changed_at(pos):
        t = tokens.at[0, pos].set((tokens[0, pos] + 1) % CFG.vocab_size)
        out = np.asarray(model.apply({"params": params}, t, mask_ar=mask_ar))
        return np.abs(out - base).max(axis=-1)[0]  # [seq]: how much each position moved

    d = changed_at(3)  # the last prefix token: every position sees it, the first one included
    assert (d > 1e-6).all(), d
    d = changed_at(5)  # a text token: nothing before it moves, everything from it on may
    assert (d[:5] == 0).all() and d[5] > 1e-6, d
    # the causal model, for contrast: the first token cannot see the fourth
    causal = np.asarray(model.apply({"params": params}, tokens))
    t = tokens.at[0, 3].set((tokens[0, 3] + 1) % CFG.vocab_size)
    moved = np.abs(np.asarray(model.apply({"params": params}, t)) - causal).max(axis=-1)[0]
    assert (moved[:3] == 0).all()


def test_cached_decoding_after_a_soft_prompt_matches_uncached_forward(model_params):
    """N learned-looking vectors as a bidirectional prefix, then greedy tokens one at a time
    through a jit-compiled cached step; every step's logits equal an uncached forward over
    [soft prompt; tokens so far] with the same mask_ar."""
    model, params = model_params
    b, n_prefix, n_new = 2, 5, 6
    soft = jnp.asarray(np.random.default_rng(1).normal(0, 0.5, (b, n_prefix, CFG.dim)), jnp.float32)
    prompt = _tokens(b, 2, seed=2)
    embed = lambda t: model.apply({"params": params}, t, method="embed_tokens")  # noqa: E731
    x0 = jnp.concatenate([soft, embed(prompt)], axis=1)
    ar0 = jnp.concatenate([jnp.zeros((b, n_prefix), jnp.int32), jnp.ones((b, 2), jnp.int32)], 1)

    @jax.jit
    def prefill(params, x, ar):
        cache = model.init_cache(b, 16)
        return model.apply({"params": params}, embeddings=x, mask_ar=ar, cache=cache)

    @jax.jit
    def step(params, token, cache):
        return model.apply({"params": params}, token, cache=cache)

    logits, cache = prefill(params, x0, ar0)
    generated = prompt
    last = logits[:, -1]
    for _ in range(n_new):
        nxt = jnp.argmax(last, axis=-1)[:, None].astype(jnp.int32)
        generated = jnp.concatenate([generated, nxt], axis=1)
        step_logits, cache = step(params, nxt, cache)
        last = step_logits[:, -1]
        full_x = jnp.concatenate([soft, embed(generated)], axis=1)
        full_ar = jnp.concatenate([jnp.zeros((b, n_prefix), jnp.int32),
                                   jnp.ones((b, generated.shape[1]), jnp.int32)], 1)
        ref = model.apply({"params": params}, embeddings=full_x, mask_ar=full_ar)[:, -1]
        np.testing.assert_allclose(np.asarray(last), np.asarray(ref), atol=2e-5, rtol=0)
    # the prefix really is bidirectional in the cache: a causal prefill gives other logits
    causal_logits, _ = prefill(params, x0, jnp.ones_like(ar0))
    assert np.abs(np.asarray(causal_logits[:, -1]) - np.asarray(logits[:, -1])).max() > 1e-4


def test_bad_inputs_name_the_problem(model_params):
    model, params = model_params
    with pytest.raises(InputError, match="exactly one of tokens"):
        model.apply({"params": params})
    with pytest.raises(InputError, match="embeddings must be"):
        model.apply({"params": params}, embeddings=jnp.zeros((1, 3, CFG.dim + 1)))
    with pytest.raises(InputError, match="mask_ar must have shape"):
        model.apply({"params": params}, _tokens(1, 4), mask_ar=jnp.ones((1, 5), jnp.int32))
