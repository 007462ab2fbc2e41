"""mmjax LLaVA (no transformers): shapes, param names and logical axes, where the image
features land, text-only == the Llama alone, the three connectors, input and config errors,
jit, the family record. Parity with transformers is in tests/parity/test_convert_llava.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import ConfigError, InputError
from mmjax.models import build_model, example_inputs, family_of
from mmjax.models.llama import Llama
from mmjax.models.llava import Llava, LlavaConfig, llava_inputs

BASE = LlavaConfig.from_variant("tiny")
CFG = BASE.replace(text=BASE.text.replace(dim=32, mlp_dim=48, vocab_size=64, max_len=64),
                   image_token_index=63)
P = CFG.image_seq_length  # 16 patches of a 16 x 16 image at patch 4


def random_params(model, inputs, seed=0, boxed=False):
    """Random params of the init's shapes without compiling the init (tracing it is enough):
    norm scales around 1, everything else N(0, 0.2)."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)["params"]
    if boxed:
        return shapes
    shapes = nn.meta.unbox(shapes)
    rng = np.random.default_rng(seed)
    leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)
    values = [jnp.asarray((1.0 if "scale" in jax.tree_util.keystr(path) else 0.0)
                          + 0.2 * rng.normal(size=leaf.shape), leaf.dtype) for path, leaf in leaves]
    return jax.tree_util.tree_unflatten(tree, values)


def batch(config=CFG, n_text=(3, 5), seed=0):
    """Two rows, one image each: [text..., P image tokens, text...], the second row left-padded."""
    rng = np.random.default_rng(seed)
    width = max(n_text) + config.image_seq_length
    tokens = np.zeros((2, width), np.int32)
    mask = np.zeros((2, width), bool)
    for i, n in enumerate(n_text):
        words = rng.integers(1, config.image_token_index, size=n)
        image = np.full(config.image_seq_length, config.image_token_index)
        row = np.concatenate([words[:1], image, words[1:]])
        tokens[i, width - len(row):] = row
        mask[i, width - len(row):] = True
    h, w = config.vision.image_hw
    images = rng.normal(size=(2, h, w, config.vision.channels)).astype(np.float32)
    return jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(images)


@pytest.fixture(scope="module")
def setup():
    model = Llava(CFG)
    params = random_params(model, llava_inputs(CFG))
    apply = jax.jit(lambda p, t, i, m: model.apply({"params": p}, t, i, input_mask=m,
                                                   return_intermediates=True))
    return model, params, apply


def test_shapes_intermediates_and_where_features_land(setup):
    model, params, apply = setup
    tokens, mask, images = batch()
    logits, out = apply(params, tokens, images, mask)
    assert logits.shape == (2, tokens.shape[1], CFG.vocab_size) and logits.dtype == jnp.float32
    assert out["image_features"].shape == (2, P, CFG.dim)
    assert out["inputs_embeds"].shape == (2, tokens.shape[1], CFG.dim)
    assert len(out["hidden_states"]) == CFG.text.num_layers + 1
    assert len(out["vision_hidden_states"]) == CFG.vision.num_layers + 1
    assert out["vision_hidden_states"][0].shape == (2, CFG.vision.num_tokens, CFG.vision.dim)
    # row-major: the k-th image slot of the batch holds feature k of the flattened [n * P, dim]
    slots = np.asarray((tokens == CFG.image_token_index) & mask)
    np.testing.assert_array_equal(np.asarray(out["inputs_embeds"])[slots],
                                  np.asarray(out["image_features"]).reshape(-1, CFG.dim))
    # text slots hold the token embeddings
    emb = np.asarray(params["language_model"]["embed"]["embedding"])[np.asarray(tokens)]
    np.testing.assert_array_equal(np.asarray(out["inputs_embeds"])[~slots & np.asarray(mask)],
                                  emb[~slots & np.asarray(mask)])
    # features: layer -2 of the tower without [CLS], through Linear-gelu-Linear
    feats = np.asarray(out["vision_hidden_states"][-2])[:, 1:]
    pj = params["projector"]
    h = feats @ np.asarray(pj["linear_1"]["kernel"]) + np.asarray(pj["linear_1"]["bias"])
    h = np.asarray(jax.nn.gelu(h, approximate=False))
    want = h @ np.asarray(pj["linear_2"]["kernel"]) + np.asarray(pj["linear_2"]["bias"])
    np.testing.assert_allclose(np.asarray(out["image_features"]), want, atol=1e-5)
    # jit == eager
    eager = model.apply({"params": params}, tokens, images, input_mask=mask)
    np.testing.assert_allclose(np.asarray(eager), np.asarray(logits), atol=1e-5)


def test_param_names_and_logical_axes():
    boxed = random_params(Llava(CFG), llava_inputs(CFG), boxed=True)
    assert set(boxed) == {"vision", "projector", "language_model"}
    assert set(boxed["projector"]) == {"linear_1", "linear_2"}
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    assert boxed["projector"]["linear_1"]["kernel"].names == ("embed", "mlp")
    assert boxed["projector"]["linear_1"]["kernel"].value.shape == (CFG.vision.dim, CFG.dim)


def test_text_only_equals_the_llama_alone(setup):
    model, params, _ = setup
    tokens, mask, _ = batch()
    tokens = jnp.where(tokens == CFG.image_token_index, 7, tokens)
    ours = model.apply({"params": params}, tokens, input_mask=mask)
    alone = Llama(CFG.text).apply({"params": params["language_model"]}, tokens, input_mask=mask)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(alone))


def test_image_token_count_mismatch_names_both_counts(setup):
    model, params, _ = setup
    tokens, mask, images = batch()
    with pytest.raises(InputError, match=rf"Image features and image tokens do not match.*{2 * P}.*"
                                         rf"{P}"):
        model.apply({"params": params}, tokens, images[:1], input_mask=mask)
    few = tokens.at[0, -1].set(CFG.image_token_index)  # one image token too many
    with pytest.raises(InputError, match=rf"hold {2 * P + 1} image tokens.*give {2 * P} features"):
        model.apply({"params": params}, few, images, input_mask=mask)
    # under jit only the shapes can tell: more features than token slots
    with pytest.raises(InputError, match="Image features and image tokens do not match"):
        jax.jit(lambda t, i: model.apply({"params": params}, t, i))(tokens[:, :4], images)


def test_wrong_image_size_names_the_expected_one(setup):
    model, params, _ = setup
    tokens, mask, images = batch()
    with pytest.raises(InputError, match="the model takes 16x16"):
        model.apply({"params": params}, tokens, images[:, :8, :8], input_mask=mask)
    with pytest.raises(InputError, match="NCHW"):
        model.apply({"params": params}, tokens, images.transpose(0, 3, 1, 2), input_mask=mask)


@pytest.mark.parametrize("overrides, per_image, names", [
    (dict(connector="linear", vision_feature_layer=(-3, -1), vision_feature_select_strategy="full"),
     17, {"linear"}),
    (dict(connector="resampler", resampler_queries=4, resampler_heads=2), 4, None),
])
def test_other_connectors(overrides, per_image, names):
    config = CFG.replace(**overrides)
    assert config.image_seq_length == per_image
    model = Llava(config)
    params = random_params(model, llava_inputs(config))
    if names:
        assert set(params["projector"]) == names
        assert params["projector"]["linear"]["kernel"].shape == (2 * CFG.vision.dim, CFG.dim)
    else:
        assert set(params["projector"]) == {"resampler"}
    tokens, mask, images = batch(config)
    logits, out = jax.jit(lambda p, t, i, m: model.apply({"params": p}, t, i, input_mask=m,
                                                         return_intermediates=True))(
        params, tokens, images, mask)
    assert out["image_features"].shape == (2, per_image, CFG.dim)
    assert logits.shape == (2, tokens.shape[1], CFG.vocab_size)
    assert np.isfinite(np.asarray(logits)).all()


def test_config_errors_say_what_to_change():
    cases = [
        (dict(image_token_index=64), "image_token_index=64.*vocab_size=64"),
        (dict(vision_feature_layer=3), r"out of range.*\[-3, 2\]"),
        (dict(vision_feature_layer=(-1, 5)), r"\[5\] out of range"),
        (dict(vision_feature_select_strategy="ful"), "did you mean 'full'"),
        (dict(connector="mpl"), "did you mean 'mlp'"),
        (dict(projector_hidden_act="gelux"), "projector_hidden_act"),
        (dict(vision=CFG.vision.replace(num_classes=10)), "num_classes=0"),
        (dict(connector="resampler", resampler_queries=5), "perfect square"),
        (dict(connector="resampler", vision_feature_select_strategy="full", resampler_queries=4),
         "strategy='default'"),
    ]
    for overrides, match in cases:
        with pytest.raises(ConfigError, match=match):
            CFG.replace(**overrides)
    with pytest.raises(ConfigError, match="did you mean"):
        CFG.replace(image_token=3)


def test_config_dicts_family_record_and_lm_properties():
    config = CFG.replace(vision_feature_layer=(-3, -1))
    d = config.to_dict()
    assert LlavaConfig.from_dict(d) == config
    module, built = build_model("llava", d)
    assert built == config and isinstance(module, Llava) and family_of(config) == "llava"
    tokens, image = example_inputs("llava", config)
    assert int((tokens == config.image_token_index).sum()) == config.image_seq_length
    assert image.shape == (1, 16, 16, 3)
    assert (config.vocab_size, config.max_len, config.dim, config.eos_ids) == (64, 64, 32, (2,))
    assert Llava(config).init_cache(2, 10).k[0].shape == (2, 10, CFG.text.kv_heads, CFG.text.head_size)
