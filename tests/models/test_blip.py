"""BLIP model: shapes of every method, the param tree, cached decoding equal to the full
forward pass (and the BERT KV cache it uses), config validation, the family record.

Every program is jitted once per (model, method, static flags) and reused across tests: the
eager op-by-op dispatch of these tiny models cost most of this file's time."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import ConfigError, InputError
from mmjax.models import build_model, family_of
from mmjax.models.bert import Bert, BertConfig
from mmjax.models.blip import Blip, BlipConfig, blip_inputs


@functools.lru_cache(maxsize=None)
def _jitted(module, method=None, **static):
    """module.apply({"params": p}, *args, **kwargs, **static) as one jitted program per
    (module, method, static keyword flags); array arguments are traced."""
    def run(params, *args, **kwargs):
        return module.apply({"params": params}, *args, **kwargs, **static,
                            **({} if method is None else {"method": method}))
    return jax.jit(run)


def _apply(module, params, *args, method=None, static=(), **kwargs):
    return _jitted(module, method, **dict(static))(params, *args, **kwargs)


def _random_params(module, *inputs, seed=0):
    """Params of `module.init(rng, *inputs)` drawn with numpy from the abstract init (no init
    program is run: tracing it is all it costs): norm scales around 1, the rest N(0, 0.05^2)."""
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(seed), *inputs)["params"])
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        x = rng.normal(size=leaf.shape).astype(leaf.dtype)
        scale = any(getattr(k, "key", None) == "scale" for k in path)
        return jnp.asarray(1.0 + 0.1 * x if scale else 0.05 * x)
    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def models():
    out = {}
    for name in ("tiny", "tiny-retrieval"):
        config = BlipConfig.from_variant(name)
        module = Blip(config)
        out[name] = (module, _random_params(module, *blip_inputs(config)))
    return out


def _images(n):
    return jnp.asarray(np.random.default_rng(0).normal(size=(n, 16, 16, 3)), jnp.float32)


def test_caption_shapes_and_param_tree(models):
    module, params = models["tiny"]
    assert set(params) == {"vision", "text_decoder", "lm_transform", "lm_norm", "lm_bias"}
    tokens = jnp.array([[126, 5, 6, 7], [126, 8, 0, 0]])
    mask = tokens != 0
    logits, out = _apply(module, params, tokens, _images(2), input_mask=mask, static={"return_intermediates": True})
    assert logits.shape == (2, 4, 128) and out["image_embeds"].shape == (2, 17, 32)
    assert len(out["vision_hidden_states"]) == 3 and len(out["text_hidden_states"]) == 3
    # caption_logits is the plain call (one traced graph: bitwise equal); the call that also
    # returns intermediates is another XLA program (fusion may differ by an ulp)
    plain = _apply(module, params, tokens, _images(2), input_mask=mask)
    same = _apply(module, params, _images(2), tokens, mask, method="caption_logits")
    np.testing.assert_array_equal(np.asarray(same), np.asarray(plain))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(plain), atol=1e-6)
    embeds = _apply(module, params, _images(2), method="encode_image")
    np.testing.assert_allclose(np.asarray(embeds), np.asarray(out["image_embeds"]), atol=1e-6)


def test_cached_decoding_equals_full_forward(models):
    module, params = models["tiny"]
    images = _images(2)
    tokens = jnp.array([[126, 5, 6, 7, 9], [126, 8, 3, 2, 4]])
    full = _apply(module, params, tokens, images)
    # a left-padded prompt of 3 (row 1 has 2 real tokens), then one token at a time
    prompt = jnp.array([[126, 5, 6], [0, 126, 8]])
    pmask = jnp.array([[True] * 3, [False, True, True]])
    cache = module.init_cache(2, 8)
    logits, cache = _apply(module, params, prompt, images, input_mask=pmask, cache=cache)
    np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(full[0, :3]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits[1, 1:]), np.asarray(full[1, :2]), atol=1e-5)
    step, cache = _apply(module, params, jnp.array([[7], [3]]), cache=cache)
    np.testing.assert_allclose(np.asarray(step[0, 0]), np.asarray(full[0, 3]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(step[1, 0]), np.asarray(full[1, 2]), atol=1e-5)


def test_vqa_cached_answer_equals_full_forward(models):
    config = BlipConfig.from_variant("tiny-vqa")
    module = Blip(config)
    params = _random_params(module, *blip_inputs(config))
    assert set(params) == {"vision", "text_encoder", "text_decoder", "lm_transform", "lm_norm", "lm_bias"}
    images = _images(2)
    question = jnp.array([[1, 5, 6, 7], [1, 8, 0, 0]])
    qmask = question != 0
    answer = jnp.array([[126, 5, 6, 9], [126, 8, 3, 2]])
    full = _apply(module, params, images, question, answer, qmask, method="vqa_logits")
    assert full.shape == (2, 4, 128)
    q = _apply(module, params, images, question, qmask, method="encode_question")
    assert q.shape == (2, 4, 48)
    logits, cache = _apply(module, params, answer[:, :2], images, question=question, question_mask=qmask,
                           cache=module.init_cache(2, 8))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, :2]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(cache.image_embeds), np.asarray(q), atol=1e-6)
    step, cache = _apply(module, params, answer[:, 2:3], cache=cache)
    np.testing.assert_allclose(np.asarray(step[:, 0]), np.asarray(full[:, 2]), atol=1e-5)
    with pytest.raises(ConfigError, match="vqa"):
        _apply(*models["tiny"], images, question, qmask, method="encode_question")


def test_bert_cache_matches_causal_forward():
    config = BertConfig.from_variant("tiny-decoder")
    bert = Bert(config)
    ctx = jnp.ones((1, 3, 48))
    tokens = jnp.array([[3, 4, 5, 6]])
    params = _random_params(bert, tokens, None, None, ctx, seed=1)
    full = _apply(bert, params, tokens, encoder_hidden_states=ctx)
    h, cache = _apply(bert, params, tokens[:, :2], cache=bert.init_cache(1, 6), encoder_hidden_states=ctx)
    h2, cache = _apply(bert, params, tokens[:, 2:], cache=cache, encoder_hidden_states=ctx)
    np.testing.assert_allclose(np.concatenate([h, h2], 1), np.asarray(full), atol=1e-5)
    with pytest.raises(ConfigError, match="causal"):
        Bert(BertConfig.from_variant("tiny")).init_cache(1, 4)


def test_retrieval_heads(models):
    module, params = models["tiny-retrieval"]
    assert set(params) == {"vision", "text_encoder", "vision_proj", "text_proj", "itm_head"}
    tokens = jnp.array([[1, 5, 6, 7], [1, 8, 0, 0], [1, 9, 9, 0]])
    mask = tokens != 0
    image_feat, text_feat, sim = _apply(module, params, _images(2), tokens, mask, method="itc")
    assert sim.shape == (2, 3)
    np.testing.assert_allclose(np.asarray(sim), np.asarray(image_feat @ text_feat.T), atol=1e-6)
    itm = _apply(module, params, _images(3), tokens, mask, method="itm_logits")
    assert itm.shape == (3, 2)
    with pytest.raises(InputError, match="images"):
        _apply(module, params, _images(2), tokens, mask, method="itm_logits")
    with pytest.raises(ConfigError, match="retrieval"):
        _apply(*models["tiny"], _images(1), tokens[:1], method="itc")


@pytest.mark.parametrize("change, needle", [
    (dict(task="nlvr"), "task"),
    (dict(task="vqa"), "text.dim == vision.dim"),
    (dict(task="retrieval"), "causal"),
    (dict(bos_token_id=500), "bos_token_id"),
    (dict(embed_dim=0), "embed_dim"),
])
def test_config_errors(change, needle):
    with pytest.raises(ConfigError, match=needle):
        BlipConfig.from_variant("tiny", **change)


def test_config_errors_on_towers():
    c = BlipConfig.from_variant("tiny")
    with pytest.raises(ConfigError, match="encoder_width"):
        c.replace(text=c.text.replace(encoder_width=48))
    with pytest.raises(ConfigError, match="pre_norm"):
        c.replace(vision=c.vision.replace(pre_norm=True))


def test_family_record_and_dict_round_trip():
    c = BlipConfig.from_variant("tiny-retrieval")
    assert family_of(c) == "blip"
    assert isinstance(build_model("blip", c)[0], Blip)
    assert BlipConfig.from_dict(c.to_dict()) == c
    assert c.eos_ids == (c.sep_token_id,) and c.max_len == c.text.max_len
