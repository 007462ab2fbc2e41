"""Cluttered digits: scikit-learn's real 8x8 digit scans placed at a random position and size on a
larger canvas among fragments of other digits. An image set on which raw pixels are *not* enough.

Why: a linear probe on the raw pixels of the centred 8x8 digits already scores ~96%, so it cannot
tell a learned representation from none. Here each canvas (default 32x32, one channel) holds one
digit resized to a random side in `digit_size` (10-18 px) at a uniformly random place, plus
`clutter` fragments (random `piece` x `piece` crops, 5 px, of other digits of the same split)
composited with max() at random places. A pixel probe must now learn every digit at every
position and scale from few labels; an encoder that pools over positions can carry what it
learned without labels (the evaluation of `experiments/ijepa_digits.py`, which is fair because
the trained encoder, the same network at random init and the pixels get the same labelled
examples and the same linear probe).

    data = load_cluttered_digits(canvas=32, copies=4, seed=0)
    data.train.images  # float32 [N, 32, 32, 1] in [-1, 1] (0 = empty canvas ... 1 = ink)
    probe_rows = labelled_subset(data.train.labels, per_class=20, seed=0)

Splits: the stratified 80/20 split of the digits (as CLIP / BLIP use, `stratified_split`);
`copies` canvases per training digit (different placements and clutter), one per test digit;
clutter is drawn from the same split only (no test ink in training images). Deterministic in
`seed`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mmjax.data.digits import stratified_split
from mmjax.errors import InputError


@dataclasses.dataclass(frozen=True)
class CanvasSplit:
    images: np.ndarray  # float32 [N, C, C, 1] in [-1, 1]
    labels: np.ndarray  # int32 [N]
    digit_rows: np.ndarray  # int64 [N]: the load_digits() row of the digit on each canvas
    boxes: np.ndarray  # int32 [N, 3]: top, left, side of the digit

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class ClutteredDigits:
    train: CanvasSplit
    test: CanvasSplit
    canvas: int


class _Sizes:
    """Every digit bilinearly resized to each side, computed once per side ([N, side, side], 0..1)."""

    def __init__(self, digits: np.ndarray):
        self.digits = np.asarray(digits, np.float64) / 16.0
        self.cache: dict[int, np.ndarray] = {}

    def __call__(self, row: int, side: int) -> np.ndarray:
        if side not in self.cache:
            from mmjax.ops.resize import resize_matrix

            m = resize_matrix(self.digits.shape[1], side, "bilinear")
            self.cache[side] = np.clip(np.einsum("ij,njk,lk->nil", m, self.digits, m), 0, 1).astype(np.float32)
        return self.cache[side][row]


def _render(digits: "_Sizes", rows: np.ndarray, labels: np.ndarray, copies: int, canvas: int,
            digit_size: tuple[int, int], clutter: int, piece: int, rng: np.random.Generator) -> CanvasSplit:
    n = len(rows) * copies
    images = np.zeros((n, canvas, canvas), np.float32)
    boxes = np.zeros((n, 3), np.int32)
    order = np.repeat(np.arange(len(rows)), copies)
    for k, i in enumerate(order):
        img = images[k]
        for _ in range(clutter):  # fragments of other digits of this split
            frag = digits(rows[rng.integers(len(rows))], int(rng.integers(digit_size[0], digit_size[1] + 1)))
            y, x = rng.integers(0, frag.shape[0] - piece + 1, size=2)
            frag = frag[y:y + piece, x:x + piece]
            ty, tx = rng.integers(0, canvas - piece + 1, size=2)
            img[ty:ty + piece, tx:tx + piece] = np.maximum(img[ty:ty + piece, tx:tx + piece], frag)
        side = int(rng.integers(digit_size[0], digit_size[1] + 1))
        top, left = (int(v) for v in rng.integers(0, canvas - side + 1, size=2))
        img[top:top + side, left:left + side] = np.maximum(img[top:top + side, left:left + side],
                                                           digits(rows[i], side))
        boxes[k] = (top, left, side)
    return CanvasSplit(images=(images * 2.0 - 1.0)[..., None], labels=labels[rows][order].astype(np.int32),
                       digit_rows=rows[order], boxes=boxes)


def load_cluttered_digits(canvas: int = 32, copies: int = 4, digit_size: tuple[int, int] = (10, 18),
                          clutter: int = 4, piece: int = 5, test_fraction: float = 0.2,
                          seed: int = 0) -> ClutteredDigits:
    """See the module docstring."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise InputError("the cluttered digits need scikit-learn (in mmjax's 'test' extra)") from None
    lo, hi = digit_size
    if not 1 <= lo <= hi <= canvas:
        raise InputError(f"digit_size {digit_size} must satisfy 1 <= low <= high <= canvas={canvas}")
    if copies < 1 or clutter < 0 or not 1 <= piece <= lo:
        raise InputError(f"need copies >= 1, clutter >= 0 and 1 <= piece <= digit_size low; got copies={copies}, "
                         f"clutter={clutter}, piece={piece}")
    d = load_digits()
    labels = d.target.astype(np.int32)
    train_rows, test_rows = stratified_split(labels, test_fraction, seed)
    rng = np.random.default_rng(seed)
    sizes = _Sizes(d.images)
    train = _render(sizes, train_rows, labels, copies, canvas, digit_size, clutter, piece, rng)
    test = _render(sizes, test_rows, labels, 1, canvas, digit_size, clutter, piece, rng)
    return ClutteredDigits(train, test, canvas)


def labelled_subset(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Sorted row indices of `per_class` examples of each class (the few labels a probe gets)."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise InputError(f"class {c} has {len(idx)} examples, fewer than per_class={per_class}")
        rows.append(rng.choice(idx, per_class, replace=False))
    return np.sort(np.concatenate(rows))
