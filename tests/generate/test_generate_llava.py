"""`generate(..., prefill_inputs={"images": ...})` with a LLaVA: the images enter the prompt's
prefill only; greedy tokens equal an uncached argmax loop over [prompt with image tokens; tokens
so far] (the image re-encoded every step) for ragged, left-padded prompts; the eager checks run
before the jitted program."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import InputError
from mmjax.generate import GenerationConfig, generate
from mmjax.models.llava import Llava, LlavaConfig, llava_inputs

CFG = LlavaConfig.from_variant("tiny")
CFG = CFG.replace(text=CFG.text.replace(dim=32, mlp_dim=48, vocab_size=64, max_len=64, eos_token_id=None),
                  image_token_index=63)
P = CFG.image_seq_length


def random_params(model, inputs, seed=0):
    """Random params of the init's shapes without compiling the init (tracing it is enough):
    norm scales around 1, everything else N(0, 0.2)."""
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)["params"])
    rng = np.random.default_rng(seed)
    leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)
    values = [jnp.asarray((1.0 if "scale" in jax.tree_util.keystr(path) else 0.0)
                          + 0.2 * rng.normal(size=leaf.shape), leaf.dtype) for path, leaf in leaves]
    return jax.tree_util.tree_unflatten(tree, values)


@pytest.fixture(scope="module")
def setup():
    model = Llava(CFG)
    params = random_params(model, llava_inputs(CFG))
    h, w = CFG.vision.image_hw
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, h, w, 3)), jnp.float32)
    return model, params, images


def _prompt(before, after):
    return list(before) + [CFG.image_token_index] * P + list(after)


WIDTH = 32  # every reference sequence is right-padded to this (one jitted program)


@jax.jit
def _last_logits(params, toks, image, length):
    logits = Llava(CFG).apply({"params": params}, toks[None], image[None])
    return logits[0, length - 1]


def _reference(model, params, image, prompt, n_new):
    """Uncached greedy for one row: the whole right-padded sequence re-run for every token (causal
    attention: the padding after the real tokens changes nothing before it)."""
    last_logits = functools.partial(_last_logits, params, image=image)

    toks = np.zeros(WIDTH, np.int32)
    toks[:len(prompt)] = prompt
    length = len(prompt)
    for _ in range(n_new):
        toks[length] = int(jnp.argmax(last_logits(jnp.asarray(toks), length=length)))
        length += 1
    return toks[len(prompt):length].tolist()


def test_greedy_with_images_equals_the_uncached_loop(setup):
    model, params, images = setup
    prompts = [_prompt([1, 5], [9, 11, 2]), _prompt([1], [7])]  # ragged: row 1 is left-padded
    gen = GenerationConfig(max_new_tokens=5, prompt_bucket=8)
    out = generate(model, params, prompts, gen, prefill_inputs={"images": images})
    assert out.tokens.shape == (2, 5)
    for row, prompt in enumerate(prompts):
        assert out.tokens[row].tolist() == _reference(model, params, images[row], prompt, 5), row
    # the image matters: other pixels, other continuation
    flipped = generate(model, params, prompts, gen, prefill_inputs={"images": images[::-1]})
    assert flipped.tokens.tolist() != out.tokens.tolist()


def test_prefill_inputs_are_checked_before_the_program(setup):
    model, params, images = setup
    gen = GenerationConfig(max_new_tokens=2, prompt_bucket=8)
    short = [_prompt([1], [3])[:-2], _prompt([1], [4])]  # row 0 lost one image token
    with pytest.raises(InputError, match=rf"Image features and image tokens do not match.*{2 * P - 1}"
                                         rf".*{2 * P}"):
        generate(model, params, short, gen, prefill_inputs={"images": images})
    with pytest.raises(InputError, match="the model takes 16x16"):
        generate(model, params, [_prompt([1], [3])], gen, prefill_inputs={"images": images[:1, :8, :8]})
