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
