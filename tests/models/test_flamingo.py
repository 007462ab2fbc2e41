"""mmjax Flamingo (both layouts): the gate-zero identity with the frozen LM, media masking
(text before the first image reads no image; only the most recent image, or all earlier ones),
decoding with the FlamingoCache equal to the full forward, video frames, the additional
vocabulary rows, and the bad-input errors.

One tiny config per layout, jitted once per call signature (module-scoped fixtures)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import ConfigError, InputError
from mmjax.models import build_model
from mmjax.models.flamingo import Flamingo, FlamingoConfig, GatedCrossAttentionBlock
from mmjax.models.llama import Llama
from mmjax.ops import masks

IMG, EOC = 97, 96  # the tiny variant's <image> (an additional id) and <|endofchunk|>
# row 0: text, image 0, text, EOC, image 1, text; row 1: text, text, image 0, text ...
TOKENS = np.asarray([[1, 5, IMG, 6, 7, EOC, IMG, 8, 9, 10],
                     [1, 5, 6, 11, IMG, 12, 13, 14, EOC, 15]], np.int32)
VALID = np.asarray([[True, True, False], [True, False, False]])


def _config(layout):
    c = FlamingoConfig.from_variant("tiny")
    if layout == "openflamingo":
        c = c.replace(layout="openflamingo", cross_heads=2, cross_head_dim=8)
    return c


@pytest.fixture(scope="module", params=["idefics", "openflamingo"])
def model(request):
    c = _config(request.param)
    m = Flamingo(c)
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 16, 16, 3))
    params = nn.unbox(m.init(jax.random.PRNGKey(0), jnp.asarray(TOKENS), images)["params"])
    apply = jax.jit(lambda p, t, i, v: m.apply({"params": p}, t, i, image_valid=v,
                                               return_intermediates=True))
    text_only = jax.jit(lambda p, t: m.apply({"params": p}, t, return_intermediates=True))
    return m, params, images, apply, text_only


def _open_gates(params, value=0.7):
    def f(path, x):
        return x + value if "alpha" in jax.tree_util.keystr(path) else x
    return jax.tree_util.tree_map_with_path(f, params)


def test_fresh_model_equals_the_frozen_lm_with_and_without_images(model):
    m, params, images, apply, text_only = model
    c = m.config
    logits, inter = apply(params, TOKENS, images, VALID)
    assert logits.shape == (2, TOKENS.shape[1], c.vocab_size)
    lm = Llama(c.text)
    ref = lm.apply({"params": params["language_model"]}, embeddings=inter["inputs_embeds"])
    # alpha = 0 at init: tanh(0) = 0 makes every gated block the identity (x + 0 * h == x);
    # the programs differ (XLA fuses them differently), so equal up to float32 rounding (1e-6;
    # open gates move the logits by > 1e-3, below)
    close = dict(atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(logits[..., :c.text.vocab_size]), np.asarray(ref), **close)
    plain, _ = text_only(params, TOKENS)
    np.testing.assert_allclose(np.asarray(plain), np.asarray(logits), **close)
    # the same params with open gates: the images change the logits (the test could fail)
    opened = _open_gates(params)
    moved, _ = apply(opened, TOKENS, images, VALID)
    assert float(jnp.abs(moved[..., :c.text.vocab_size] - ref).max()) > 1e-3


def test_media_mask_rule_and_text_before_the_first_image(model):
    m, params, images, apply, text_only = model
    opened = _open_gates(params)
    logits, inter = apply(opened, TOKENS, images, VALID)
    mask = np.asarray(inter["media_mask"])
    # row 0: tokens 0-1 see nothing, 2-5 image 0 (the <image> token itself included), 6-9 image 1
    want0 = np.zeros((10, 3), bool)
    want0[2:6, 0] = True
    want0[6:, 1] = True
    np.testing.assert_array_equal(mask[0], want0)
    assert not mask[1, :4].any() and mask[1, 4:, 0].all() and not mask[1, :, 1:].any()
    # tokens before a row's first image: exactly the text-only call (no cross-attention at all)
    plain, _ = text_only(opened, TOKENS)  # (up to float32 rounding between two programs)
    np.testing.assert_allclose(np.asarray(logits[0, :2]), np.asarray(plain[0, :2]), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(logits[1, :4]), np.asarray(plain[1, :4]), atol=1e-6, rtol=0)
    assert float(jnp.abs(logits[1, 4:] - plain[1, 4:]).max()) > 1e-4
    # a gated block reads only each token's own image: changing image 0's media leaves row 0's
    # tokens after image 1 untouched (in the whole model self-attention carries image 0 onward,
    # as in Flamingo, so this is checked on the block itself)
    c = m.config
    block = GatedCrossAttentionBlock(c)
    media = inter["media"]
    other = media.at[0, 0].set(-media[0, 0])
    x = jax.random.normal(jax.random.PRNGKey(3), (2, TOKENS.shape[1], c.text.dim))
    attn_mask = masks.media_attention_mask(jnp.asarray(mask), c.tokens_per_image)
    run = jax.jit(lambda med: block.apply({"params": opened["gated_xattn_0"]}, x,
                                          med.reshape(2, -1, c.media_dim), attn_mask,
                                          jnp.asarray(mask.any(-1))))
    a, b = run(media), run(other)
    np.testing.assert_array_equal(np.asarray(a[0, 6:]), np.asarray(b[0, 6:]))
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
    assert float(jnp.abs(a[0, 2:6] - b[0, 2:6]).min()) > 0


def test_attend_to_all_previous_media():
    index = masks.media_index(jnp.asarray(TOKENS), IMG)
    np.testing.assert_array_equal(np.asarray(index[0]), [-1, -1, 0, 0, 0, 0, 1, 1, 1, 1])
    every = np.asarray(masks.media_mask(index, 3, only_immediate=False))
    assert every[0, 7, :2].all() and not every[0, 7, 2] and not every[0, 1].any()
    # a padding token equal to the image id is not an image; a cached prompt's count continues
    pad = masks.media_index(jnp.asarray([[IMG, IMG, 4]]), IMG, input_mask=jnp.asarray([[0, 1, 1]]))
    np.testing.assert_array_equal(np.asarray(pad), [[-1, 0, 0]])
    cont = masks.media_index(jnp.asarray([[4, IMG]]), IMG, start=jnp.asarray([1]))
    np.testing.assert_array_equal(np.asarray(cont), [[1, 2]])


def test_decoding_with_the_cache_equals_the_full_forward(model):
    m, params, images, apply, _ = model
    opened = _open_gates(params)
    full, _ = apply(opened, TOKENS, images, VALID)
    step = jax.jit(lambda p, t, cache: m.apply({"params": p}, t, cache=cache))
    prefill = jax.jit(lambda p, t, i, v, cache: m.apply({"params": p}, t, i, image_valid=v, cache=cache))
    cache = m.init_cache(2, 16)
    out, cache = prefill(opened, TOKENS[:, :5], images, VALID, cache)
    outs = [out]
    for i in range(5, TOKENS.shape[1]):  # row 0's second <image> arrives during decoding
        o, cache = step(opened, TOKENS[:, i:i + 1], cache)
        outs.append(o)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), atol=2e-5)
    np.testing.assert_array_equal(np.asarray(cache.last_media), [1, 0])


def test_video_frames_and_additional_rows():
    c = _config("idefics").replace(max_frames=2)
    m = Flamingo(c)
    video = jax.random.normal(jax.random.PRNGKey(2), (2, 3, 2, 16, 16, 3))
    params = nn.unbox(m.init(jax.random.PRNGKey(0), jnp.asarray(TOKENS), video)["params"])
    assert params["resampler"]["frame_embed"].shape == (2, c.media_dim)
    logits, inter = m.apply({"params": _open_gates(params)}, TOKENS, video, image_valid=VALID,
                            return_intermediates=True)
    assert inter["media"].shape == (2, 3, c.resampler_latents, c.media_dim)
    # frame order matters (time embeddings), and the additional ids read their own rows
    swapped = m.apply({"params": _open_gates(params)}, TOKENS, video[:, :, ::-1], image_valid=VALID)
    assert float(jnp.abs(swapped - logits).max()) > 1e-4
    emb = m.apply({"params": params}, jnp.asarray([[IMG, 96]]), method="embed_tokens")
    np.testing.assert_array_equal(np.asarray(emb[0]), np.asarray(params["additional_embed"]["embedding"][::-1]))


def test_bad_inputs_are_named(model):
    m, params, images, _, _ = model

    def run(tokens, imgs, **kw):
        return m.apply({"params": params}, jnp.asarray(tokens), imgs, **kw)

    with pytest.raises(InputError, match="more <image> tokens than images"):
        run(TOKENS, images, image_valid=np.asarray([[True, False, False], [True, False, False]]))
    with pytest.raises(InputError, match="more images than <image> tokens"):
        run(TOKENS, images, image_valid=np.asarray([[True, True, True], [True, False, False]]))
    with pytest.raises(InputError, match="3 <image> tokens.*only 2 image slot"):
        run(np.asarray([[IMG, 4, IMG, IMG]]), images[:1, :2])
    with pytest.raises(InputError, match="images are 8x8, the model takes 16x16"):
        run(TOKENS, images[:, :, :8, :8])
    with pytest.raises(InputError, match="add the images axis"):
        run(TOKENS, images[:, 0])
    with pytest.raises(InputError, match="token id 98 is outside the vocabulary"):
        run(np.asarray([[98, 1]]), None)
    with pytest.raises(ConfigError, match="scan_layers=False"):
        FlamingoConfig.from_variant("tiny", text=m.config.text.replace(scan_layers=True))
    with pytest.raises(ConfigError, match="end_of_chunk_token_id equals image_token_index"):
        FlamingoConfig.from_variant("tiny", end_of_chunk_token_id=IMG)
    with pytest.raises(ConfigError, match="layout 'idefic'.*did you mean 'idefics'"):
        FlamingoConfig.from_variant("tiny", layout="idefic")


def test_family_record_and_block_positions():
    module, config = build_model("flamingo", FlamingoConfig.from_variant("tiny").to_dict())
    assert isinstance(module, Flamingo)
    c = config.replace(text=config.text.replace(num_layers=6), cross_interval=2)
    assert c.block_positions == (0, 2, 4)  # Idefics: before layers 0, 2, 4
    assert c.replace(layout="openflamingo").block_positions == (2, 4, 6)  # after layers 1, 3, 5


def test_higher_resolution_images_resample_the_position_embeddings(model):
    m, params, images, apply, _ = model
    opened = _open_gates(params)
    big = jax.image.resize(images, (2, 3, 24, 24, 3), "bilinear")  # 16 -> 24 px: 9 patches, not 4
    with pytest.raises(InputError, match="interpolate_pos_encoding"):
        m.apply({"params": opened}, TOKENS, big, image_valid=VALID)
    logits = m.apply({"params": opened}, TOKENS, big, image_valid=VALID, interpolate_pos_encoding=True)
    assert logits.shape[:2] == TOKENS.shape and bool(jnp.isfinite(logits).all())
