"""mmjax ViT and CLIP models on their own (no PyTorch): shapes, named intermediates, logical
axis names, patch embedding = strided convolution, pooling, text-tower causality and EOS
pooling, the contrastive logits, configs, and clear errors for bad input."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import ConfigError, InputError, MmjaxError
from mmjax.models import build_model
from mmjax.models.clip import CLIP, CLIPConfig, clamp_logit_scale
from mmjax.models.vit import ViT, ViTConfig, sincos2d_positions

RNG = jax.random.PRNGKey(0)


def images(batch=2, h=32, w=32, c=3, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, h, w, c)), jnp.float32)


@pytest.fixture(scope="module")
def vit():
    config = ViTConfig.from_variant("tiny", num_classes=5)
    model = ViT(config)
    variables = jax.jit(model.init)(RNG, images())
    return model, variables


@pytest.fixture(scope="module")
def clip():
    config = CLIPConfig.from_variant("tiny")
    model = CLIP(config)
    tokens = text_tokens(config)
    variables = jax.jit(model.init)(RNG, images(), tokens)
    return model, nn.unbox(variables["params"]), variables


def text_tokens(config, batch=2, seq=12, seed=1):
    """Random ids without EOS, EOS at a different place per row, zeros (padding) after it."""
    t = config.text
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, t.eos_token_id, size=(batch, seq))
    for i in range(batch):
        end = seq - 1 - 3 * i
        tokens[i, end] = t.eos_token_id
        tokens[i, end + 1:] = t.pad_token_id
    return jnp.asarray(tokens, jnp.int32)


def test_vit_outputs_and_intermediates(vit):
    model, variables = vit
    c = model.config
    logits, out = model.apply(variables, images(), return_intermediates=True)
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32
    assert len(out["hidden_states"]) == c.num_layers + 1
    assert all(h.shape == (2, c.num_tokens, c.dim) for h in out["hidden_states"])
    assert c.num_tokens == 17  # 16 patches + [CLS]
    # cls pooling reads token 0 of the final-normed sequence
    np.testing.assert_array_equal(out["pooled"], out["final_hidden"][:, 0])
    np.testing.assert_array_equal(logits, out["logits"])


def test_every_param_has_logical_axis_names(vit, clip):
    for variables in (vit[1], clip[2]):
        leaves = jax.tree_util.tree_leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
        assert leaves
        for leaf in leaves:
            assert isinstance(leaf, nn.Partitioned), type(leaf)
            assert len(leaf.names) == leaf.value.ndim


def test_param_count_matches_config(vit, clip):
    plain = nn.unbox(vit[1]["params"])
    assert sum(x.size for x in jax.tree_util.tree_leaves(plain)) == vit[0].config.num_params()
    gap = ViTConfig.from_variant("tiny", pool="gap", class_token=False, posemb="sincos2d", representation=48,
                                 num_classes=3, qkv_bias=False, patch_bias=False)
    shapes = jax.eval_shape(lambda r: ViT(gap).init(r, images())["params"], RNG)  # no compute
    assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.unbox(shapes))) == gap.num_params()


def test_patch_embedding_is_a_strided_convolution(vit):
    """The reshape + Dense patch embedding equals a stride-p convolution with the same kernel."""
    model, variables = vit
    c = model.config
    p = nn.unbox(variables["params"])
    x = images()
    kernel = p["patch_embed"]["kernel"].reshape(8, 8, 3, c.dim)  # HWIO
    conv = jax.lax.conv_general_dilated(x, kernel, (8, 8), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision="highest")
    conv = conv.reshape(2, 16, c.dim) + p["patch_embed"]["bias"]
    expected = conv + p["pos_embedding"]["embedding"][1:]
    with jax.default_matmul_precision("highest"):
        _, out = model.apply(variables, x, return_intermediates=True)
    np.testing.assert_allclose(out["hidden_states"][0][:, 1:], expected, atol=1e-5)
    np.testing.assert_allclose(out["hidden_states"][0][:, 0], np.broadcast_to(
        p["cls"] + p["pos_embedding"]["embedding"][0], (2, c.dim)), atol=1e-6)


def test_gap_pooling_and_sincos_positions():
    c = ViTConfig.from_variant("tiny", pool="gap", class_token=False, posemb="sincos2d")
    model = ViT(c)
    variables = model.init(RNG, images())
    feats, out = model.apply(variables, images(), return_intermediates=True)
    assert feats.shape == (2, 64) and c.num_tokens == 16
    np.testing.assert_allclose(feats, out["final_hidden"].mean(axis=1), atol=1e-6)
    pe = sincos2d_positions(4, 4, 64)
    assert pe.shape == (16, 64)
    # position (0, 0): sin(0) = 0, cos(0) = 1 in each quarter; rows are all distinct
    np.testing.assert_allclose(pe[0], np.repeat([0.0, 1.0, 0.0, 1.0], 16))
    assert len({tuple(np.round(r, 6)) for r in pe}) == 16
    # the x quarter depends only on the column, the y quarter only on the row
    grid = pe.reshape(4, 4, 64)
    np.testing.assert_allclose(grid[0, :, :16], grid[3, :, :16])
    np.testing.assert_allclose(grid[:, 0, 32:48], grid[:, 2, 32:48])


def test_non_square_images_and_variants():
    c = ViTConfig(image_size=(24, 40), patch_size=8, dim=32, num_layers=1, num_heads=2, mlp_dim=64)
    assert c.grid == (3, 5) and c.num_tokens == 16
    model = ViT(c)
    x = images(1, 24, 40)
    feats = jax.jit(model.apply)(jax.jit(model.init)(RNG, x), x)
    assert feats.shape == (1, 32)
    b16 = ViTConfig.from_variant("B/16")
    assert (b16.dim, b16.num_layers, b16.num_heads, b16.mlp_dim, b16.patch_size) == (768, 12, 12, 3072, 16)
    assert ViTConfig.from_variant("L/14").num_layers == 24
    with pytest.raises(ConfigError, match="unknown ViT variant"):
        ViTConfig.from_variant("X/16")


@pytest.mark.parametrize("bad, match", [
    (jnp.zeros((32, 32, 3)), "batch, height, width, channels"),
    (jnp.zeros((2, 3, 32, 32)), "NCHW"),
    (jnp.zeros((2, 48, 48, 3)), "48x48, the model takes 32x32"),
    (jnp.zeros((2, 32, 32, 3), jnp.int32), "floating point"),
])
def test_vit_bad_images(vit, bad, match):
    model, variables = vit
    with pytest.raises(InputError, match=match):
        model.apply(variables, bad)


def test_vit_config_errors():
    with pytest.raises(ConfigError, match="not divisible by patch_size"):
        ViTConfig.from_variant("tiny", image_size=30)
    with pytest.raises(ConfigError, match="did you mean 'gap'"):
        ViTConfig.from_variant("tiny", pool="gapp")
    with pytest.raises(ConfigError, match="class_token"):
        ViTConfig.from_variant("tiny", class_token=False)
    with pytest.raises(ConfigError, match="did you mean 'num_layers'"):
        ViTConfig.from_dict({"num_layer": 2})
    c = ViTConfig.from_variant("tiny", image_size=(32, 48))
    assert ViTConfig.from_dict(c.to_dict()) == c
    module, config = build_model("vit", c.to_dict())
    assert isinstance(module, ViT) and config == c


def test_clip_outputs(clip):
    model, params, _ = clip
    c = model.config
    x, tokens = images(3), text_tokens(c)
    with jax.default_matmul_precision("highest"):
        out = model.apply({"params": params}, x, tokens)
        img = model.apply({"params": params}, x, method=CLIP.encode_image)
        txt = model.apply({"params": params}, tokens, method=CLIP.encode_text)
    assert out["image_embeds"].shape == (3, c.projection_dim)
    assert out["text_embeds"].shape == (2, c.projection_dim)
    np.testing.assert_allclose(np.linalg.norm(out["image_embeds"], axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["text_embeds"], axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(img, out["image_embeds"], atol=1e-6)
    np.testing.assert_allclose(txt, out["text_embeds"], atol=1e-6)
    scale = math.exp(float(params["logit_scale"]))
    assert abs(scale - 1 / 0.07) < 1e-3  # initialised at ln(1/0.07)
    np.testing.assert_allclose(out["logits_per_image"], scale * np.asarray(img) @ np.asarray(txt).T,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["logits_per_text"], out["logits_per_image"].T)
    # unnormalised projections point the same way
    raw = model.apply({"params": params}, x, normalize=False, method=CLIP.encode_image)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=-1, keepdims=True), img, atol=1e-5)


def test_text_tower_is_causal_and_pools_at_eos(clip):
    model, params, _ = clip
    c = model.config
    tokens = np.asarray(text_tokens(c))
    encode = jax.jit(lambda p, t: model.apply({"params": p}, t, return_intermediates=True,
                                              method=CLIP.encode_text))
    base, out = encode(params, jnp.asarray(tokens))
    np.testing.assert_array_equal(out["eos_index"], [11, 8])
    # tokens after the EOS cannot change the pooled feature (causal attention)
    after = tokens.copy()
    after[1, 9:] = 5
    np.testing.assert_allclose(encode(params, jnp.asarray(after))[0], base, atol=1e-6)
    # a token before the EOS does
    before = tokens.copy()
    before[1, 2] = (before[1, 2] + 1) % 90 + 1
    assert np.abs(np.asarray(encode(params, jnp.asarray(before))[0][1]) - np.asarray(base[1])).max() > 1e-4
    # argmax pooling picks the largest id (the legacy OpenAI rule)
    legacy = model.clone(config=c.replace(text=c.text.__class__(**{**c.text.__dict__, "eos_pooling": "argmax"})))
    tok = tokens.copy()
    tok[0, 3] = 99
    tok[0, 11] = 50
    _, out = legacy.apply({"params": params}, jnp.asarray(tok), return_intermediates=True,
                          method=CLIP.encode_text)
    assert int(out["eos_index"][0]) == 3


def test_text_bad_input(clip):
    model, params, _ = clip
    c = model.config
    with pytest.raises(InputError, match="no end-of-text token"):
        model.apply({"params": params}, jnp.ones((2, 5), jnp.int32), method=CLIP.encode_text)
    with pytest.raises(InputError, match="exceeds the context length"):
        model.apply({"params": params}, jnp.ones((1, c.text.max_len + 1), jnp.int32), method=CLIP.encode_text)
    with pytest.raises(InputError, match="outside the vocabulary"):
        model.apply({"params": params}, jnp.full((1, 4), 100, jnp.int32), method=CLIP.encode_text)
    with pytest.raises(InputError, match="integer ids"):
        model.apply({"params": params}, jnp.ones((1, 4)), method=CLIP.encode_text)


def test_clip_config_and_logit_scale_clamp(clip):
    model, params, _ = clip
    c = model.config
    again = CLIPConfig.from_dict(c.to_dict())
    assert again == c
    module, config = build_model("clip", c.to_dict())
    assert isinstance(module, CLIP) and config == c
    with pytest.raises(ConfigError, match="pooled features"):
        CLIPConfig(vision=c.vision.replace(num_classes=10), text=c.text)
    with pytest.raises(MmjaxError, match="unknown CLIP variant"):
        CLIPConfig.from_variant("ViT-B/99")
    big = {**params, "logit_scale": jnp.asarray(7.0)}
    assert abs(math.exp(float(clamp_logit_scale(big, c)["logit_scale"])) - 100.0) < 1e-3
    assert float(clamp_logit_scale(params, c)["logit_scale"]) == float(params["logit_scale"])


def test_clip_grad_is_finite(clip):
    """One contrastive loss gradient through both towers (what training will do)."""
    model, params, _ = clip
    x, tokens = images(2), text_tokens(model.config)

    def loss(p):
        logits = model.apply({"params": p}, x, tokens)["logits_per_image"]
        labels = jnp.arange(2)
        li = -jnp.mean(jax.nn.log_softmax(logits, axis=1)[labels, labels])
        lt = -jnp.mean(jax.nn.log_softmax(logits.T, axis=1)[labels, labels])
        return (li + lt) / 2

    grads = jax.jit(jax.grad(loss))(params)
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert float(jnp.abs(grads["logit_scale"])) > 0
    assert float(jnp.abs(grads["vision"]["patch_embed"]["kernel"]).max()) > 0
    assert float(jnp.abs(grads["text"]["embed"]["embedding"]).max()) > 0


# --- MAP pooling, patch embedding, resolution changes, SigLIP ------------------------------------

def test_map_pooling_is_probe_attention_then_mlp():
    """pool='map': one learned probe attends over the final-normed tokens, then h + MLP(LN(h))."""
    c = ViTConfig.from_variant("tiny", pool="map", class_token=False, activation="gelu_tanh")
    model = ViT(c)
    variables = jax.jit(model.init)(RNG, images())
    p = nn.unbox(variables["params"])
    assert sum(x.size for x in jax.tree_util.tree_leaves(p)) == c.num_params()
    with jax.default_matmul_precision("highest"):
        pooled, out = jax.jit(lambda v, x: model.apply(v, x, return_intermediates=True))(variables, images())
    x = np.asarray(out["final_hidden"], np.float64)  # [B, T, D]
    h = p["map_head"]
    att = h["attn"]
    q = np.einsum("d,dnh->nh", h["probe"], att["query"]["kernel"]) + att["query"]["bias"]  # [N, H]
    k = np.einsum("btd,dnh->btnh", x, att["key"]["kernel"]) + att["key"]["bias"]
    v = np.einsum("btd,dnh->btnh", x, att["value"]["kernel"]) + att["value"]["bias"]
    s = np.einsum("nh,btnh->bnt", q, k) / np.sqrt(c.head_size)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("bnt,btnh->bnh", w, v)
    y = np.einsum("bnh,nhd->bd", o, att["out"]["kernel"]) + att["out"]["bias"]
    mu, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
    ln = (y - mu) / np.sqrt(var + c.norm_eps) * h["norm"]["scale"] + h["norm"]["bias"]
    hid = ln @ h["mlp"]["fc1"]["kernel"] + h["mlp"]["fc1"]["bias"]
    hid = jax.nn.gelu(hid, approximate=True)
    expected = y + np.asarray(hid) @ h["mlp"]["fc2"]["kernel"] + h["mlp"]["fc2"]["bias"]
    np.testing.assert_allclose(pooled, expected, atol=2e-5)
    np.testing.assert_array_equal(out["patch_tokens"], out["final_hidden"])  # no [CLS] to drop


def test_conv_and_linear_patch_embedding_agree(vit):
    model, variables = vit
    conv = ViT(model.config.replace(patch_embed="conv"))
    with jax.default_matmul_precision("highest"):
        a = model.apply(variables, images())
        b = conv.apply(variables, images())  # same params
    np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ConfigError, match="did you mean 'conv'"):
        model.config.replace(patch_embed="convv")


def test_named_intermediates_for_downstream_models(vit):
    model, variables = vit
    c = model.config
    _, out = model.apply(variables, images(), return_intermediates=True)
    assert c.num_prefix_tokens == 1
    np.testing.assert_array_equal(out["patch_tokens"], out["final_hidden"][:, 1:])
    llava = out["hidden_states"][-2][:, c.num_prefix_tokens:]  # penultimate block, no [CLS]
    assert llava.shape == (2, c.num_patches, c.dim)


@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
@pytest.mark.parametrize("old, new", [((7, 7), (12, 12)), ((5, 5), (3, 4)), ((4, 6), (9, 2))])
def test_resample_posemb_matches_torch_interpolate(method, old, new):
    torch = pytest.importorskip("torch")
    from mmjax.models.vit import resample_posemb

    d = 8
    table = np.random.default_rng(0).normal(size=(1 + old[0] * old[1], d)).astype(np.float32)
    grid = torch.from_numpy(table[1:]).reshape(1, *old, d).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=new, mode=method, align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(-1, d).numpy()
    for arr in (table, jnp.asarray(table)):
        out = np.asarray(resample_posemb(arr, old, new, num_prefix_tokens=1, method=method))
        assert out.shape == (1 + new[0] * new[1], d)
        np.testing.assert_array_equal(out[0], table[0])  # [CLS] position kept
        # float32 summation-order differences only (values ~1; measured <= 3e-6)
        np.testing.assert_allclose(out[1:], ref, atol=1e-5)


def test_set_image_size_equals_interpolating_on_the_fly(vit, clip):
    from mmjax.models.vit import set_image_size

    model, variables = vit
    params = nn.unbox(variables["params"])
    big = images(2, 48, 56)
    new_model, new_params = set_image_size(model, params, (48, 56))
    assert new_model.config.image_hw == (48, 56) and new_model.config.num_tokens == 1 + 6 * 7
    assert new_params["pos_embedding"]["embedding"].shape == (43, 64)
    np.testing.assert_array_equal(new_params["pos_embedding"]["embedding"][0], params["pos_embedding"]["embedding"][0])
    with jax.default_matmul_precision("highest"):
        a = new_model.apply({"params": new_params}, big)
        b = model.apply({"params": params}, big, interpolate_pos_encoding=True)
        same = model.apply({"params": params}, images(), interpolate_pos_encoding=True)
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_array_equal(same, model.apply({"params": params}, images()))
    with pytest.raises(InputError, match="interpolate_pos_encoding=True"):
        model.apply({"params": params}, big)
    # CLIP: only the image tower changes
    cmodel, cparams, _ = clip
    cbig, cbig_params = set_image_size(cmodel.config, cparams, 48)
    assert cbig.vision.image_hw == (48, 48) and cbig.text == cmodel.config.text
    assert cbig_params["vision"]["pos_embedding"]["embedding"].shape == (37, 64)
    for a, b in zip(jax.tree_util.tree_leaves(cbig_params["text"]), jax.tree_util.tree_leaves(cparams["text"])):
        np.testing.assert_array_equal(a, b)


def test_resolution_not_divisible_by_the_patch(vit):
    model, variables = vit
    with pytest.raises(InputError, match="not divisible by the patch size 8x8.*resize_images"):
        model.apply(variables, images(2, 30, 32), interpolate_pos_encoding=True)
    with pytest.raises(InputError, match="not divisible"):
        model.apply(variables, images(2, 36, 32))


def test_clip_forward_clamps_the_temperature_and_optional_bias(clip):
    model, params, _ = clip
    x, tokens = images(2), text_tokens(model.config)
    hot = {**params, "logit_scale": jnp.asarray(7.0)}  # exp(7) = 1097 > 100
    out = model.apply({"params": hot}, x, tokens)
    assert float(out["logit_scale"]) == 100.0
    np.testing.assert_allclose(out["logits_per_image"], 100.0 * out["image_embeds"] @ out["text_embeds"].T,
                               rtol=1e-5)
    biased = CLIP(model.config.replace(logit_bias_init=-10.0))
    bparams = nn.unbox(biased.init(RNG, x, tokens)["params"])
    assert float(bparams["logit_bias"]) == -10.0
    bout = biased.apply({"params": {**params, "logit_bias": jnp.asarray(-10.0)}}, x, tokens)
    np.testing.assert_allclose(bout["logits_per_image"], model.apply({"params": params}, x, tokens)["logits_per_image"] - 10.0,
                               atol=1e-5)


def test_siglip_model_outputs():
    from mmjax.models.siglip import SigLIP, SigLIPConfig

    c = SigLIPConfig.from_variant("tiny")
    model = SigLIP(c)
    x = images(3)
    tokens = jnp.asarray(np.random.default_rng(0).integers(2, 100, size=(2, 16)), jnp.int32)
    variables = jax.jit(model.init)(RNG, x, tokens)
    params = nn.unbox(variables["params"])
    assert set(params) == {"vision", "text", "text_head", "logit_scale", "logit_bias"}
    assert "map_head" in params["vision"] and "cls" not in params["vision"]
    assert abs(math.exp(float(params["logit_scale"])) - 10.0) < 1e-4 and float(params["logit_bias"]) == -10.0
    apply = jax.jit(lambda v, x, t: model.apply(v, x, t, return_intermediates=True))
    with jax.default_matmul_precision("highest"):
        out, inter = apply(variables, x, tokens)
    assert out["logits_per_image"].shape == (3, 2)
    cos = np.asarray(out["image_embeds"]) @ np.asarray(out["text_embeds"]).T
    np.testing.assert_allclose(out["logits_per_image"], 10.0 * cos - 10.0, atol=1e-4)
    np.testing.assert_array_equal(inter["text"]["eos_index"], [15, 15])
    # bidirectional text tower: a token after position 0 changes position 0's hidden state
    changed = tokens.at[:, 5].set(7)
    with jax.default_matmul_precision("highest"):
        _, inter2 = apply(variables, x, changed)
    assert float(jnp.abs(inter2["text"]["final_hidden"][:, 0] - inter["text"]["final_hidden"][:, 0]).max()) > 1e-4
    with pytest.raises(ConfigError, match="must equal the image tower width"):
        SigLIPConfig(vision=c.vision, text=c.text, projection_dim=32)
    with pytest.raises(ConfigError, match="'map'"):
        SigLIPConfig(vision=c.vision.replace(pool="gap"), text=c.text)
    module, config = build_model("siglip", c.to_dict())
    assert isinstance(module, SigLIP) and config == c


