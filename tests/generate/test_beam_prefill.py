"""Beam search with `prefill_inputs` (the images of BLIP / LLaVA / BLIP-2 captioning): BLIP
captions from `generate(num_beams=3, prefill_inputs={"images": ...})` are token-identical to
transformers' `BlipForConditionalGeneration.generate(num_beams=3)` on a tiny random model
(transformers' defaults: length_penalty=1.0, early_stopping=False, which is mmjax's rule), and
num_beams=1 is greedy."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mmjax.generate import GenerationConfig, generate  # noqa: E402

from support import hf_model_cache, randomise_torch  # noqa: E402

VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=16,
              patch_size=4)
TEXT = dict(vocab_size=99, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=40, bos_token_id=97, sep_token_id=98, pad_token_id=0, eos_token_id=2)


def _build(case, seed):
    torch.manual_seed(seed + 11)
    config = transformers.BlipConfig(vision_config=VISION, text_config=TEXT, image_text_hidden_size=24)
    # a flatter random model (0.03): captions of several lengths end at [SEP] within the budget
    return randomise_torch(transformers.BlipForConditionalGeneration(config), 0.03)


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    return hf_model_cache(tmp_path_factory, _build)("caption")


def _hf_new_tokens(ref, n, pad):
    """transformers' sequences [B, 1 + generated] -> the new tokens [B, n], padded."""
    out = np.full((ref.shape[0], n), pad)
    out[:, :ref.shape[1] - 1] = ref[:, 1:]
    return out


def test_blip_beam_search_with_images_equals_transformers(blip):
    model, _, module, params = blip
    images = np.random.default_rng(5).normal(size=(4, 3, 16, 16)).astype(np.float32)
    n, c = 14, module.config
    with torch.no_grad():
        hf = model.generate(pixel_values=torch.from_numpy(images), max_new_tokens=n, do_sample=False,
                            num_beams=3, length_penalty=1.0, early_stopping=False,
                            return_dict_in_generate=True, output_scores=True)
    ref, ref_scores = hf.sequences.numpy(), hf.sequences_scores.numpy()
    gen = GenerationConfig(max_new_tokens=n, pad_token_id=c.pad_token_id, prompt_bucket=4, num_beams=3,
                           length_penalty=1.0)
    pixels = jnp.asarray(images.transpose(0, 2, 3, 1))
    out = generate(module, params, [[c.bos_token_id]] * 4, gen, prefill_inputs={"images": pixels})
    assert (ref[:, 0] == c.bos_token_id).all()
    want = _hf_new_tokens(ref, n, c.pad_token_id)
    # transformers pads a finished row with pad_token_id after its [SEP]: the same layout
    np.testing.assert_array_equal(out.tokens, want)
    # the beam scores (sum log p / length) too, and they differ per image: each row's beams read
    # its own image (a mix-up of the per-beam image rows would change them)
    np.testing.assert_allclose(out.scores, ref_scores, atol=1e-4)
    assert np.ptp(out.scores) > 1e-3
    flipped = generate(module, params, [[c.bos_token_id]] * 4, gen, prefill_inputs={"images": pixels[::-1]})
    np.testing.assert_allclose(flipped.scores, out.scores[::-1], atol=1e-5)
    # beam search is not greedy here (else the test would not tell them apart) ...
    greedy = generate(module, params, [[c.bos_token_id]] * 4, gen.replace(num_beams=1),
                      prefill_inputs={"images": pixels})
    assert not np.array_equal(greedy.tokens, out.tokens)
    # ... and num_beams=1 is exactly the greedy decode
    with torch.no_grad():
        ref1 = model.generate(pixel_values=torch.from_numpy(images), max_new_tokens=n, do_sample=False,
                              num_beams=1).numpy()
    np.testing.assert_array_equal(greedy.tokens, _hf_new_tokens(ref1, n, c.pad_token_id))
