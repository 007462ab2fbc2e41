"""Speculative decoding (`mmjax.generate.speculative`) on tiny random LLaMAs.

Greedy must reproduce plain greedy decoding of the target token for token (batch 1 and a
left-padded batch of 3 whose rows accept different counts, with EOS); the sampling rule must
produce the target's distribution (one step with fixed p and q, and whole short sequences
enumerated on a 5-token vocabulary); one compiled program; clear errors. The same for the
adaptive k (`draft_schedule="heuristic"`, `draft_confidence`): k moves at run time inside the one
program, both ways.
"""

import contextlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import ConfigError, InputError
from mmjax.generate import GenerationConfig, generate, speculative_generate
from mmjax.generate.processors import process_logits
from mmjax.generate.speculative import TRACE_COUNT, speculative_accept
from mmjax.models.llama import Llama, LlamaConfig

VOCAB = 64
NEW = 16
PROMPTS = [[1, 5, 9, 33, 40, 5, 9], [1, 7], [1, 8, 8, 8, 8, 9, 10, 11, 12]]


def tiny(dim, layers, seed, vocab=VOCAB, heads=4, scale=1.0):
    """A random LLaMA; params drawn with numpy on `init`'s shapes (nothing to compile)."""
    config = LlamaConfig(vocab_size=vocab, dim=dim, num_layers=layers, num_heads=heads,
                         num_kv_heads=2, mlp_dim=2 * dim, max_len=128, eos_token_id=None)
    model = Llama(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if "norm" in jax.tree_util.keystr(path):
            return jnp.full(leaf.shape, scale, leaf.dtype)
        return jnp.asarray(rng.normal(0, 0.02 * scale, leaf.shape), leaf.dtype)

    return model, jax.tree_util.tree_map_with_path(draw, shapes["params"])


@pytest.fixture(scope="module")
def models():
    target, tparams = tiny(32, 1, 0)
    draft, dparams = tiny(16, 1, 1)  # smaller, unrelated: rejects almost everything
    # the target's own module with perturbed weights: accepts some tokens, rejects others
    rng = np.random.default_rng(7)
    noisy = jax.tree_util.tree_map(
        lambda x: x * (1 + 0.1 * rng.standard_normal(x.shape)).astype(np.float32), tparams)
    return target, tparams, draft, dparams, noisy


# token 47 ends some rows early under the plain loop (asserted below), so EOS handling is exercised
GREEDY = GenerationConfig(max_new_tokens=NEW, eos_token_id=47)


def test_greedy_batch_left_padded_matches_plain(models):
    target, tparams, draft, dparams, noisy = models
    ref = generate(target, tparams, PROMPTS, GREEDY)
    assert ref.lengths.min() < NEW <= ref.lengths.max()  # one row stops at EOS, one does not
    rates = []
    for d, dp in ((draft, dparams), (target, noisy), (target, tparams)):
        out = speculative_generate(target, tparams, d, dp, PROMPTS, GREEDY, num_draft_tokens=3)
        np.testing.assert_array_equal(out.tokens, ref.tokens)
        np.testing.assert_array_equal(out.lengths, ref.lengths)
        np.testing.assert_allclose(out.scores, ref.scores, atol=1e-4)
        rates.append(out.acceptance_rate)
        if dp is noisy:  # rows kept different counts: the masked-hole path ran
            assert len(set(out.accepted.tolist())) > 1, out.accepted
    # unrelated draft < perturbed target (rows accept different counts) < the target itself
    assert rates[0] < 0.3 and 0.2 < rates[1] < 0.95 and rates[2] == 1.0, rates
    # draft == target: every round keeps k + 1 tokens
    assert out.rounds <= -(-(NEW - 1) // 4) + 1


def test_greedy_batch1_matches_plain_and_rows_independent(models):
    target, tparams, _, _, noisy = models
    cfg = GenerationConfig(max_new_tokens=NEW, eos_token_id=())
    accepted = proposed = 0
    for prompt in PROMPTS:
        ref = generate(target, tparams, [prompt], cfg)
        out = speculative_generate(target, tparams, target, noisy, [prompt], cfg,
                                   num_draft_tokens=4)
        np.testing.assert_array_equal(out.tokens, ref.tokens)
        assert out.lengths[0] == NEW
        accepted, proposed = accepted + out.accepted.sum(), proposed + out.proposed.sum()
    assert 0 < accepted < proposed  # some rounds rejected, some accepted


@contextlib.contextmanager
def backend_compiles():
    """Counts XLA backend compilations while the block runs: {"compiles": n}."""
    from jax._src import dispatch, monitoring

    counting = {"on": True, "compiles": 0}

    def listener(event, duration, **kw):
        if counting["on"] and event == dispatch.BACKEND_COMPILE_EVENT:
            counting["compiles"] += 1

    monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counting
    finally:
        counting["on"] = False


def test_one_compiled_program(models):
    target, tparams, draft, dparams, _ = models
    cfg = GREEDY  # the program of test_greedy_batch_left_padded_matches_plain
    speculative_generate(target, tparams, draft, dparams, PROMPTS, cfg, num_draft_tokens=3)
    traces = TRACE_COUNT["speculative"]
    with backend_compiles() as counting:
        other = [[2, 3, 4], [5, 6, 7, 8, 9], [10]]  # other lengths, same 16-token bucket
        out = speculative_generate(target, tparams, draft, dparams, other, cfg,
                                   num_draft_tokens=3)
    assert out.rounds > 3  # many rounds ran inside the one program
    assert TRACE_COUNT["speculative"] == traces
    assert counting["compiles"] == 0


def test_accept_rule_gives_target_distribution():
    """One round with fixed p, q (k = 2): the first emitted token must follow p_1."""
    v, k, n = 6, 2, 100_000
    p = jnp.array([[0.4, 0.25, 0.15, 0.1, 0.06, 0.04]] * (k + 1))
    q = jnp.array([[0.05, 0.1, 0.1, 0.15, 0.2, 0.4], [0.3, 0.1, 0.1, 0.2, 0.2, 0.1]])
    r_draft, r_acc = jax.random.split(jax.random.key(0))
    drafts = jax.random.categorical(r_draft, jnp.log(q)[None], axis=-1, shape=(n, k))
    bp, bq = jnp.broadcast_to(p, (n, k + 1, v)), jnp.broadcast_to(q, (n, k, v))
    nacc, y = jax.jit(speculative_accept)(bp, bq, drafts.astype(jnp.int32), r_acc)
    first = np.bincount(np.asarray(y[:, 0]), minlength=v) / n
    assert np.abs(first - np.asarray(p[0])).max() < 0.006  # sd of a frequency here <= 0.0016
    # the second token, where the first was accepted, follows p_2 too
    second = np.asarray(y[:, 1])[np.asarray(nacc) >= 1]
    freq2 = np.bincount(second, minlength=v) / len(second)
    assert np.abs(freq2 - np.asarray(p[1])).max() < 0.01
    # the acceptance rate is sum(min(p, q)) per position
    rate = float(np.mean(np.asarray(nacc) >= 1))
    assert abs(rate - float(jnp.minimum(p[0], q[0]).sum())) < 0.006
    # a wrong rule (keep every draft token) would be far off: the test can fail
    assert np.abs(np.asarray(q[0]) - np.asarray(p[0])).max() > 0.1


@pytest.mark.parametrize("adaptive", [
    {}, {"num_draft_tokens": 3, "draft_schedule": "heuristic", "draft_confidence": 0.4}])
def test_sampled_sequences_follow_target_distribution(adaptive):
    """Whole 3-token continuations, 5-token vocabulary, temperature + top-k on both models:
    empirical frequencies of the 125 sequences vs the target's exact processed probabilities.
    Also with the adaptive k (heuristic schedule + confidence stop: rows draft 1 .. 3 tokens)."""
    v, new, rows = 5, 3, 6000
    # scale 4: sharper than near-uniform random models, so p and q differ a lot
    target, tparams = tiny(16, 1, 3, vocab=v, heads=2, scale=4.0)
    draft, dparams = tiny(16, 1, 4, vocab=v, heads=2, scale=4.0)
    cfg = GenerationConfig(max_new_tokens=new, temperature=0.8, top_k=4, eos_token_id=())
    prompt = [1, 2, 0, 4]
    out = speculative_generate(target, tparams, draft, dparams, [prompt] * rows, cfg,
                               jax.random.key(1), **({"num_draft_tokens": 2} | adaptive))
    assert (out.lengths == new).all() and 0.1 < out.acceptance_rate < 0.9
    if adaptive:  # the confidence stop cut some rows' drafts short
        assert out.proposed.min() < out.proposed.max(), out.proposed

    def exact(model, params):
        seqs = np.array(list(itertools.product(range(v), repeat=new)))
        full = np.concatenate([np.tile(prompt, (len(seqs), 1)), seqs], 1)
        logits = jax.jit(model.apply)({"params": params}, jnp.asarray(full))
        probs = jax.nn.softmax(process_logits(
            logits[:, len(prompt) - 1:-1].reshape(-1, v), temperature=0.8, top_k=4, top_p=None))
        probs = np.asarray(probs).reshape(len(seqs), new, v)
        return np.prod(np.take_along_axis(probs, seqs[..., None], -1)[..., 0], 1)

    p = exact(target, tparams)
    index = (out.tokens * v ** np.arange(new - 1, -1, -1)).sum(1)
    freq = np.bincount(index, minlength=v ** new) / rows
    tv = 0.5 * np.abs(freq - p).sum()
    assert tv < 0.06, tv  # sampling noise alone: ~0.03 here
    assert 0.5 * np.abs(exact(draft, dparams) - p).sum() > 0.2  # the draft's own is far off


def test_bad_inputs(models):
    target, tparams, draft, dparams, _ = models
    other, oparams = tiny(16, 1, 1, vocab=VOCAB + 1)
    with pytest.raises(InputError, match="vocab_size=65.*vocab_size=64"):
        speculative_generate(target, tparams, other, oparams, PROMPTS, GREEDY)
    with pytest.raises(ConfigError, match="num_draft_tokens must be an integer >= 1"):
        speculative_generate(target, tparams, draft, dparams, PROMPTS, GREEDY, num_draft_tokens=0)
    with pytest.raises(ConfigError, match="num_beams=1"):
        speculative_generate(target, tparams, draft, dparams, PROMPTS, GREEDY.replace(num_beams=2))
    with pytest.raises(ConfigError, match="no_repeat_ngram_size"):
        speculative_generate(target, tparams, draft, dparams, PROMPTS,
                             GREEDY.replace(no_repeat_ngram_size=2))
    with pytest.raises(InputError, match="max_len=128"):
        speculative_generate(target, tparams, draft, dparams, [[1] * 100],
                             GREEDY.replace(max_new_tokens=28), num_draft_tokens=4)
    with pytest.raises(InputError, match="prompt 1 is empty"):
        speculative_generate(target, tparams, draft, dparams, [[1], []], GREEDY)


def _moved(out):
    steps = np.diff(out.draft_k)
    return bool((steps > 0).any()), bool((steps < 0).any())


def test_adaptive_greedy_matches_plain(models):
    """Heuristic k (and the confidence stop) change how much is drafted, never the output."""
    target, tparams, _, _, noisy = models
    ref = generate(target, tparams, PROMPTS, GREEDY)
    out = speculative_generate(target, tparams, target, noisy, PROMPTS, GREEDY,
                               num_draft_tokens=4, draft_schedule="heuristic")
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    np.testing.assert_allclose(out.scores, ref.scores, atol=1e-4)
    assert len(out.draft_k) == out.rounds and out.draft_k.max() <= 4 and out.draft_k.min() >= 1
    assert 1 <= out.mean_draft_tokens < 4
    assert out.draft_calls == out.draft_k.sum()  # no confidence stop: k calls a round
    # batch 1, long enough for k to go down (a rejection) and back up (all accepted)
    cfg = GenerationConfig(max_new_tokens=40, eos_token_id=())
    moved = [False, False]
    for prompt in PROMPTS[:2]:
        ref = generate(target, tparams, [prompt], cfg)
        for extra in ({}, {"draft_confidence": 0.05}):
            out = speculative_generate(target, tparams, target, noisy, [prompt], cfg,
                                       num_draft_tokens=4, draft_schedule="heuristic", **extra)
            np.testing.assert_array_equal(out.tokens, ref.tokens)
            up, down = _moved(out)
            moved = [moved[0] or up, moved[1] or down]
            if extra:
                assert out.draft_calls <= out.draft_k.sum()
    assert moved == [True, True]
    # the confidence stop alone (constant schedule): fewer drafts than k a round
    out = speculative_generate(target, tparams, target, noisy, PROMPTS, GREEDY,
                               num_draft_tokens=4, draft_confidence=0.05)
    np.testing.assert_array_equal(out.tokens, generate(target, tparams, PROMPTS, GREEDY).tokens)
    assert (out.draft_k == 4).all() and out.draft_calls < 4 * out.rounds


def test_adaptive_one_compiled_program(models):
    target, tparams, _, _, noisy = models
    cfg = GenerationConfig(max_new_tokens=40, eos_token_id=())
    kw = dict(num_draft_tokens=4, draft_schedule="heuristic", draft_confidence=0.05)
    before = TRACE_COUNT["speculative"]
    first = speculative_generate(target, tparams, target, noisy, [PROMPTS[0]], cfg, **kw)
    assert TRACE_COUNT["speculative"] - before <= 1  # 0 when an earlier test traced it
    traces = TRACE_COUNT["speculative"]
    with backend_compiles() as counting:
        second = speculative_generate(target, tparams, target, noisy, [PROMPTS[1]], cfg, **kw)
    assert TRACE_COUNT["speculative"] == traces and counting["compiles"] == 0
    assert first.rounds > 3 and second.rounds > 3
    assert any(_moved(first)) and any(_moved(second))  # k moved inside the one program
    assert first.draft_k.tolist() != second.draft_k.tolist()


def test_adaptive_bad_config(models):
    target, tparams, draft, dparams, _ = models
    with pytest.raises(ConfigError, match="unknown draft_schedule 'heuristc'.*heuristic"):
        speculative_generate(target, tparams, draft, dparams, PROMPTS, GREEDY,
                             draft_schedule="heuristc")
    for bad in (0.0, 1.0, 1.5, -0.1, True, "0.5"):
        with pytest.raises(ConfigError, match="draft_confidence must be None or a probability"):
            speculative_generate(target, tparams, draft, dparams, PROMPTS, GREEDY,
                                 draft_confidence=bad)
