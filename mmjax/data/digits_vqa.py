"""Visual instructions about real handwritten digits, built offline: LLaVA's two training stages
on scikit-learn's digits.

    data = load_digits_vqa(image_size=32, seed=0)
    data.train.raw           # uint8 [N, 8, 8] (0..255) scans of the train split, labels beside
    ex = caption_example(data.train, i, rng)         # stage 1: {"image", "conversation", ...}
    ex = instruction_example(data.train, i, "parity", rng)   # stage 2
    held_out = eval_examples(data.test, per_type=50, seed=0)  # fixed list, every type

Stage 1 (feature alignment, LLaVA's "plain" data): an image and a caption ("handwritten 7",
"a photo of the digit seven.", the CLIP digits templates of `mmjax.data.digits`).

Stage 2 (visual instruction tuning): a question about the image and a short answer, one of
`QUESTION_TYPES`:
  digit     "What digit is shown in the image?" -> "7"
  parity    "Is the digit even or odd?" -> "odd"
  plus_one  "What is the digit plus one?" -> "8" (9 -> "10")
  count     a 2 x 2 grid holding 1-4 digits of the split (blank cells elsewhere):
            "How many digits are in the image?" -> "3"
Each type has several phrasings (`QUESTIONS`); the answer is the same short string for all of
them, so accuracy is an exact match of the generated answer (`normalize_answer`). Held-out
images come from the test split (a stratified 20% of the 1,797 scans, the split CLIP digits
holds out); grid images for `count` are built from test digits only.

Images: an 8 x 8 scan (or the 16 x 16 grid) -> uint8 RGB -> CLIP preprocessing at
`image_size` (`mmjax.data.digits.digit_images`), float32 [S, S, 3].

A conversation is a list of {"role", "content"} turns with `<image>` where the image goes
(`mmjax.data.chat` renders it with a template).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from mmjax.data.digits import TRAIN_TEMPLATES, caption, stratified_split
from mmjax.errors import InputError

QUESTION_TYPES = ("digit", "parity", "plus_one", "count")
QUESTIONS: dict[str, tuple[str, ...]] = {
    "digit": ("What digit is shown in the image?", "Which number is written here?",
              "What is this digit?"),
    "parity": ("Is the digit even or odd?", "Is this number odd or even?",
               "Even or odd: which is the digit?"),
    "plus_one": ("What is the digit plus one?", "Add one to the number shown. What is the result?",
                 "What number comes after this digit?"),
    "count": ("How many digits are in the image?", "Count the digits in the picture.",
              "How many numbers are written here?"),
}
IMAGE = "<image>"
GRID = 2  # count images: GRID x GRID cells of 8 x 8


@dataclasses.dataclass(frozen=True)
class RawSplit:
    """One split of the digits: raw uint8 scans [N, 8, 8] (0..255) and labels [N]."""

    raw: np.ndarray
    labels: np.ndarray
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class DigitsVQA:
    train: RawSplit
    test: RawSplit
    image_size: int


def load_digits_vqa(image_size: int = 32, test_fraction: float = 0.2, seed: int = 0) -> DigitsVQA:
    """The digits split as in `mmjax.data.digits.load_digits_captions` (same held-out images)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise InputError("the digits dataset needs scikit-learn (pip install scikit-learn; it is in "
                         "mmjax's 'test' extra)") from None
    if image_size < 2 * GRID * 4:
        raise InputError(f"image_size must be >= {2 * GRID * 4} (a {GRID}x{GRID} grid of 8x8 "
                         f"digits must stay legible), got {image_size}")
    digits = load_digits()
    labels = digits.target.astype(np.int32)
    raw = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    train_idx, test_idx = stratified_split(labels, test_fraction, seed)

    def split(idx):
        return RawSplit(raw[idx], labels[idx], idx)

    return DigitsVQA(split(train_idx), split(test_idx), image_size)


def preprocess(raw: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 [h, w] scan (0..255) -> float32 [S, S, 3] CLIP-normalised."""
    from mmjax.data.images import clip_preprocess

    return clip_preprocess([np.asarray(raw, np.uint8)], size=image_size, crop_size=image_size)[0]


def grid_image(split: RawSplit, count: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [16, 16]: `count` random digits of `split` in random cells of a 2 x 2 grid."""
    if not 1 <= count <= GRID * GRID:
        raise InputError(f"count must be in [1, {GRID * GRID}], got {count}")
    cells = rng.choice(GRID * GRID, size=count, replace=False)
    picks = rng.integers(len(split), size=count)
    out = np.zeros((GRID * 8, GRID * 8), np.uint8)
    for cell, pick in zip(cells, picks):
        r, c = divmod(int(cell), GRID)
        out[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = split.raw[pick]
    return out


def answer(qtype: str, value: int) -> str:
    """The short answer to a question of `qtype` about digit (or count) `value`."""
    if qtype == "digit":
        return str(value)
    if qtype == "parity":
        return "even" if value % 2 == 0 else "odd"
    if qtype == "plus_one":
        return str(value + 1)
    if qtype == "count":
        return str(value)
    raise InputError(f"unknown question type {qtype!r}; known: {', '.join(QUESTION_TYPES)}")


def normalize_answer(text: str) -> str:
    """Lower case, surrounding whitespace and trailing punctuation dropped: what is compared."""
    return re.sub(r"[\s.!,;:]+$", "", text.strip().lower())


def caption_example(split: RawSplit, i: int, rng: np.random.Generator, image_size: int) -> dict:
    """Stage 1: image i with one of the caption templates (drawn by `rng`)."""
    label = int(split.labels[i])
    text = caption(TRAIN_TEMPLATES[int(rng.integers(len(TRAIN_TEMPLATES)))], label)
    return {"image": preprocess(split.raw[i], image_size),
            "conversation": [{"role": "user", "content": IMAGE},
                             {"role": "assistant", "content": text}],
            "qtype": "caption", "answer": text}


def instruction_example(split: RawSplit, i: int, qtype: str, rng: np.random.Generator,
                        image_size: int) -> dict:
    """Stage 2: a question of `qtype` (phrasing drawn by `rng`) about image i (or, for "count",
    about a grid of 1-4 digits of the split drawn by `rng`)."""
    if qtype not in QUESTIONS:
        raise InputError(f"unknown question type {qtype!r}; known: {', '.join(QUESTION_TYPES)}")
    if qtype == "count":
        value = int(rng.integers(1, GRID * GRID + 1))
        raw = grid_image(split, value, rng)
    else:
        value, raw = int(split.labels[i]), split.raw[i]
    question = QUESTIONS[qtype][int(rng.integers(len(QUESTIONS[qtype])))]
    reply = answer(qtype, value)
    return {"image": preprocess(raw, image_size),
            "conversation": [{"role": "user", "content": f"{IMAGE}\n{question}"},
                             {"role": "assistant", "content": reply}],
            "qtype": qtype, "answer": reply}


def eval_examples(split: RawSplit, per_type: int, seed: int, image_size: int,
                  types: tuple[str, ...] = QUESTION_TYPES) -> list[dict]:
    """A fixed list: `per_type` held-out questions of every type (images cycled through the
    split in a seeded order; the first phrasing of each type, so runs compare on equal terms)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(split))
    out = []
    for qtype in types:
        for k in range(per_type):
            ex = instruction_example(split, int(order[k % len(order)]), qtype, rng, image_size)
            question = QUESTIONS[qtype][0]
            ex["conversation"][0]["content"] = f"{IMAGE}\n{question}"
            out.append(ex)
    return out


def describe_example(ex: dict[str, Any]) -> str:
    turns = " | ".join(f"{t['role']}: {t['content']!r}" for t in ex["conversation"])
    return f"[{ex['qtype']}] {turns}"
