"""Real image-caption pairs offline: scikit-learn's handwritten digits with template captions.

    data = load_digits_captions(image_size=32, test_fraction=0.2, seed=0)
    data.train.images   # float32 [N, 32, 32, 3] NHWC, CLIP-normalised (mmjax.data.images)
    data.train.labels   # int32 [N], 0..9
    tok = data.tokenizer                       # word-level, built from the templates
    tokens, mask = tok.encode(["handwritten 7", "a photo of the digit seven."])
    ds = make_digits_dataset(data.train, tok, batch_size=64, seed=0)   # grain, endless
    prompts = class_prompts()                  # per digit, its zero-shot prompts
    batch = next(iter(ds.to_iter_dataset()))   # {"images", "tokens", "input_mask", "labels"}

Source: `sklearn.datasets.load_digits()`, 1,797 real 8x8 scans (values 0..16) of digits written
by 43 people, shipped inside scikit-learn (no download). Each image is scaled to uint8 0..255,
made RGB and put through CLIP's preprocessing (`clip_preprocess`: PIL bicubic resize to
`image_size`, CLIP mean/std).

Split: stratified and deterministic -- per class, a `seed`-ed permutation puts
round(test_fraction * count) images in the test split (the same split on every machine).

Captions: every training example gets one of `TRAIN_TEMPLATES` for its label, drawn anew per
epoch from a per-example seeded generator (grain `random_map`: resumable, deterministic).
`ZERO_SHOT_TEMPLATES` are prompts for zero-shot classification (`mmjax.eval.zero_shot`) with
template ensembling; they share the vocabulary but are phrased differently from the training
captions, so zero-shot accuracy measures more than caption lookup.

The tokenizer is word-level over the templates' words (lower case, punctuation dropped):
id 0 = padding, 1 = beginning of text, the last id = end of text (so CLIP's text tower can
pool at the first end-of-text token or at the largest id alike).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import numpy as np

from mmjax.errors import InputError

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRAIN_TEMPLATES = (
    "a photo of the digit {name}.",
    "handwritten {digit}",
    "a handwritten {name}",
    "the number {name}",
    "a scan of the digit {digit}",
    "a blurry picture of a {name}",
    "the digit {digit}, written by hand",
    "{name}",
)
ZERO_SHOT_TEMPLATES = (
    "a photo of the digit {name}.",
    "a picture of the number {digit}",
    "a handwritten digit {name}",
    "the digit {name}",
)
_WORD = re.compile(r"[a-z0-9]+")


def caption(template: str, label: int) -> str:
    """`template` filled for digit `label` ({name} -> "seven", {digit} -> "7")."""
    return template.format(name=DIGIT_NAMES[label], digit=str(label))


def caption_label(text: str) -> int:
    """The digit a caption names (its first digit word or single numeral), -1 for none."""
    for w in _WORD.findall(text.lower()):
        if w in DIGIT_NAMES:
            return DIGIT_NAMES.index(w)
        if w.isdigit() and len(w) == 1:
            return int(w)
    return -1


class CaptionTokenizer:
    """Word-level tokenizer: [BOS] words [EOS] then padding. Deterministic (sorted words)."""

    pad_id = 0
    bos_id = 1

    def __init__(self, words: Sequence[str]):
        self.words = tuple(sorted(set(words)))
        self._ids = {w: i + 2 for i, w in enumerate(self.words)}

    @classmethod
    def from_templates(cls, templates: Sequence[str], labels: Sequence[int] = range(10)) -> "CaptionTokenizer":
        words = [w for t in templates for i in labels for w in cls.split(caption(t, i))]
        return cls(words)

    @staticmethod
    def split(text: str) -> list[str]:
        return _WORD.findall(text.lower())

    @property
    def eos_id(self) -> int:
        return len(self.words) + 2

    @property
    def vocab_size(self) -> int:
        return len(self.words) + 3

    def encode(self, texts: Sequence[str], max_len: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """texts -> (tokens int32 [N, max_len], input_mask bool [N, max_len]). InputError for an
        unknown word or a text longer than the context (BOS + words + EOS > max_len)."""
        if isinstance(texts, str):
            texts = [texts]
        tokens = np.full((len(texts), max_len), self.pad_id, np.int32)
        mask = np.zeros((len(texts), max_len), bool)
        for row, text in enumerate(texts):
            words = self.split(text)
            unknown = [w for w in words if w not in self._ids]
            if unknown:
                raise InputError(f"caption {text!r}: word(s) {unknown} are not in the vocabulary "
                                 f"({len(self.words)} words built from the templates)")
            ids = [self.bos_id] + [self._ids[w] for w in words] + [self.eos_id]
            if len(ids) > max_len:
                raise InputError(f"caption {text!r} is {len(ids)} tokens with BOS/EOS, longer than the "
                                 f"context max_len={max_len}")
            tokens[row, :len(ids)] = ids
            mask[row, :len(ids)] = True
        return tokens, mask


@dataclasses.dataclass(frozen=True)
class DigitsSplit:
    images: np.ndarray  # float32 [N, S, S, 3], CLIP-normalised
    labels: np.ndarray  # int32 [N]
    indices: np.ndarray  # int64 [N] rows of load_digits()

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class DigitsCaptions:
    train: DigitsSplit
    test: DigitsSplit
    tokenizer: CaptionTokenizer
    class_names: tuple[str, ...] = DIGIT_NAMES
    train_templates: tuple[str, ...] = TRAIN_TEMPLATES
    zero_shot_templates: tuple[str, ...] = ZERO_SHOT_TEMPLATES


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_indices, test_indices), sorted, with round(test_fraction * count) of each class
    in test, chosen by a `seed`-ed permutation per class."""
    if not 0.0 < test_fraction < 1.0:
        raise InputError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(test_fraction * len(idx)))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def digit_images(raw: np.ndarray, image_size: int) -> np.ndarray:
    """load_digits images [N, 8, 8] (0..16) -> float32 [N, S, S, 3] through CLIP preprocessing."""
    from mmjax.data.images import clip_preprocess

    pixels = np.round(np.asarray(raw, np.float64) * (255.0 / 16.0)).astype(np.uint8)
    return clip_preprocess(list(pixels), size=image_size, crop_size=image_size)


def load_digits_captions(image_size: int = 32, test_fraction: float = 0.2, seed: int = 0,
                         train_templates: Sequence[str] = TRAIN_TEMPLATES,
                         zero_shot_templates: Sequence[str] = ZERO_SHOT_TEMPLATES) -> DigitsCaptions:
    """The digits as an image-caption dataset (see the module docstring)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise InputError("the digits dataset needs scikit-learn (pip install scikit-learn; it is in "
                         "mmjax's 'test' extra)") from None
    if image_size < 8:
        raise InputError(f"image_size must be >= 8 (the digits are 8x8), got {image_size}")
    if not train_templates:
        raise InputError("train_templates is empty")
    digits = load_digits()
    labels = digits.target.astype(np.int32)
    train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    images = digit_images(digits.images, image_size)
    tokenizer = CaptionTokenizer.from_templates(tuple(train_templates) + tuple(zero_shot_templates))

    def split(idx):
        return DigitsSplit(images=images[idx], labels=labels[idx], indices=idx)

    return DigitsCaptions(split(train_idx), split(test_idx), tokenizer, DIGIT_NAMES,
                          tuple(train_templates), tuple(zero_shot_templates))


def class_prompts(templates: Sequence[str] = ZERO_SHOT_TEMPLATES) -> list[list[str]]:
    """Per digit 0..9, its prompt under every template: the `prompts` argument of
    `mmjax.eval.zero_shot.class_embeddings` (template ensembling)."""
    if not templates:
        raise InputError("zero-shot classification needs at least one prompt template")
    return [[caption(t, c) for t in templates] for c in range(10)]


def caption_table(tokenizer: CaptionTokenizer, templates: Sequence[str], max_len: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Every (label, template) caption tokenized: tokens, mask [10, len(templates), max_len]."""
    texts = [caption(t, c) for c in range(10) for t in templates]
    tokens, mask = tokenizer.encode(texts, max_len)
    shape = (10, len(templates), max_len)
    return tokens.reshape(shape), mask.reshape(shape)


def make_digits_dataset(split: DigitsSplit, tokenizer: CaptionTokenizer, batch_size: int, *,
                        seed: int = 0, max_len: int = 16, templates: Sequence[str] = TRAIN_TEMPLATES,
                        num_epochs: int | None = None) -> Any:
    """A grain MapDataset of training batches: shuffled each epoch, each image paired with a
    caption template drawn per example and epoch; `num_epochs=None` repeats forever.

    Batches: {"images" float32 [B, S, S, 3], "tokens" int32 [B, max_len], "input_mask" bool
    [B, max_len], "labels" int32 [B], "template" int32 [B]} (incomplete last batches dropped).
    """
    import grain

    if batch_size <= 0 or batch_size > len(split):
        raise InputError(f"batch_size must be in [1, {len(split)}] for this split, got {batch_size}")
    tokens, mask = caption_table(tokenizer, templates, max_len)
    n_templates = len(templates)

    def pair(i, rng):
        label = int(split.labels[i])
        t = int(rng.integers(n_templates))
        return {"images": split.images[i], "tokens": tokens[label, t], "input_mask": mask[label, t],
                "labels": np.int32(label), "template": np.int32(t)}

    ds = grain.MapDataset.range(len(split)).shuffle(seed=seed).repeat(num_epochs)
    return ds.random_map(pair, seed=seed + 1).batch(batch_size, drop_remainder=True)
