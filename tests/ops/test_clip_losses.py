"""mmjax.ops.losses: CLIP's symmetric contrastive loss and SigLIP's sigmoid loss against the
transformers models' own `return_loss=True`, direct formulas, the data-parallel (all-gather under
shard_map) variants against the single-device loss on 8 simulated devices (value and gradient),
and token cross-entropy with masks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from mmjax.errors import InputError
from mmjax.ops.losses import clip_loss, sharded_loss, siglip_loss, token_cross_entropy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def unit_rows(n, d, seed):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_clip_loss_is_symmetric_cross_entropy_against_the_diagonal():
    img, txt = unit_rows(6, 8, 0), unit_rows(6, 8, 1)
    scale = 7.5
    logits = scale * img @ txt.T
    labels = np.arange(6)

    def ce(z):
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return -logp[labels, labels].mean()

    expected = (ce(logits) + ce(logits.T)) / 2
    np.testing.assert_allclose(float(clip_loss(img, txt, scale)), expected, rtol=1e-6)
    # identical towers with a large temperature: the loss goes to 0; swapped pairs: it is large
    assert float(clip_loss(img, img, 100.0)) < 1e-3
    assert float(clip_loss(img, img[::-1], 100.0)) > 10.0


def test_siglip_loss_direct_formula():
    img, txt = unit_rows(5, 8, 2), unit_rows(5, 8, 3)
    scale, bias = 10.0, -4.0
    logits = scale * img @ txt.T + bias
    z = 2 * np.eye(5) - 1
    expected = -np.sum(np.log(1 / (1 + np.exp(-z * logits)))) / 5
    np.testing.assert_allclose(float(siglip_loss(img, txt, scale, bias)), expected, rtol=1e-6)


@pytest.fixture(scope="module")
def hf_pair():
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=12)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=16, patch_size=8)
    torch.manual_seed(0)
    clip = transformers.CLIPModel(transformers.CLIPConfig(
        text_config={**text, "eos_token_id": 63, "bos_token_id": 62, "pad_token_id": 0},
        vision_config=vision, projection_dim=16)).eval()
    siglip = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision)).eval()
    with torch.no_grad():
        siglip.logit_scale.fill_(math.log(10.0))
        siglip.logit_bias.fill_(-3.0)
    return clip, siglip


def test_losses_equal_transformers_return_loss(hf_pair):
    """The loss transformers' models compute with return_loss=True, from their own embeddings."""
    clip, siglip = hf_pair
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 60, size=(5, 10))
    ids[:, -1] = 63
    pixels = torch.from_numpy(rng.normal(size=(5, 3, 16, 16)).astype(np.float32))
    with torch.no_grad():
        ref = clip(input_ids=torch.from_numpy(ids), pixel_values=pixels, return_loss=True)
        sref = siglip(input_ids=torch.from_numpy(ids), pixel_values=pixels, return_loss=True)
    ours = clip_loss(ref.image_embeds.numpy(), ref.text_embeds.numpy(), float(clip.logit_scale.detach().exp()))
    assert abs(float(ours) - float(ref.loss)) < 1e-5, (float(ours), float(ref.loss))
    ours = siglip_loss(sref.image_embeds.numpy(), sref.text_embeds.numpy(), float(siglip.logit_scale.detach().exp()),
                       float(siglip.logit_bias.detach()))
    assert abs(float(ours) - float(sref.loss)) < 1e-5, (float(ours), float(sref.loss))


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "conftest gives 8 simulated CPU devices"
    return Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))


@pytest.mark.parametrize("axis", ["data", ("data", "fsdp")])
@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_sharded_loss_equals_single_device_loss(mesh, axis, name):
    """Every device scores its rows against all gathered columns: same value and same gradient
    (image, text, scale, bias) as the loss on the whole batch on one device."""
    img, txt = jnp.asarray(unit_rows(16, 8, 4)), jnp.asarray(unit_rows(16, 8, 5))
    fn, extra = (clip_loss, (jnp.float32(6.0),)) if name == "clip" else (siglip_loss, (jnp.float32(6.0),
                                                                                       jnp.float32(-2.0)))
    argnums = tuple(range(2 + len(extra)))
    sharded = sharded_loss(fn, mesh, axis)
    value = float(fn(img, txt, *extra))
    got = float(jax.jit(sharded)(img, txt, *extra))
    assert abs(got - value) < 1e-5 * max(1.0, abs(value))
    grads = jax.grad(fn, argnums=argnums)(img, txt, *extra)
    sgrads = jax.jit(jax.grad(sharded, argnums=argnums))(img, txt, *extra)
    for g, s in zip(grads, sgrads):
        np.testing.assert_allclose(np.asarray(s), np.asarray(g), atol=1e-6)
    # a per-device loss without the gather is a different (wrong) number: the test can fail
    local = jax.shard_map(lambda a, b, *e: jax.lax.pmean(fn(a, b, *e), axis), mesh=mesh,
                          in_specs=(jax.sharding.PartitionSpec(axis),) * 2 + (jax.sharding.PartitionSpec(),) * len(extra),
                          out_specs=jax.sharding.PartitionSpec())
    assert abs(float(jax.jit(local)(img, txt, *extra)) - value) > 1e-3


def test_sharded_loss_bad_batch(mesh):
    img = jnp.asarray(unit_rows(6, 8, 0))
    with pytest.raises(InputError, match="not divisible by the 4 devices"):
        sharded_loss(clip_loss, mesh, "data")(img, img, 1.0)
    with pytest.raises(InputError, match="no axis 'tensor'"):
        sharded_loss(clip_loss, mesh, "tensor")(img, img, 1.0)


def test_token_cross_entropy_with_mask():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 5, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, size=(2, 5)))
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], bool)
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    expected = float(jnp.sum(per_token * mask) / 7)
    np.testing.assert_allclose(float(token_cross_entropy(logits, targets, mask)), expected, rtol=1e-6)
    total, count = token_cross_entropy(logits, targets, mask, return_sums=True)
    assert float(count) == 7.0 and abs(float(total) - expected * 7) < 1e-4
    np.testing.assert_allclose(float(token_cross_entropy(logits, targets)), float(per_token.mean()), rtol=1e-6)
    assert float(token_cross_entropy(logits, targets, jnp.zeros((2, 5), bool))) == 0.0


def test_loss_bad_input():
    img = unit_rows(4, 8, 0)
    with pytest.raises(InputError, match="same shape"):
        clip_loss(img, img[:3], 1.0)
    with pytest.raises(InputError, match=r"\[batch, dim\]"):
        siglip_loss(img[None], img[None], 1.0, 0.0)
    with pytest.raises(InputError, match="targets"):
        token_cross_entropy(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), jnp.int32))
