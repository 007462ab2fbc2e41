"""mmjax.data.images against transformers' image processors on real photos bundled with
scikit-image (astronaut 512x512, coffee 400x600, chelsea 300x451, camera 512x512 grayscale).

Tolerance: exact equality. Both sides run the same PIL bicubic resize on the same uint8 pixels,
crop the same window and do the same float64 rescale / float32 normalise, so every output float
is bit-identical; any difference (an off-by-one crop, a different filter, normalising in another
dtype) shows as a mismatch of ~1e-3 or more.
"""

import numpy as np
import PIL.Image
import pytest

from mmjax.data.images import clip_preprocess, resize_images, siglip_preprocess, to_rgb_uint8
from mmjax.errors import InputError

transformers = pytest.importorskip("transformers")
skdata = pytest.importorskip("skimage.data")

PHOTOS = ("astronaut", "coffee", "chelsea", "camera")


@pytest.fixture(scope="module")
def photos():
    return {name: getattr(skdata, name)() for name in PHOTOS}


def reference(processor, image):
    pixels = processor(image, return_tensors="np")["pixel_values"]
    return pixels[0].transpose(1, 2, 0)  # NCHW -> HWC


@pytest.mark.parametrize("size, crop", [(224, (224, 224)), (336, (336, 336)), (100, (120, 90))])
def test_clip_preprocess_is_identical_to_clip_image_processor(photos, size, crop):
    """(100, crop 120x90): the crop is taller than the resized image, so the padding path runs."""
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": size},
                                                   crop_size={"height": crop[0], "width": crop[1]})
    for name, image in photos.items():
        # transformers reads a 2-D numpy image ambiguously; hand it the grayscale photo as PIL "L"
        ref = reference(processor, PIL.Image.fromarray(image) if image.ndim == 2 else image)
        ours = clip_preprocess(image, size, crop)
        assert ours.shape == (1, crop[0], crop[1], 3) and ours.dtype == np.float32
        np.testing.assert_array_equal(ours[0], ref, err_msg=name)


def test_batch_forms_and_pil_inputs(photos):
    imgs = [photos["coffee"], photos["chelsea"]]
    batch = clip_preprocess(imgs)
    np.testing.assert_array_equal(batch[1], clip_preprocess(PIL.Image.fromarray(photos["chelsea"]))[0])
    stacked = clip_preprocess(np.stack([photos["astronaut"], photos["astronaut"]]))
    assert stacked.shape == (2, 224, 224, 3)
    np.testing.assert_array_equal(stacked[0], stacked[1])
    assert batch.shape == (2, 224, 224, 3)


def test_alpha_is_composited_on_white_like_transformers(photos):
    rgba = np.concatenate([photos["coffee"], np.full((400, 600, 1), 0, np.uint8)], axis=-1)
    rgba[:200, :, 3] = 255  # top half opaque, bottom half transparent
    rgb = to_rgb_uint8(rgba)
    np.testing.assert_array_equal(rgb[:200], photos["coffee"][:200])
    assert (rgb[200:] == 255).all()
    processor = transformers.CLIPImageProcessorPil()
    np.testing.assert_array_equal(clip_preprocess(rgba)[0], reference(processor, rgba))
    pil = PIL.Image.fromarray(rgba, mode="RGBA")
    np.testing.assert_array_equal(clip_preprocess(pil)[0], reference(processor, pil))


def test_siglip_preprocess_matches_siglip_processor(photos):
    processor = transformers.SiglipImageProcessorPil()
    for name in ("astronaut", "coffee", "chelsea"):
        np.testing.assert_array_equal(siglip_preprocess(photos[name])[0], reference(processor, photos[name]),
                                      err_msg=name)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((32, 32, 3), np.float32), "uint8"),
    (np.zeros((3, 32, 32), np.uint8), "channels-first"),
    (np.zeros((32, 32, 2), np.uint8), "1, 3 or 4 channels"),
    (np.zeros((2, 2, 32, 32, 3), np.uint8), r"\[H, W\] or \[H, W, C\]"),
    ([], "empty list"),
    ("astronaut.png", "PIL images or numpy uint8"),
])
def test_bad_images(bad, match):
    with pytest.raises(InputError, match=match):
        clip_preprocess(bad)


def test_bad_options(photos):
    with pytest.raises(InputError, match="did you mean 'bicubic'"):
        clip_preprocess(photos["coffee"], resample="bicubc")
    with pytest.raises(InputError, match="crop_size"):
        clip_preprocess(photos["coffee"], crop_size=(0, 5))


def test_resize_images_for_a_vit_resolution():
    x = np.random.default_rng(0).normal(size=(2, 30, 45, 3)).astype(np.float32)
    y = resize_images(x, (32, 48))
    assert y.shape == (2, 32, 48, 3)
    const = np.full((1, 30, 45, 3), 0.25, np.float32)
    np.testing.assert_allclose(resize_images(const, (32, 48)), 0.25, atol=1e-6)
    with pytest.raises(InputError, match="batch, height, width, channels"):
        resize_images(x[0], (32, 48))
