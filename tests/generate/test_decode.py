"""The greedy/sampling loop against Hugging Face on the same weights, and its input handling.

`test_generate.py` checks greedy decoding against mmjax's own full forward pass; here the
reference is transformers (`LlamaForCausalLM.generate` and its forward pass) on a converted random
tiny model. mmjax decodes the ragged prompts as one left-padded batch, the reference one prompt
at a time.
"""

import tempfile

import jax
import numpy as np
import pytest

from mmjax.errors import InputError
from mmjax.generate import GenerationConfig, generate
from mmjax.generate.loop import TRACE_COUNT

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = [[1, 5, 9, 33, 40, 5, 9], [1, 7], [1, 8, 8, 8, 8, 9, 10, 11, 12]]
NEW = 12
MAX_LEN = 128


@pytest.fixture(scope="module")
def pair():
    from mmjax.convert import from_hf

    torch.manual_seed(1)
    hf_config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LEN,
        tie_word_embeddings=False, attn_implementation="eager", bos_token_id=1,
        eos_token_id=None, pad_token_id=0,
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        module, params = from_hf(tmp)
    assert module.config.max_len == MAX_LEN
    return hf, module, params


def hf_greedy(hf, prompt, n=NEW, no_repeat_ngram_size=0):
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False, num_beams=1, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
            pad_token_id=0, no_repeat_ngram_size=no_repeat_ngram_size)
    return out[0, len(prompt):].tolist()


def hf_logprob_sum(hf, prompt, new_tokens):
    """Sum of log p(new token | everything before it) from one HF forward pass (no cache)."""
    seq = torch.tensor([list(prompt) + list(new_tokens)])
    with torch.no_grad():
        logp = torch.log_softmax(hf(seq).logits[0].double(), -1)
    return sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(new_tokens))


@pytest.mark.parametrize("ngram", [0, 1, 2])
def test_greedy_matches_hf_and_scores_are_model_log_probs(pair, ngram):
    hf, module, params = pair
    cfg = GenerationConfig(max_new_tokens=NEW, eos_token_id=(), no_repeat_ngram_size=ngram)
    out = generate(module, params, PROMPTS, cfg)
    assert out.lengths.tolist() == [NEW] * len(PROMPTS)
    for prompt, row, score in zip(PROMPTS, out.tokens, out.scores):
        assert row.tolist() == hf_greedy(hf, prompt, no_repeat_ngram_size=ngram)
        # scores: the model's log-probs of the chosen tokens, n-gram bans not renormalised away
        np.testing.assert_allclose(score, hf_logprob_sum(hf, prompt, row.tolist()), rtol=1e-4)
    if ngram == 1:
        for prompt, row in zip(PROMPTS, out.tokens):
            assert len(set(prompt) | set(row.tolist())) == len(set(prompt)) + NEW


def test_top_k_1_sampling_is_greedy(pair):
    _, module, params = pair
    greedy = generate(module, params, PROMPTS,
                      GenerationConfig(max_new_tokens=NEW, eos_token_id=()))
    sampled = generate(module, params, PROMPTS, GenerationConfig(
        max_new_tokens=NEW, eos_token_id=(), temperature=1.3, top_k=1), rng=jax.random.key(3))
    np.testing.assert_array_equal(sampled.tokens, greedy.tokens)
    np.testing.assert_allclose(sampled.scores, greedy.scores, rtol=1e-6)


def test_padded_array_prompts_equal_list_prompts(pair):
    _, module, params = pair
    cfg = GenerationConfig(max_new_tokens=NEW, eos_token_id=())
    width = 10  # not a bucket multiple: generate re-buckets it
    tokens = np.zeros((len(PROMPTS), width), np.int32)
    mask = np.zeros((len(PROMPTS), width), bool)
    for i, p in enumerate(PROMPTS):
        tokens[i, width - len(p):], mask[i, width - len(p):] = p, True
    from_lists = generate(module, params, PROMPTS, cfg)
    from_arrays = generate(module, params, (tokens, mask), cfg)
    np.testing.assert_array_equal(from_arrays.tokens, from_lists.tokens)
    with pytest.raises(InputError, match="left-padded"):
        generate(module, params, (tokens[:, ::-1], mask[:, ::-1]), cfg)
    with pytest.raises(InputError, match=r"\[batch, seq\]"):
        generate(module, params, (tokens, mask[:, 1:]), cfg)


def test_eos_ids_as_a_list_stop_rows(pair):
    _, module, params = pair
    free = generate(module, params, PROMPTS,
                    GenerationConfig(max_new_tokens=NEW, eos_token_id=()))
    eos = [int(free.tokens[0, 3]), int(free.tokens[2, 6])]
    out = generate(module, params, PROMPTS, GenerationConfig(max_new_tokens=NEW, eos_token_id=eos,
                                                             pad_token_id=0))
    for free_row, row, n in zip(free.tokens.tolist(), out.tokens.tolist(), out.lengths):
        hits = [j for j, t in enumerate(free_row) if t in eos]
        n_expected = hits[0] + 1 if hits else NEW
        assert n == n_expected and row[:n] == free_row[:n] and row[n:] == [0] * (NEW - n)
    assert out.lengths[0] <= 4 and out.lengths[2] <= 7


def test_only_real_tokens_count_against_max_len(pair):
    """The cache holds bucket + max_new_tokens slots, but positions count real tokens only: a
    bucket wider than the room left is fine; a real prompt that leaves no room is not."""
    hf, module, params = pair
    prompt = [1] + [int(t) for t in np.random.default_rng(0).integers(3, 64, size=99)]  # 100 tokens
    cfg = GenerationConfig(max_new_tokens=8, eos_token_id=(), prompt_bucket=64)  # bucket 128 + 8
    out = generate(module, params, [prompt, [1, 7]], cfg)
    assert out.tokens[0].tolist() == hf_greedy(hf, prompt, n=8)
    too_long = r"120 tokens \+ max_new_tokens=9 exceeds the model's max_len=128"
    with pytest.raises(InputError, match=too_long):
        generate(module, params, [[1] * 120], cfg.replace(max_new_tokens=9))
    with pytest.raises(InputError, match="token id 64 is outside the vocabulary"):
        generate(module, params, [[1, 64]], cfg)


def test_one_program_per_bucket_for_lengths_and_seeds(pair):
    _, module, params = pair
    cfg = GenerationConfig(max_new_tokens=6, temperature=0.9, top_p=0.9, eos_token_id=(),
                           prompt_bucket=8)
    before = TRACE_COUNT["decode"]
    outs = [generate(module, params, [p], cfg, rng=jax.random.key(seed))
            for seed, p in enumerate([[1, 2], [1, 2, 3, 4, 5], [1] * 8])]
    assert TRACE_COUNT["decode"] == before + 1  # three prompt lengths, three seeds, one trace
    again = generate(module, params, [[1, 2]], cfg, rng=jax.random.key(0))
    np.testing.assert_array_equal(again.tokens, outs[0].tokens)
    assert TRACE_COUNT["decode"] == before + 1
