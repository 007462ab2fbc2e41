"""`generate` after a prefix of input embeddings (soft prompt / image features): the jitted
cached loop's greedy tokens equal an uncached argmax loop over [prefix; prompt; tokens so far]
with the same mask_ar, for ragged (left-padded) prompts, bidirectional and causal prefixes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import InputError
from mmjax.generate import GenerationConfig, generate
from mmjax.generate.loop import TRACE_COUNT
from mmjax.models.llama import Llama, LlamaConfig

CFG = LlamaConfig.from_variant("tiny", vocab_size=48, dim=32, num_heads=4, num_kv_heads=2,
                               mlp_dim=48, max_len=48, eos_token_id=None)


@pytest.fixture(scope="module")
def setup():
    model = Llama(CFG)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
    prefix = jnp.asarray(np.random.default_rng(0).normal(0, 1.0, (2, 3, CFG.dim)), jnp.float32)
    return model, params, prefix


def _reference(model, params, prefix, prompt, n_new, bidirectional):
    """Uncached greedy: the whole sequence re-run for every new token (one row). The sequence
    is right-padded to a fixed length so one jitted program serves every step: padding comes
    after every real position and sits in later causal blocks, so it changes nothing before it."""
    n = prefix.shape[0]
    width = n + len(prompt) + n_new

    @jax.jit
    def last_logits(toks, length):
        emb = model.apply({"params": params}, toks[None], method="embed_tokens")
        x = jnp.concatenate([prefix[None], emb], axis=1)
        ar = jnp.asarray([[0 if bidirectional else 1] * n + [1] * (width - n)])
        logits = model.apply({"params": params}, embeddings=x, mask_ar=ar)
        return logits[0, n + length - 1]

    toks = np.zeros(width - n, np.int32)
    toks[:len(prompt)] = prompt
    length = len(prompt)
    for _ in range(n_new):
        toks[length] = int(jnp.argmax(last_logits(jnp.asarray(toks), length)))
        length += 1
    return toks[len(prompt):length].tolist()


@pytest.mark.parametrize("bidirectional", [True, False])
def test_greedy_after_a_prefix_equals_the_uncached_loop(setup, bidirectional):
    model, params, prefix = setup
    prompts = [[5, 9, 11, 2], [7]]  # ragged: the second row is left-padded after its prefix
    gen = GenerationConfig(max_new_tokens=6, prompt_bucket=8)
    out = generate(model, params, prompts, gen, prefix_embeddings=prefix,
                   prefix_bidirectional=bidirectional)
    for row, prompt in enumerate(prompts):
        want = _reference(model, params, prefix[row], prompt, 6, bidirectional)
        assert out.tokens[row].tolist() == want, (row, out.tokens[row], want)
    # the prefix matters: without it the continuation differs
    plain = generate(model, params, prompts, gen)
    assert plain.tokens.tolist() != out.tokens.tolist()


def test_one_compiled_program_per_bucket_and_clear_errors(setup):
    model, params, prefix = setup
    gen = GenerationConfig(max_new_tokens=3, prompt_bucket=8)
    generate(model, params, [[1, 2]], gen, prefix_embeddings=prefix[:1])
    before = TRACE_COUNT["decode"]
    generate(model, params, [[3, 4, 5]], gen, prefix_embeddings=prefix[1:] * 0.5)
    assert TRACE_COUNT["decode"] == before
    with pytest.raises(InputError, match="prefix_embeddings must be"):
        generate(model, params, [[1, 2]], gen, prefix_embeddings=prefix)  # batch 2 vs 1 prompt
    with pytest.raises(InputError, match="beam search"):
        generate(model, params, [[1, 2]], gen.replace(num_beams=2), prefix_embeddings=prefix[:1])
    with pytest.raises(InputError, match="prefix of 3 embeddings"):
        generate(model, params, [[1] * 40], gen.replace(max_new_tokens=8, prompt_bucket=1),
                 prefix_embeddings=prefix[:1])
