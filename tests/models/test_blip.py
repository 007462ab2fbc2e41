"""BLIP model: shapes of every method, the param tree, cached decoding equal to the full
forward pass (and the BERT KV cache it uses), config validation, the family record."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import ConfigError, InputError
from mmjax.models import build_model, family_of
from mmjax.models.bert import Bert, BertConfig
from mmjax.models.blip import Blip, BlipConfig, blip_inputs


@pytest.fixture(scope="module")
def models():
    out = {}
    for name in ("tiny", "tiny-retrieval"):
        config = BlipConfig.from_variant(name)
        module = Blip(config)
        out[name] = (module, nn.unbox(module.init(jax.random.key(0), *blip_inputs(config))["params"]))
    return out


def _images(n):
    return jnp.asarray(np.random.default_rng(0).normal(size=(n, 16, 16, 3)), jnp.float32)


def test_caption_shapes_and_param_tree(models):
    module, params = models["tiny"]
    assert set(params) == {"vision", "text_decoder", "lm_transform", "lm_norm", "lm_bias"}
    tokens = jnp.array([[126, 5, 6, 7], [126, 8, 0, 0]])
    mask = tokens != 0
    logits, out = module.apply({"params": params}, tokens, _images(2), input_mask=mask, return_intermediates=True)
    assert logits.shape == (2, 4, 128) and out["image_embeds"].shape == (2, 17, 32)
    assert len(out["vision_hidden_states"]) == 3 and len(out["text_hidden_states"]) == 3
    same = module.apply({"params": params}, _images(2), tokens, mask, method="caption_logits")
    np.testing.assert_array_equal(np.asarray(same), np.asarray(logits))
    embeds = module.apply({"params": params}, _images(2), method="encode_image")
    np.testing.assert_allclose(np.asarray(embeds), np.asarray(out["image_embeds"]), atol=1e-6)


def test_cached_decoding_equals_full_forward(models):
    module, params = models["tiny"]
    images = _images(2)
    tokens = jnp.array([[126, 5, 6, 7, 9], [126, 8, 3, 2, 4]])
    full = module.apply({"params": params}, tokens, images)
    # a left-padded prompt of 3 (row 1 has 2 real tokens), then one token at a time
    prompt = jnp.array([[126, 5, 6], [0, 126, 8]])
    pmask = jnp.array([[True] * 3, [False, True, True]])
    cache = module.init_cache(2, 8)
    logits, cache = module.apply({"params": params}, prompt, images, input_mask=pmask, cache=cache)
    np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(full[0, :3]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits[1, 1:]), np.asarray(full[1, :2]), atol=1e-5)
    step, cache = module.apply({"params": params}, jnp.array([[7], [3]]), cache=cache)
    np.testing.assert_allclose(np.asarray(step[0, 0]), np.asarray(full[0, 3]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(step[1, 0]), np.asarray(full[1, 2]), atol=1e-5)


def test_bert_cache_matches_causal_forward():
    config = BertConfig.from_variant("tiny-decoder")
    bert = Bert(config)
    ctx = jnp.ones((1, 3, 48))
    tokens = jnp.array([[3, 4, 5, 6]])
    params = bert.init(jax.random.key(1), tokens, None, None, ctx)["params"]
    full = bert.apply({"params": params}, tokens, encoder_hidden_states=ctx)
    h, cache = bert.apply({"params": params}, tokens[:, :2], cache=bert.init_cache(1, 6), encoder_hidden_states=ctx)
    h2, cache = bert.apply({"params": params}, tokens[:, 2:], cache=cache, encoder_hidden_states=ctx)
    np.testing.assert_allclose(np.concatenate([h, h2], 1), np.asarray(full), atol=1e-5)
    with pytest.raises(ConfigError, match="causal"):
        Bert(BertConfig.from_variant("tiny")).init_cache(1, 4)


def test_retrieval_heads(models):
    module, params = models["tiny-retrieval"]
    assert set(params) == {"vision", "text_encoder", "vision_proj", "text_proj", "itm_head"}
    tokens = jnp.array([[1, 5, 6, 7], [1, 8, 0, 0], [1, 9, 9, 0]])
    mask = tokens != 0
    image_feat, text_feat, sim = module.apply({"params": params}, _images(2), tokens, mask, method="itc")
    assert sim.shape == (2, 3)
    np.testing.assert_allclose(np.asarray(sim), np.asarray(image_feat @ text_feat.T), atol=1e-6)
    itm = module.apply({"params": params}, _images(3), tokens, mask, method="itm_logits")
    assert itm.shape == (3, 2)
    with pytest.raises(InputError, match="images"):
        module.apply({"params": params}, _images(2), tokens, mask, method="itm_logits")
    with pytest.raises(ConfigError, match="retrieval"):
        models["tiny"][0].apply({"params": models["tiny"][1]}, _images(1), tokens[:1], method="itc")


@pytest.mark.parametrize("change, needle", [
    (dict(task="vqa"), "task"),
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
