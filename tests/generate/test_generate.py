"""Decoding semantics: processors, greedy/sampling loop over the KV cache, beam search, compiles."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import ConfigError, InputError
from mmjax.generate import GenerationConfig, generate, no_repeat_ngram_mask, top_k_mask, top_p_mask
from mmjax.generate.loop import TRACE_COUNT
from mmjax.generate.processors import choose_next, process_logits
from mmjax.models.llama import Llama, LlamaConfig


@pytest.fixture(scope="module")
def tiny():
    config = LlamaConfig.from_variant("tiny", eos_token_id=2, max_len=96)
    model = Llama(config)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    return model, params


PROMPTS = [[1, 5, 9, 33, 40], [1, 7], [1, 8, 8, 8, 8, 9, 10, 11, 12]]


def full_forward_greedy(model, params, prompt, n, width=32):
    """Reference: recompute the whole sequence (no cache) for every new token. The sequence sits
    in a fixed-width buffer (one compile); causal attention makes the tail irrelevant."""
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
    seq = list(prompt)
    for _ in range(n):
        buf = np.zeros((1, width), np.int32)
        buf[0, : len(seq)] = seq
        logits = forward(params, jnp.asarray(buf))
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return seq[len(prompt):]


# --- processors ----------------------------------------------------------------------------

def kept(x):
    return set(np.nonzero(np.isfinite(np.asarray(x[0])))[0].tolist())


def test_top_p_keeps_smallest_set_reaching_p():
    logits = jnp.log(jnp.asarray([[0.15, 0.5, 0.05, 0.3]]))
    assert kept(top_p_mask(logits, 0.75)) == {1, 3}  # 0.5 + 0.3 = 0.8 >= 0.75
    assert kept(top_p_mask(logits, 0.8)) == {1, 3}  # reaching p exactly is enough
    assert kept(top_p_mask(logits, 0.81)) == {0, 1, 3}
    assert kept(top_p_mask(logits, 0.1)) == {1}  # the most likely token always stays
    assert kept(top_p_mask(logits, 1.0)) == {0, 1, 2, 3}


def test_top_k_and_combination_order():
    logits = jnp.log(jnp.asarray([[0.15, 0.5, 0.05, 0.3]]))
    assert kept(top_k_mask(logits, 2)) == {1, 3}
    assert kept(top_k_mask(logits, 10)) == {0, 1, 2, 3}
    # top-k first (renormalised over {1, 3, 0}: 0.526, 0.316, 0.158), then top-p 0.8 -> {1, 3}
    assert kept(process_logits(logits, temperature=1.0, top_k=3, top_p=0.8)) == {1, 3}
    # temperature sharpens before top-p: at T=0.2 token 1 alone holds 0.925 (at T=1: 0.5)
    assert kept(process_logits(logits, temperature=0.2, top_k=None, top_p=0.9)) == {1}


def test_temperature_scales_logits():
    logits = jnp.asarray([[1.0, 2.0, 4.0]])
    np.testing.assert_allclose(process_logits(logits, temperature=2.0, top_k=None, top_p=None),
                               [[0.5, 1.0, 2.0]])


def test_sample_frequencies_match_probabilities():
    probs = np.asarray([0.1, 0.2, 0.3, 0.4])
    logits = jnp.log(jnp.asarray(probs))[None]
    keys = jax.random.split(jax.random.key(0), 20000)
    draws = jax.vmap(lambda k: choose_next(logits, k, temperature=1.0)[0])(keys)
    freq = np.bincount(np.asarray(draws), minlength=4) / len(keys)
    # 20000 draws: standard error <= 0.0035, so 0.015 is > 4 sigma
    np.testing.assert_allclose(freq, probs, atol=0.015)
    # and top-k=2 leaves only tokens 2 and 3 in proportion 3:4
    draws = jax.vmap(lambda k: choose_next(logits, k, temperature=1.0, top_k=2)[0])(keys)
    freq = np.bincount(np.asarray(draws), minlength=4) / len(keys)
    np.testing.assert_allclose(freq, [0, 0, 3 / 7, 4 / 7], atol=0.015)


def test_no_repeat_ngram_bans_completions():
    hist = jnp.asarray([[0, 5, 6, 7, 5, 6, 0, 0]])  # filled: first 6
    valid = jnp.asarray([[False, True, True, True, True, True, False, False]])
    out = no_repeat_ngram_mask(jnp.zeros((1, 10)), hist, valid, jnp.int32(6), 3)
    # last two tokens (5, 6) appeared before followed by 7 -> 7 banned, nothing else
    assert set(np.nonzero(~np.isfinite(np.asarray(out[0])))[0].tolist()) == {7}
    out = no_repeat_ngram_mask(jnp.zeros((1, 10)), hist, valid, jnp.int32(6), 2)
    # last token 6 was followed by 7 -> ban 7
    assert set(np.nonzero(~np.isfinite(np.asarray(out[0])))[0].tolist()) == {7}


# --- greedy / sampling loop ----------------------------------------------------------------

def test_greedy_equals_full_forward_argmax_with_left_padding(tiny):
    model, params = tiny
    cfg = GenerationConfig(max_new_tokens=12, eos_token_id=())
    out = generate(model, params, PROMPTS, cfg)
    assert out.tokens.shape == (3, 12) and out.tokens.dtype == np.int32
    for prompt, row in zip(PROMPTS, out.tokens):
        assert list(row) == full_forward_greedy(model, params, prompt, 12)
        single = generate(model, params, [prompt], cfg)  # same row alone, no padding neighbours
        assert list(single.tokens[0]) == list(row)


def test_eos_stops_a_row_and_pads_after(tiny):
    model, params = tiny
    free = generate(model, params, PROMPTS, GenerationConfig(max_new_tokens=10, eos_token_id=()))
    eos = int(free.tokens[1, 3])  # make row 1's 4th token the EOS
    out = generate(model, params, PROMPTS, GenerationConfig(max_new_tokens=10, eos_token_id=eos,
                                                            pad_token_id=0))
    row = list(out.tokens[1])
    first = row.index(eos)
    assert first <= 3 and out.lengths[1] == first + 1
    assert row[: first + 1] == list(free.tokens[1, : first + 1])
    assert all(t == 0 for t in row[first + 1:])


def test_seeded_sampling_is_reproducible(tiny):
    model, params = tiny
    cfg = GenerationConfig(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.95, eos_token_id=())
    a = generate(model, params, PROMPTS, cfg, rng=jax.random.key(7))
    b = generate(model, params, PROMPTS, cfg, rng=jax.random.key(7))
    c = generate(model, params, PROMPTS, cfg, rng=jax.random.key(8))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


def test_no_recompilation_within_a_bucket(tiny):
    model, params = tiny
    cfg = GenerationConfig(max_new_tokens=8, temperature=0.7, top_k=20, eos_token_id=(),
                           prompt_bucket=16)
    generate(model, params, [[1, 2, 3], [1, 4]], cfg, rng=jax.random.key(0))
    before = TRACE_COUNT["decode"]
    for prompts, seed in (([[1, 2, 3, 4, 5, 6, 7], [1]], 1), ([[1] * 16, [1, 9, 9]], 2),
                          ([[5, 5], [6, 6, 6, 6, 6]], 3)):
        generate(model, params, prompts, cfg, rng=jax.random.key(seed))
    assert TRACE_COUNT["decode"] == before
    generate(model, params, [[1] * 17, [1]], cfg)  # next bucket: one new program
    assert TRACE_COUNT["decode"] == before + 1


def test_bad_inputs(tiny):
    model, params = tiny
    with pytest.raises(InputError, match="outside the vocabulary"):
        generate(model, params, [[1, 999]], GenerationConfig(max_new_tokens=4))
    with pytest.raises(InputError, match="max_len=96"):
        generate(model, params, [[1] * 90], GenerationConfig(max_new_tokens=10))
    with pytest.raises(InputError, match="empty"):
        generate(model, params, [[1, 2], []], GenerationConfig(max_new_tokens=4))
    with pytest.raises(ConfigError, match="top_p"):
        GenerationConfig(top_p=1.5)
    with pytest.raises(ConfigError, match="beam"):
        GenerationConfig(num_beams=3, temperature=0.5)


# --- beam search ---------------------------------------------------------------------------

def test_beam_with_one_beam_is_greedy(tiny):
    model, params = tiny
    greedy = generate(model, params, PROMPTS, GenerationConfig(max_new_tokens=10, eos_token_id=()))
    from mmjax.generate.beam_search import beam_search_fn
    from mmjax.generate.loop import prepare_prompts

    cfg = GenerationConfig(max_new_tokens=10, eos_token_id=(), num_beams=1)
    tokens, mask = prepare_prompts(PROMPTS, cfg, model.config.vocab_size)
    out, lengths, _ = beam_search_fn(model, cfg, ())(params, tokens, mask, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out), greedy.tokens)


@dataclasses.dataclass(frozen=True)
class BigramConfig:
    vocab_size: int = 4
    max_len: int = 64
    eos_ids: tuple = ()


class BigramLM(nn.Module):
    """Logits depend only on the last token: a fixed transition table (a constructed case)."""

    config: BigramConfig = BigramConfig()

    def init_cache(self, batch, max_len=None, dtype=None):
        return jnp.zeros((batch, 1), jnp.float32)  # nothing to remember

    @nn.compact
    def __call__(self, tokens, *, input_mask=None, cache=None, positions=None):
        # from 0: 1 (0.6) or 2 (0.4); from 1: uniform; from 2 and 3: 3 (0.97)
        table = jnp.log(jnp.asarray([[0.0001, 0.6, 0.3998, 0.0001], [0.25, 0.25, 0.25, 0.25],
                                     [0.01, 0.01, 0.01, 0.97], [0.01, 0.01, 0.01, 0.97]]))
        logits = table[tokens]
        return (logits, cache) if cache is not None else logits


def test_beam_beats_greedy_on_a_constructed_case():
    model = BigramLM()
    params = {}
    greedy = generate(model, params, [[0]], GenerationConfig(max_new_tokens=3, eos_token_id=()))
    beam = generate(model, params, [[0]], GenerationConfig(max_new_tokens=3, eos_token_id=(),
                                                           num_beams=2, length_penalty=0.0))
    assert list(greedy.tokens[0]) == [1, 0, 1]
    assert list(beam.tokens[0]) == [2, 3, 3]
    assert beam.scores[0] > greedy.scores[0]
    np.testing.assert_allclose(beam.scores[0], np.log(0.3998) + 2 * np.log(0.97), rtol=1e-5)


def test_beam_score_equals_recomputed_log_probs(tiny):
    model, params = tiny
    for lp in (1.0, 0.0):
        cfg = GenerationConfig(max_new_tokens=8, num_beams=4, eos_token_id=(), length_penalty=lp)
        out = generate(model, params, PROMPTS[:2], cfg)
        greedy = generate(model, params, PROMPTS[:2], cfg.replace(num_beams=1))
        for prompt, row, score, g in zip(PROMPTS[:2], out.tokens, out.scores, greedy.scores):
            seq = jnp.asarray([prompt + list(row)])
            logp = jax.nn.log_softmax(model.apply({"params": params}, seq)[0], -1)
            total = sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(row))
            np.testing.assert_allclose(score, total / 8 ** lp, rtol=1e-4)
            assert score >= g / 8 ** lp - 1e-5  # never worse than greedy


def test_beam_respects_eos_and_no_repeat(tiny):
    model, params = tiny
    free = generate(model, params, PROMPTS, GenerationConfig(max_new_tokens=10, num_beams=3,
                                                             eos_token_id=()))
    eos = int(free.tokens[0, 2])
    out = generate(model, params, PROMPTS, GenerationConfig(max_new_tokens=10, num_beams=3,
                                                            eos_token_id=eos))
    for row, n in zip(out.tokens, out.lengths):
        row = list(row)
        if eos in row:
            assert n == row.index(eos) + 1 and all(t == 0 for t in row[n:])
    cfg = GenerationConfig(max_new_tokens=20, num_beams=2, eos_token_id=(), no_repeat_ngram_size=2)
    out = generate(model, params, [[1, 8, 8, 8]], cfg)
    seq = [8] + list(out.tokens[0])  # prompt's last token + generated
    pairs = list(zip(seq, seq[1:]))
    assert len(pairs) == len(set(pairs)), "a bigram repeated"
    greedy_nr = generate(model, params, [[1, 8, 8, 8]], cfg.replace(num_beams=1))
    seq = [8] + list(greedy_nr.tokens[0])
    assert len(set(zip(seq, seq[1:]))) == len(seq) - 1
