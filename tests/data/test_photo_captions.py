"""The CapFilt image-caption sets: digits beside scikit-image's bundled photos, offline and
deterministic; the clean subset and the injected noise are exact."""

import socket

import numpy as np
import pytest

pytest.importorskip("skimage")
pytest.importorskip("sklearn")

from mmjax.data.photo_captions import (PHOTO_CLASSES, PHOTO_TEMPLATES, PHOTOS_PER_CLASS,  # noqa: E402
                                       held_out_captions, load_caption_set, make_pairs, photo_images)
from mmjax.errors import InputError  # noqa: E402


@pytest.fixture(scope="module")
def mixed():
    return load_caption_set(image_size=16, test_fraction=0.2, seed=0, photos=True)


def test_photo_images_load_offline_and_deterministic(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("photo_images tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    images, labels = photo_images(per_class=10, seed=0)
    assert len(images) == len(labels) == 10 * len(PHOTO_CLASSES)
    np.testing.assert_array_equal(np.bincount(labels), [10] * len(PHOTO_CLASSES))
    assert all(im.dtype == np.uint8 and im.ndim in (2, 3) and min(im.shape[:2]) >= 8 for im in images)
    again, _ = photo_images(per_class=10, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(images, again))
    other, _ = photo_images(per_class=10, seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(images[20:30], other[20:30]))  # crops move
    with pytest.raises(InputError, match="per_class"):
        photo_images(per_class=101)


def test_mixed_set_shapes_classes_and_captions(mixed):
    n_photo = PHOTOS_PER_CLASS * len(PHOTO_CLASSES)
    assert len(mixed.train) + len(mixed.test) == 1797 + n_photo
    assert mixed.num_classes == 20 and mixed.class_names[10] == "a face"
    for split in (mixed.train, mixed.test):
        assert split.images.shape[1:] == (16, 16, 3) and split.images.dtype == np.float32
        assert np.all(np.isfinite(split.images))
        assert len(set(split.indices.tolist())) == len(split)
    assert np.bincount(mixed.test.labels)[10:].tolist() == [20] * 10  # stratified: 20% of 100
    # every caption of every class tokenizes and names its class
    for c in range(20):
        for t in range(len(mixed.templates[c])):
            text = mixed.caption(c, t)
            assert mixed.caption_class(text) == c, text
            mixed.tokenizer.encode([text], 16)
    assert mixed.caption(12, 0) == PHOTO_TEMPLATES[0].format(name="a cat")
    assert mixed.caption_class("nothing at all") == -1
    texts = held_out_captions(mixed)
    assert [mixed.caption_class(t) for t in texts] == mixed.test.labels.tolist()


def test_digits_only_set_keeps_the_digits_vocabulary():
    from mmjax.data.digits import load_digits_captions

    cs = load_caption_set(image_size=16, photos=False)
    ref = load_digits_captions(image_size=16)
    assert cs.num_classes == 10 and cs.tokenizer.words == ref.tokenizer.words
    np.testing.assert_array_equal(cs.train.indices, ref.train.indices)
    assert cs.caption_class("a photo of a cat") == -1  # photo keywords mean nothing here


def test_make_pairs_clean_subset_and_noise_are_exact(mixed):
    p = make_pairs(mixed, noise_fraction=0.3, clean_fraction=0.15, seed=0)
    labels = mixed.train.labels
    n = len(labels)
    assert len(p.texts) == n and p.rows.tolist() == list(range(n))
    for c in range(20):  # the clean subset is stratified
        assert p.clean[labels == c].sum() == int(round(0.15 * np.sum(labels == c)))
    n_web = int((~p.clean).sum())
    assert p.noisy.sum() == int(round(0.3 * n_web))
    assert not np.any(p.noisy & p.clean)
    named = np.asarray([mixed.caption_class(t) for t in p.texts])
    np.testing.assert_array_equal(named != labels, p.noisy)  # noisy <=> names another class
    # wrong captions cross domains too (a digit caption on a photo and back)
    assert np.any((labels >= 10) & (named < 10)) and np.any((labels < 10) & (named >= 10))
    again = make_pairs(mixed, noise_fraction=0.3, clean_fraction=0.15, seed=0)
    assert again.texts == p.texts and np.array_equal(again.noisy, p.noisy)
    other = make_pairs(mixed, noise_fraction=0.3, clean_fraction=0.15, seed=1)
    assert not np.array_equal(other.noisy, p.noisy)
    none = make_pairs(mixed)
    assert not none.noisy.any() and not none.clean.any()
    with pytest.raises(InputError, match="clean_fraction"):
        make_pairs(mixed, clean_fraction=1.0)
