"""Image-caption sets for BLIP's CapFilt: the digits alone, or the digits beside real photos
bundled with scikit-image, all offline; with a known clean subset and injected wrong captions.

    cs = load_caption_set(image_size=16, test_fraction=0.2, seed=0, photos=True)
    cs.train.images, cs.train.labels    # float32 [N, 16, 16, 3] CLIP-normalised, int32 [N]
    cs.class_names                      # ("zero", ..., "nine", "a face", ..., "a cup of coffee")
    cs.caption(label, t)                # the t-th template of that class filled in
    cs.caption_class(text)              # the class a caption names, -1 for none
    pairs = make_pairs(cs, noise_fraction=0.3, clean_fraction=0.15, seed=0)
    pairs.rows, pairs.texts, pairs.noisy, pairs.clean    # one caption per training image

Classes 0..9 are the digits (`mmjax.data.digits`: scikit-learn's 1,797 8x8 scans, its eight
training templates). With `photos=True`, PHOTO_CLASSES follow as classes 10..19, 100 images
each, every one read from files scikit-image ships (no pooch download):
  * "a face" / "a background patch": `skimage.data.lfw_subset()`, its 100 LFW faces and 100
    non-face patches (25x25 grey);
  * "a cat" (chelsea), "coins", "a brick wall" (brick), "grass", "gravel", "the moon",
    "printed text" (text and page), "a cup of coffee" (coffee): 100 seeded random square crops
    of the photo(s) (side PHOTO_CROP of the shorter edge, random position, random horizontal
    flip), each class a different texture or object at the model's resolution.
Every image goes through CLIP's preprocessing (`mmjax.data.images.clip_preprocess`) to
image_size x image_size. Photo captions use PHOTO_TEMPLATES ("a photo of {name}", ...); the
class keyword of each name (face, background, cat, coins, brick, grass, gravel, moon, text,
coffee) is what `caption_class` reads, so a caption's class is decidable from its words.

Split: stratified per class, seeded (`mmjax.data.digits.stratified_split`), identical for the
digits to `load_digits_captions`. Tokenizer: the digits' tokenizer when `photos=False` (the
vocabulary of every digits run), else a word-level one over all templates of all classes.

`make_pairs`: ONE fixed caption per training image (a web alt-text is fixed), its template
drawn per image. `clean_fraction` of each class's training images (seeded, stratified) form
the known-clean subset -- correct captions, the stand-in for BLIP's human-annotated COCO that
the filter and captioner are fine-tuned on; of the remaining "web" images exactly
round(noise_fraction * n_web) (seeded) are captioned as another, uniformly drawn class with a
template of that class (a digit caption on a photo of coins, say).
"""

from __future__ import annotations

import dataclasses
import numpy as np

from mmjax.data.digits import (DIGIT_NAMES, TRAIN_TEMPLATES, ZERO_SHOT_TEMPLATES, CaptionTokenizer,
                               DigitsSplit, stratified_split)
from mmjax.errors import InputError

# (caption name, keyword read by caption_class, source: "lfw_face" | "lfw_nonface" | skimage names)
PHOTO_CLASSES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("a face", "face", ("lfw_face",)),
    ("a background patch", "background", ("lfw_nonface",)),
    ("a cat", "cat", ("chelsea",)),
    ("coins", "coins", ("coins",)),
    ("a brick wall", "brick", ("brick",)),
    ("grass", "grass", ("grass",)),
    ("gravel", "gravel", ("gravel",)),
    ("the moon", "moon", ("moon",)),
    ("printed text", "text", ("text", "page")),
    ("a cup of coffee", "coffee", ("coffee",)),
)
PHOTO_TEMPLATES = (
    "a photo of {name}",
    "a picture of {name}",
    "{name}",
    "a close up photo of {name}",
    "a small grey photo of {name}",
    "this is {name}",
)
PHOTOS_PER_CLASS = 100
PHOTO_CROP = (0.3, 0.7)  # crop side as a fraction of the photo's shorter edge (uniform)
_FIRST_PHOTO_INDEX = 100_000  # photo rows' `indices` (the digits' are rows of load_digits())


@dataclasses.dataclass(frozen=True)
class CaptionSet:
    """Train/test splits, the tokenizer, and per class its name and caption templates."""

    train: DigitsSplit
    test: DigitsSplit
    tokenizer: CaptionTokenizer
    class_names: tuple[str, ...]
    templates: tuple[tuple[str, ...], ...]  # per class

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def caption(self, label: int, template: int) -> str:
        """Class `label`'s caption under its template number `template` (mod its count)."""
        ts = self.templates[label]
        t = ts[template % len(ts)]
        if label < 10:
            return t.format(name=DIGIT_NAMES[label], digit=str(label))
        return t.format(name=self.class_names[label])

    def caption_class(self, text: str) -> int:
        """The class a caption names: its first photo keyword, digit name or single numeral; -1
        for none."""
        keywords = {kw: 10 + i for i, (_, kw, _) in enumerate(PHOTO_CLASSES)} if self.num_classes > 10 else {}
        for w in CaptionTokenizer.split(text):
            if w in keywords:
                return keywords[w]
            if w in DIGIT_NAMES:
                return DIGIT_NAMES.index(w)
            if w.isdigit() and len(w) == 1:
                return int(w)
        return -1


@dataclasses.dataclass(frozen=True)
class Pairs:
    rows: np.ndarray  # int64 [N] rows of the train split
    texts: list[str]  # [N] one caption each
    noisy: np.ndarray  # bool [N] the caption names another class
    clean: np.ndarray  # bool [N] in the known-clean subset (never noisy)


def _uint8(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype == bool:
        return x.astype(np.uint8) * 255
    if x.dtype != np.uint8:
        return np.clip(np.round(np.asarray(x, np.float64) * 255.0), 0, 255).astype(np.uint8)
    return x


def _skimage_data():
    try:
        import skimage.data
    except ImportError:
        raise InputError("the photo captions need scikit-image (pip install scikit-image; it is in "
                         "mmjax's 'test' extra)") from None
    return skimage.data


def photo_images(per_class: int = PHOTOS_PER_CLASS, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """(uint8 images [H, W] or [H, W, 3] at source size, labels 0..9 over PHOTO_CLASSES)."""
    data = _skimage_data()
    if not 1 <= per_class <= 100:
        raise InputError(f"per_class must be in [1, 100] (lfw_subset holds 100 of each), got {per_class}")
    lfw = _uint8(data.lfw_subset())  # [200, 25, 25]: 100 faces then 100 non-faces
    rng = np.random.default_rng(seed + 104_729)
    images: list[np.ndarray] = []
    labels: list[int] = []
    for c, (_, _, sources) in enumerate(PHOTO_CLASSES):
        if sources == ("lfw_face",):
            picked = list(lfw[:100][:per_class])
        elif sources == ("lfw_nonface",):
            picked = list(lfw[100:][:per_class])
        else:
            photos = [_uint8(getattr(data, s)()) for s in sources]
            picked = []
            for k in range(per_class):
                p = photos[k % len(photos)]
                h, w = p.shape[:2]
                side = max(8, int(round(rng.uniform(*PHOTO_CROP) * min(h, w))))
                y, x = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
                crop = p[y:y + side, x:x + side]
                if rng.random() < 0.5:
                    crop = crop[:, ::-1]
                picked.append(np.ascontiguousarray(crop))
        images += picked
        labels += [c] * len(picked)
    return images, np.asarray(labels, np.int32)


def load_caption_set(image_size: int = 16, test_fraction: float = 0.2, seed: int = 0, *,
                     photos: bool = False) -> CaptionSet:
    """The digits (classes 0..9), and with `photos` the PHOTO_CLASSES (10..19), as one set."""
    from mmjax.data.digits import load_digits_captions
    from mmjax.data.images import clip_preprocess

    digits = load_digits_captions(image_size=image_size, test_fraction=test_fraction, seed=seed)
    names = DIGIT_NAMES
    templates = (tuple(TRAIN_TEMPLATES),) * 10
    if not photos:
        return CaptionSet(digits.train, digits.test, digits.tokenizer, names, templates)
    raw, plabels = photo_images(seed=seed)
    pimages = clip_preprocess(raw, size=image_size, crop_size=image_size)
    p_train, p_test = stratified_split(plabels, test_fraction, seed)
    names = names + tuple(n for n, _, _ in PHOTO_CLASSES)
    templates = templates + (PHOTO_TEMPLATES,) * len(PHOTO_CLASSES)
    words = [w for t in (*TRAIN_TEMPLATES, *ZERO_SHOT_TEMPLATES) for i in range(10)
             for w in CaptionTokenizer.split(t.format(name=DIGIT_NAMES[i], digit=str(i)))]
    words += [w for t in PHOTO_TEMPLATES for n, _, _ in PHOTO_CLASSES for w in CaptionTokenizer.split(t.format(name=n))]

    def join(d: DigitsSplit, idx: np.ndarray) -> DigitsSplit:
        return DigitsSplit(images=np.concatenate([d.images, pimages[idx]]),
                           labels=np.concatenate([d.labels, plabels[idx] + 10]).astype(np.int32),
                           indices=np.concatenate([d.indices, _FIRST_PHOTO_INDEX + idx]))

    return CaptionSet(join(digits.train, p_train), join(digits.test, p_test), CaptionTokenizer(words),
                      names, templates)


def make_pairs(cs: CaptionSet, noise_fraction: float = 0.0, clean_fraction: float = 0.0, seed: int = 0
               ) -> Pairs:
    """One fixed caption per training image; a known-clean subset; injected wrong captions (see
    the module docstring). Deterministic in `seed`."""
    if not 0.0 <= noise_fraction < 1.0 or not 0.0 <= clean_fraction < 1.0:
        raise InputError(f"noise_fraction and clean_fraction must be in [0, 1), got {noise_fraction}, "
                         f"{clean_fraction}")
    labels = np.asarray(cs.train.labels, np.int64)
    n, k = len(labels), cs.num_classes
    rng = np.random.default_rng(seed + 7919)
    clean = np.zeros(n, bool)
    for c in range(k):  # stratified clean subset
        idx = rng.permutation(np.flatnonzero(labels == c))
        clean[idx[:int(round(clean_fraction * len(idx)))]] = True
    web = np.flatnonzero(~clean)
    noisy = np.zeros(n, bool)
    noisy[web[rng.permutation(len(web))[:int(round(noise_fraction * len(web)))]]] = True
    named = labels.copy()
    named[noisy] = (named[noisy] + rng.integers(1, k, size=int(noisy.sum()))) % k
    t = rng.integers(1 << 30, size=n)
    texts = [cs.caption(int(named[i]), int(t[i])) for i in range(n)]
    return Pairs(np.arange(n), texts, noisy, clean)


def held_out_captions(cs: CaptionSet) -> list[str]:
    """One correct caption per test image (template i mod the class's count for image i)."""
    return [cs.caption(int(c), i) for i, c in enumerate(cs.test.labels)]

