"""Sliding-window perplexity equals direct computations."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import InputError
from mmjax.eval import bits_per_byte, perplexity, window_plan
from mmjax.models.llama import Llama, LlamaConfig


@pytest.fixture(scope="module")
def setup():
    model = Llama(LlamaConfig.from_variant("tiny", max_len=64))
    params = nn.meta.unbox(model.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"])
    tokens = np.random.default_rng(0).integers(0, 256, size=45)
    return model, params, tokens


def direct_nll(model, params, seq):
    """Sum of -log p(seq[j] | seq[:j]) for j >= 1, one forward pass."""
    logp = jax.nn.log_softmax(model.apply({"params": params}, jnp.asarray([seq]))[0], -1)
    return -sum(float(logp[j - 1, seq[j]]) for j in range(1, len(seq)))


def test_window_plan_scores_every_token_once():
    for n, w, s in [(45, 16, 5), (45, 16, 15), (17, 16, 8), (100, 10, 1), (5, 64, 3)]:
        scored = []
        for start, end, first in window_plan(n, w, s):
            assert end - start <= w and start < first <= end
            scored += list(range(first, end))
        assert scored == list(range(1, n))


def test_single_window_equals_one_pass(setup):
    model, params, tokens = setup
    r = perplexity(model, params, tokens, window=64)
    assert r["num_tokens"] == len(tokens) - 1 and r["num_windows"] == 1
    np.testing.assert_allclose(r["nll_sum"], direct_nll(model, params, tokens), rtol=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(r["nll_sum"] / r["num_tokens"]))


def test_largest_stride_is_chunks_sharing_one_token(setup):
    model, params, tokens = setup
    tokens = tokens[:31]
    r = perplexity(model, params, tokens, window=16, stride=15, batch_size=2)
    starts = [0, 15]  # windows [0,16), [15,31)
    expected = sum(direct_nll(model, params, tokens[s:s + 16]) for s in starts)
    assert r["num_tokens"] == len(tokens) - 1 and r["num_windows"] == len(starts)
    np.testing.assert_allclose(r["nll_sum"], expected, rtol=1e-5)


def test_strided_windows_give_each_token_its_window_context(setup):
    model, params, tokens = setup
    r = perplexity(model, params, tokens, window=16, stride=6, batch_size=3)
    expected = 0.0
    for start, end, first in window_plan(len(tokens), 16, 6):
        seq = tokens[start:end]
        logp = jax.nn.log_softmax(model.apply({"params": params}, jnp.asarray([seq]))[0], -1)
        expected += -sum(float(logp[j - start - 1, tokens[j]]) for j in range(first, end))
    np.testing.assert_allclose(r["nll_sum"], expected, rtol=1e-5)
    # more context than independent chunks -> a different (here: computed) value
    assert r["nll_sum"] != perplexity(model, params, tokens, window=16, stride=15)["nll_sum"]


def test_bits_per_byte_and_errors(setup):
    model, params, tokens = setup
    assert bits_per_byte(math.log(2) * 10, 5) == pytest.approx(2.0)
    with pytest.raises(InputError, match="stride"):
        perplexity(model, params, tokens, window=16, stride=16)
    with pytest.raises(InputError, match="max_len"):
        perplexity(model, params, tokens, window=65)
    with pytest.raises(InputError, match=r"\[0, 256\)"):
        perplexity(model, params, np.asarray([1, 2, 300]))
