"""Visual sentences (LVM, Bai et al. 2023): several images' VQ tokens strung into one sequence
with BOS / EOS, for next-token training of a decoder-only LM.

    BOS  img_1 (h*w codes)  img_2 ...  img_n  EOS         ids: codes 0..K-1, BOS = K, EOS = K+1

The LVM paper's sentences are video frames, image + annotation pairs, or images of one class;
the kinds here are built from labelled digit scans, so that the last image of a sentence follows
from the earlier ones by a rule the model has to infer at test time (visual prompting):

  "successor"  images of the digits d, d+1, ..., d+n-1 (mod 10), each a random scan of its class:
               given the first n-1, the next is a scan of d+n-1 (any scan: judged by its class);
  "flip"       pairs (image, its mirror image) of random scans: given the pairs before and a new
               image, the next is that image mirrored left-right (judged pixel by pixel).

Each sentence is a pure function of (seed, index): `sentence_images(...)` draws it from
`np.random.default_rng([seed, index])`, so training streams resume exactly and the evaluation
sentences are fixed.
"""

from __future__ import annotations

import numpy as np

from mmjax.errors import ConfigError, InputError

KINDS = ("successor", "flip")
NUM_CLASSES = 10


def special_ids(codebook_size: int) -> tuple[int, int]:
    """(BOS, EOS) ids after a codebook of `codebook_size` codes; the LM vocabulary is K + 2."""
    return codebook_size, codebook_size + 1


def check_kind(kind: str, images_per_sentence: int) -> None:
    if kind not in KINDS:
        raise ConfigError(f"data.kind {kind!r}: one of {', '.join(KINDS)}")
    if images_per_sentence < 2:
        raise ConfigError(f"data.images_per_sentence must be >= 2 (a prompt and the image to "
                          f"predict), got {images_per_sentence}")
    if kind == "flip" and images_per_sentence % 2:
        raise ConfigError(f"data.kind 'flip' strings (image, mirror) pairs: images_per_sentence "
                          f"must be even, got {images_per_sentence}")


def sentence_images(kind: str, labels: np.ndarray, n: int, seed: int, index: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(image indices [n], mirrored flags [n]) of sentence `index` over a pool with `labels`."""
    rng = np.random.default_rng([seed, index])
    if kind == "successor":
        start = int(rng.integers(NUM_CLASSES))
        picks = []
        for j in range(n):
            pool = np.flatnonzero(labels == (start + j) % NUM_CLASSES)
            if len(pool) == 0:
                raise InputError(f"no image of digit {(start + j) % NUM_CLASSES} in the pool")
            picks.append(int(rng.choice(pool)))
        return np.asarray(picks), np.zeros(n, bool)
    base = rng.choice(len(labels), size=n // 2, replace=len(labels) < n // 2)
    return np.repeat(base, 2), np.tile([False, True], n // 2)


def sentence_tokens(image_tokens: np.ndarray, mirrored_tokens: np.ndarray | None, picks: np.ndarray,
                    mirrored: np.ndarray, codebook_size: int) -> np.ndarray:
    """int32 [n * T + 2]: BOS, each picked image's T codes (its mirror's where flagged), EOS."""
    bos, eos = special_ids(codebook_size)
    if mirrored.any() and mirrored_tokens is None:
        raise InputError("a 'flip' sentence needs the mirrored images' tokens")
    parts = [mirrored_tokens[i] if m else image_tokens[i] for i, m in zip(picks, mirrored)]
    return np.concatenate([[bos], *parts, [eos]]).astype(np.int32)


def check_tokens(tokens: np.ndarray, codebook_size: int, what: str = "image tokens") -> None:
    """InputError unless `tokens` are integer codes in [0, codebook_size)."""
    t = np.asarray(tokens)
    if not np.issubdtype(t.dtype, np.integer):
        raise InputError(f"{what} must be integer codes, got {t.dtype}")
    if t.size and (t.min() < 0 or t.max() >= codebook_size):
        bad = int(t.min()) if t.min() < 0 else int(t.max())
        raise InputError(f"{what}: code {bad} is outside the codebook [0, {codebook_size})")
