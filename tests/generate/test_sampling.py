"""Logit processors against Hugging Face's own warpers (an independent reference).

`test_generate.py` pins the rules on hand-made distributions; here the same functions are run on
random logits next to transformers' TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
(applied in generate's order) and NoRepeatNGramLogitsProcessor, and must agree exactly on which
tokens survive and to float precision on the surviving values.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.generate import no_repeat_ngram_mask, process_logits, top_k_mask, top_p_mask
from mmjax.generate.processors import apply_temperature, choose_next

torch = pytest.importorskip("torch")
logits_process = pytest.importorskip("transformers.generation.logits_process")


def random_logits(seed, batch=32, vocab=50, scale=2.0):
    return (np.random.default_rng(seed).standard_normal((batch, vocab)) * scale).astype(np.float32)


def hf_apply(processors, logits, input_ids=None):
    scores = torch.from_numpy(logits.copy())
    ids = torch.zeros((logits.shape[0], 1), dtype=torch.long) if input_ids is None else input_ids
    for proc in processors:
        scores = proc(ids, scores)
    return scores.numpy()


def assert_same_processing(ours, ref):
    ours = np.asarray(ours)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
    np.testing.assert_allclose(ours[np.isfinite(ours)], ref[np.isfinite(ref)], rtol=1e-6)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.75, 0.9, 0.99])
def test_top_p_matches_hf(p):
    x = random_logits(seed=int(p * 100))
    ref = hf_apply([logits_process.TopPLogitsWarper(p)], x)
    assert_same_processing(top_p_mask(jnp.asarray(x), p), ref)
    # the rule really prunes: some rows keep a strict subset, every row keeps >= 1 token
    kept = np.isfinite(ref).sum(axis=1)
    assert kept.min() >= 1 and (p == 0.99 or kept.max() < x.shape[1])


@pytest.mark.parametrize("k", [1, 3, 17, 50])
def test_top_k_matches_hf(k):
    x = random_logits(seed=k)
    ref = hf_apply([logits_process.TopKLogitsWarper(k)], x)
    assert_same_processing(top_k_mask(jnp.asarray(x), k), ref)
    assert (np.isfinite(ref).sum(axis=1) == k).all()


@pytest.mark.parametrize("temperature,top_k,top_p",
                         [(0.7, 10, 0.9), (1.5, 20, 0.5), (0.3, None, 0.8), (2.0, 5, None)])
def test_temperature_top_k_top_p_chain_matches_hf(temperature, top_k, top_p):
    x = random_logits(seed=7)
    chain = [logits_process.TemperatureLogitsWarper(temperature)]
    if top_k:
        chain.append(logits_process.TopKLogitsWarper(top_k))
    if top_p is not None:
        chain.append(logits_process.TopPLogitsWarper(top_p))
    ref = hf_apply(chain, x)
    ours = process_logits(jnp.asarray(x), temperature=temperature, top_k=top_k, top_p=top_p)
    assert_same_processing(ours, ref)
    np.testing.assert_allclose(apply_temperature(jnp.asarray(x), temperature), x / temperature,
                               rtol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_matches_hf_with_and_without_left_padding(n):
    rng = np.random.default_rng(n)
    # a tiny vocabulary makes repeated (n-1)-token prefixes common
    batch, length, vocab, pad = 16, 20, (5 if n <= 2 else 3), 3
    history = rng.integers(0, vocab, size=(batch, length))
    ref = hf_apply([logits_process.NoRepeatNGramLogitsProcessor(n)],
                   np.zeros((batch, vocab), np.float32), torch.from_numpy(history))
    assert (~np.isfinite(ref)).any(), "the case bans nothing: not a test"

    ours = no_repeat_ngram_mask(jnp.zeros((batch, vocab)), jnp.asarray(history, jnp.int32),
                                jnp.ones((batch, length), bool), jnp.int32(length), n)
    np.testing.assert_array_equal(np.isfinite(np.asarray(ours)), np.isfinite(ref))

    # same rows after `pad` slots of left padding, in a buffer with free slots after the end;
    # the padding slots hold token ids that would create n-grams if they were counted
    buf = np.zeros((batch, pad + length + 4), np.int32)
    buf[:, pad:pad + length] = history
    buf[:, :pad] = history[:, -1:]
    valid = np.zeros(buf.shape, bool)
    valid[:, pad:pad + length] = True
    ours = no_repeat_ngram_mask(jnp.zeros((batch, vocab)), jnp.asarray(buf), jnp.asarray(valid),
                                jnp.int32(pad + length), n)
    np.testing.assert_array_equal(np.isfinite(np.asarray(ours)), np.isfinite(ref))


def test_seeded_draws_reproducible_and_seed_dependent():
    x = jnp.asarray(random_logits(seed=3, batch=64))

    def draw(seed):
        return np.asarray(choose_next(x, jax.random.key(seed), temperature=1.0, top_p=0.9))

    np.testing.assert_array_equal(draw(0), draw(0))
    assert not np.array_equal(draw(0), draw(1))
    # every draw lies inside the top-p set
    kept = np.isfinite(np.asarray(top_p_mask(x, 0.9)))
    assert kept[np.arange(64), draw(2)].all()
