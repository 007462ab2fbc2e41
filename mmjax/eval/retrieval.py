"""Image->text and text->image retrieval recall@K from two-tower embeddings.

    r = retrieval_recall(image_emb, text_emb, text_to_image, ks=(1, 5, 10))
    r["i2t_r@1"], r["t2i_r@5"], ...

Each text describes one image (`text_to_image[j]` = its image's row; an image may have several
texts, e.g. five COCO captions). image->text: an image is a hit at K when any of its texts is
among the K most similar texts. text->image: a text is a hit at K when its image is among the K
most similar images. Rank = the number of candidates scoring strictly higher than the best
correct one (ties count in the query's favour). Similarity is the cosine.

Class-level retrieval: with `image_labels` and `text_labels` instead of `text_to_image`, any
candidate of the query's label counts as correct (datasets whose captions repeat across images,
e.g. template captions of digits, where instance-level recall is capped by identical texts).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mmjax.errors import InputError


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def retrieval_ranks(image_emb: np.ndarray, text_emb: np.ndarray,
                    text_to_image: Sequence[int] | None = None, *,
                    image_labels: Sequence[int] | None = None,
                    text_labels: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rank of each image's best correct text [num_images], rank of each text's best correct
    image [num_texts]); 0 = retrieved first."""
    img, txt = np.asarray(image_emb), np.asarray(text_emb)
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
        raise InputError(f"image {img.shape} and text {txt.shape} embeddings must be [n, dim] with the same dim")
    if len(img) == 0 or len(txt) == 0:
        raise InputError(f"retrieval needs at least one image and one text, got {len(img)} and {len(txt)}")
    if (image_labels is None) != (text_labels is None):
        raise InputError("class-level retrieval needs both image_labels and text_labels")
    if image_labels is not None:
        if text_to_image is not None:
            raise InputError("pass either text_to_image or image_labels/text_labels, not both")
        il, tl = np.asarray(image_labels), np.asarray(text_labels)
        if il.shape != (len(img),) or tl.shape != (len(txt),):
            raise InputError(f"image_labels {il.shape} / text_labels {tl.shape} need one label per "
                             f"image ({len(img)}) / text ({len(txt)})")
        return _ranks(img, txt, il[:, None] == tl[None, :])
    owner = np.arange(len(txt)) if text_to_image is None else np.asarray(text_to_image)
    if owner.shape != (len(txt),):
        raise InputError(f"text_to_image must have one entry per text ({len(txt)}), got shape {owner.shape}")
    if owner.min() < 0 or owner.max() >= len(img):
        raise InputError(f"text_to_image entries must index the {len(img)} images, got [{owner.min()}, {owner.max()}]")
    orphans = np.setdiff1d(np.arange(len(img)), owner)
    if orphans.size:
        raise InputError(f"image(s) {orphans[:8].tolist()} have no text; every image needs one for image->text recall")
    return _ranks(img, txt, owner[None, :] == np.arange(len(img))[:, None])


def _ranks(img: np.ndarray, txt: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ranks from the boolean relevance matrix correct [I, T]."""
    return similarity_ranks(_normalize(img) @ _normalize(txt).T, correct)


def similarity_ranks(sim: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(i2t ranks [I], t2i ranks [T]) from a similarity matrix sim [I, T] (any score, higher =
    more alike: BLIP-2's max-over-queries cosine) and the relevance matrix correct [I, T]."""
    sim, correct = np.asarray(sim, np.float64), np.asarray(correct, bool)
    if sim.ndim != 2 or sim.shape != correct.shape:
        raise InputError(f"similarity {sim.shape} and relevance {correct.shape} must be the same [I, T] shape")
    no_text = np.flatnonzero(~correct.any(axis=1))
    no_image = np.flatnonzero(~correct.any(axis=0))
    if no_text.size or no_image.size:
        raise InputError(f"every query needs a correct candidate: image(s) {no_text[:8].tolist()} have no "
                         f"text, text(s) {no_image[:8].tolist()} have no image")
    best_text = np.where(correct, sim, -np.inf).max(axis=1)  # [I]
    i2t = (sim > best_text[:, None]).sum(axis=1)
    best_image = np.where(correct, sim, -np.inf).max(axis=0)  # [T]
    t2i = (sim > best_image[None, :]).sum(axis=0)
    return i2t, t2i


def similarity_recall(sim: np.ndarray, image_labels: Sequence[int], text_labels: Sequence[int],
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """`retrieval_recall` (class-level) from a precomputed similarity matrix [I, T]."""
    il, tl = np.asarray(image_labels), np.asarray(text_labels)
    i2t, t2i = similarity_ranks(sim, il[:, None] == tl[None, :])
    return {**{f"i2t_r@{k}": float(np.mean(i2t < k)) for k in ks},
            **{f"t2i_r@{k}": float(np.mean(t2i < k)) for k in ks}}


def retrieval_recall(image_emb: np.ndarray, text_emb: np.ndarray,
                     text_to_image: Sequence[int] | None = None,
                     ks: Sequence[int] = (1, 5, 10), *, image_labels: Sequence[int] | None = None,
                     text_labels: Sequence[int] | None = None) -> dict[str, float]:
    """{"i2t_r@K": ..., "t2i_r@K": ...} for each K (fractions in [0, 1]); text_to_image
    defaults to arange (text j describes image j); labels give class-level retrieval."""
    if any(k < 1 for k in ks):
        raise InputError(f"recall@K needs K >= 1, got {list(ks)}")
    i2t, t2i = retrieval_ranks(image_emb, text_emb, text_to_image, image_labels=image_labels,
                               text_labels=text_labels)
    out = {}
    for k in ks:
        out[f"i2t_r@{k}"] = float(np.mean(i2t < k))
        out[f"t2i_r@{k}"] = float(np.mean(t2i < k))
    return out
