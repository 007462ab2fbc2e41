"""VQ tokenizer model (`mmjax.models.vq`): shapes and named intermediates, logical axis names,
nearest-code assignment = brute-force numpy argmin, the straight-through gradient reaches the
encoder, encode / decode_ids round trip, clear errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import ConfigError, InputError
from mmjax.models import build_model, family_of
from mmjax.models.vq import VQConfig, VQModel
from mmjax.ops.vq_losses import reconstruction_loss
from mmjax.parallel.rules import LOGICAL_PARAM_AXES

CFG = VQConfig.from_variant("tiny")  # 8x8 one channel, downsample 2 -> 4x4 tokens of 8 codes


@pytest.fixture(scope="module")
def setup():
    model = VQModel(CFG)
    images = jax.random.uniform(jax.random.PRNGKey(0), (3, 8, 8, 1)) * 2 - 1
    boxed = model.init(jax.random.PRNGKey(1), images)["params"]
    params = nn.unbox(boxed)
    # spread the codes out to the encoder's scale so several are used
    z = model.apply({"params": params}, images)["z"]
    params["quantizer"]["codebook"] = jnp.asarray(np.asarray(z).reshape(-1, CFG.codebook_dim)[:CFG.codebook_size])
    return model, boxed, params, images


def test_shapes_intermediates_and_axis_names(setup):
    model, boxed, params, images = setup
    out = model.apply({"params": params}, images)
    assert out["reconstruction"].shape == images.shape
    assert out["z"].shape == out["quantized"].shape == (3, 4, 4, CFG.codebook_dim)
    assert out["ids"].shape == (3, 4, 4) and out["ids"].dtype == jnp.int32
    for key in ("codebook_loss", "commitment_loss", "perplexity", "usage"):
        assert out[key].shape == (), key
    assert 1.0 <= float(out["perplexity"]) <= CFG.codebook_size and 0 < float(out["usage"]) <= 1
    assert boxed["quantizer"]["codebook"].names == ("vocab", "embed")
    for path, leaf in jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]:
        assert isinstance(leaf, nn.Partitioned), path
        assert all(n is None or n in LOGICAL_PARAM_AXES for n in leaf.names), (path, leaf.names)
    assert family_of(CFG) == "vq" and isinstance(build_model("vq", CFG.to_dict())[0], VQModel)


def test_assignment_is_the_brute_force_argmin_and_quantized_is_the_code(setup):
    model, _, params, images = setup
    out = model.apply({"params": params}, images)
    z, cb = np.asarray(out["z"]), np.asarray(params["quantizer"]["codebook"])
    brute = np.argmin(((z[..., None, :] - cb) ** 2).sum(-1), -1)
    np.testing.assert_array_equal(out["ids"], brute)
    np.testing.assert_allclose(out["quantized"], cb[brute], atol=1e-5)
    np.testing.assert_allclose(out["codebook_loss"], np.mean((z - cb[brute]) ** 2), rtol=1e-4)
    assert len(np.unique(brute)) > 1


def test_straight_through_gradient_reaches_the_encoder(setup):
    model, _, params, images = setup

    def rec(p):
        return reconstruction_loss(images, model.apply({"params": p}, images)["reconstruction"])

    g = jax.grad(rec)(params)
    enc = [np.abs(np.asarray(x)).max() for x in jax.tree_util.tree_leaves(g["encoder"])]
    assert all(v > 0 for v in enc), enc  # every encoder param gets gradient through the quantizer
    np.testing.assert_array_equal(g["quantizer"]["codebook"], 0.0)  # the codes only through the codebook loss
    gc = jax.grad(lambda p: model.apply({"params": p}, images)["codebook_loss"])(params)
    assert np.abs(np.asarray(gc["quantizer"]["codebook"])).max() > 0


def test_encode_decode_ids_round_trip(setup):
    model, _, params, images = setup
    ids = model.apply({"params": params}, images, method=VQModel.encode)
    out = model.apply({"params": params}, images)
    np.testing.assert_array_equal(ids, out["ids"])
    dec = model.apply({"params": params}, ids, method=VQModel.decode_ids)
    np.testing.assert_allclose(dec, out["reconstruction"], atol=1e-5)


def test_bad_inputs_are_clear(setup):
    model, _, params, images = setup
    with pytest.raises(InputError, match=r"token id 8 is outside the codebook \[0, 8\) \(codebook_size=8\)"):
        model.apply({"params": params}, jnp.full((1, 4, 4), 8, jnp.int32), method=VQModel.decode_ids)
    with pytest.raises(InputError, match="token id -1"):
        model.apply({"params": params}, jnp.full((1, 4, 4), -1, jnp.int32), method=VQModel.decode_ids)
    with pytest.raises(InputError, match=r"\[batch, h, w\] integers"):
        model.apply({"params": params}, jnp.zeros((1, 4, 4)), method=VQModel.decode_ids)
    with pytest.raises(InputError, match="3 channels"):
        model.apply({"params": params}, jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(InputError, match="not divisible by downsample=2"):
        model.apply({"params": params}, jnp.zeros((1, 9, 8, 1)), method=VQModel.encode)


def test_config_errors():
    with pytest.raises(ConfigError, match="not divisible by downsample=4"):
        VQConfig(image_size=18, downsample=4)
    with pytest.raises(ConfigError, match="codebook_size must be >= 2"):
        VQConfig(codebook_size=1)
    with pytest.raises(ConfigError, match="power of 2"):
        VQConfig(downsample=3)
    with pytest.raises(ConfigError, match="hidden_dim must be positive"):
        VQConfig(hidden_dim=0)
    with pytest.raises(ConfigError, match="unknown VQ variant"):
        VQConfig.from_variant("huge")
    assert VQConfig(image_size=(16, 32), downsample=8).grid == (2, 4)


def test_patch_discriminator_is_taming_nlayer_shaped_and_leaves_the_tokenizer_alone(setup):
    """taming's NLayerDiscriminator widths (ndf x min(2^i, 8), no conv bias before a norm), patch
    logits [B, H / 2^n - 2, W / 2^n - 2, 1], logical axis names; the tokenizer's own params,
    outputs, encode and decode_ids are those of the model without a discriminator."""
    model, _, params, images = setup
    big = VQConfig(image_size=32, channels=1, downsample=2, hidden_dim=8, res_dim=4, codebook_size=8,
                   codebook_dim=4, discriminator_layers=3, discriminator_width=8)
    boxed = jax.eval_shape(lambda r: VQModel(big).init(r, jnp.zeros((2, 32, 32, 1)))["params"],
                           jax.random.PRNGKey(0))
    shapes = jax.tree_util.tree_map(lambda x: x.shape, nn.unbox(boxed)["discriminator"])
    assert shapes == {"conv_0": {"kernel": (4, 4, 1, 8), "bias": (8,)}, "conv_1": {"kernel": (4, 4, 8, 16)},
                      "norm_1": {"scale": (16,), "bias": (16,)}, "conv_2": {"kernel": (4, 4, 16, 32)},
                      "norm_2": {"scale": (32,), "bias": (32,)}, "conv_3": {"kernel": (4, 4, 32, 64)},
                      "norm_3": {"scale": (64,), "bias": (64,)}, "conv_out": {"kernel": (4, 4, 64, 1), "bias": (1,)}}
    for path, leaf in jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]:
        assert isinstance(leaf, nn.Partitioned), path
        assert all(n is None or n in LOGICAL_PARAM_AXES for n in leaf.names), (path, leaf.names)
    assert big.patch_grid == (2, 2)

    gan = VQModel(CFG.replace(discriminator_layers=1, discriminator_width=4))
    gp = nn.unbox(jax.jit(gan.init)(jax.random.PRNGKey(1), images)["params"])
    assert set(gp) == {"encoder", "quantizer", "decoder", "discriminator"}
    gp = {**params, "discriminator": gp["discriminator"]}

    @jax.jit
    def both(p, gp, x):
        ids = gan.apply({"params": gp}, x, method=VQModel.encode)
        return (model.apply({"params": p}, x), gan.apply({"params": gp}, x), ids,
                model.apply({"params": p}, ids, method=VQModel.decode_ids),
                gan.apply({"params": gp}, ids, method=VQModel.decode_ids),
                gan.apply({"params": gp}, x, method=VQModel.discriminate))

    a, b, ids, dec_a, dec_b, logits = both(params, gp, images)
    assert logits.shape == (3, 2, 2, 1) and np.isfinite(np.asarray(logits)).all()
    for key in ("reconstruction", "ids", "codebook_loss"):
        np.testing.assert_array_equal(a[key], b[key])
    np.testing.assert_array_equal(ids, a["ids"])
    np.testing.assert_array_equal(dec_a, dec_b)
    with pytest.raises(InputError, match="no discriminator"):
        model.apply({"params": params}, images, method=VQModel.discriminate)


def test_decoder_output_layer_alone_gives_the_reconstruction(setup):
    """The adaptive weight differentiates the decoder's last conv applied to `decoder_hidden`."""
    from mmjax.models.vq import decoder_output_layer

    model, _, params, images = setup
    out = model.apply({"params": params}, images)
    assert out["decoder_hidden"].shape == (3, 8, 8, CFG.hidden_dim)
    again = decoder_output_layer(CFG).apply({"params": params["decoder"]["conv_out"]}, out["decoder_hidden"])
    np.testing.assert_allclose(again, out["reconstruction"], atol=1e-6)


def test_discriminator_config_errors():
    with pytest.raises(ConfigError, match=r"discriminator_layers=3: 16x16 images leave no patch logits.*<= 2"):
        VQConfig(image_size=16, discriminator_layers=3)
    with pytest.raises(ConfigError, match="discriminator_layers must be an int >= 0"):
        VQConfig(discriminator_layers=-1)
    with pytest.raises(ConfigError, match="discriminator_width must be positive"):
        VQConfig(discriminator_layers=1, discriminator_width=0)
