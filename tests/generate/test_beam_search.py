"""Beam search against Hugging Face `generate(num_beams=...)` on the same weights.

A random tiny `LlamaForCausalLM` is saved and converted with `mmjax.convert.from_hf`; both sides
then decode the same prompts. The mmjax side runs the three ragged prompts as ONE left-padded
batch, the reference one prompt at a time, so agreement also shows that padding and the per-row
bookkeeping (finished sets, cache gathers) do not leak between rows. Compared: the best
hypothesis' tokens (up to and including its EOS) and its length-normalised score
(`sequences_scores`). EOS ids are taken from a free-running reference search, so hypotheses
really do finish at different steps; the cases cover length_penalty > 0, = 0 and < 0, several
EOS ids, and no_repeat_ngram_size.
"""

import tempfile

import numpy as np
import pytest

from mmjax.generate import GenerationConfig, generate

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = [[1, 5, 9, 33, 40], [1, 7], [1, 8, 8, 8, 8, 9, 10, 11, 12]]
NEW = 10


@pytest.fixture(scope="module")
def pair():
    from mmjax.convert import from_hf

    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, attn_implementation="eager", bos_token_id=1,
        eos_token_id=None, pad_token_id=0,
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        module, params = from_hf(tmp)
    return hf, module, params


def hf_beam(hf, prompt, *, num_beams, length_penalty, eos, no_repeat_ngram_size=0):
    """(new tokens, sequences_score) of transformers' beam search for one unpadded prompt."""
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False, num_beams=num_beams, length_penalty=length_penalty,
            max_new_tokens=NEW, eos_token_id=list(eos) if eos else None, pad_token_id=0,
            early_stopping=False, no_repeat_ngram_size=no_repeat_ngram_size,
            output_scores=True, return_dict_in_generate=True,
        )
    return out.sequences[0, len(prompt):].tolist(), float(out.sequences_scores[0])


@pytest.fixture(scope="module")
def eos_choices(pair):
    """Token ids that the free-running reference search emits early (so EOS really triggers)."""
    hf, _, _ = pair
    free = [hf_beam(hf, p, num_beams=3, length_penalty=1.0, eos=())[0] for p in PROMPTS]
    return free[0][2], free[1][4], free[2][1]


def assert_matches_hf(pair, cfg):
    hf, module, params = pair
    ours = generate(module, params, PROMPTS, cfg)
    finished_early = 0
    for i, prompt in enumerate(PROMPTS):
        ref_tokens, ref_score = hf_beam(
            hf, prompt, num_beams=cfg.num_beams, length_penalty=cfg.length_penalty,
            eos=cfg.eos_token_id, no_repeat_ngram_size=cfg.no_repeat_ngram_size)
        n = int(ours.lengths[i])
        # HF pads a short winner with pad_token_id (0 here) up to the longest returned row
        assert ours.tokens[i, :n].tolist() == ref_tokens[:n], (i, ours.tokens[i], ref_tokens)
        assert all(t == 0 for t in ref_tokens[n:]) and all(t == 0 for t in ours.tokens[i, n:])
        np.testing.assert_allclose(ours.scores[i], ref_score, rtol=2e-5, atol=2e-5)
        finished_early += n < NEW
    return finished_early


def test_beam_without_eos_matches_hf(pair):
    assert_matches_hf(pair, GenerationConfig(max_new_tokens=NEW, num_beams=3, eos_token_id=()))


@pytest.mark.parametrize("num_beams,length_penalty", [(2, 1.0), (4, 0.0), (3, -0.5), (4, 2.0)])
def test_beam_with_eos_matches_hf(pair, eos_choices, num_beams, length_penalty):
    cfg = GenerationConfig(max_new_tokens=NEW, num_beams=num_beams, length_penalty=length_penalty,
                           eos_token_id=eos_choices[:1] if num_beams != 4 else eos_choices[1:])
    assert_matches_hf(pair, cfg)


def test_eos_really_finishes_hypotheses_in_these_cases(pair, eos_choices):
    cfg = GenerationConfig(max_new_tokens=NEW, num_beams=4, length_penalty=0.0,
                           eos_token_id=eos_choices)
    assert assert_matches_hf(pair, cfg) >= 1, "no row finished before max_new_tokens"


@pytest.mark.parametrize("ngram", [1, 2])
def test_beam_with_no_repeat_ngram_matches_hf(pair, eos_choices, ngram):
    """n = 1 bans every token already seen (prompt included) at every step, so the banned
    tokens' probability mass is always in play: scores must stay the model's own log-probs
    (bans are -inf, the rest is not renormalised), as in HF."""
    cfg = GenerationConfig(max_new_tokens=NEW, num_beams=3, eos_token_id=eos_choices[1:],
                           no_repeat_ngram_size=ngram)
    assert_matches_hf(pair, cfg)
