"""Image->text and text->image retrieval recall@K from two-tower embeddings.

    r = retrieval_recall(image_emb, text_emb, text_to_image, ks=(1, 5, 10))
    r["i2t_r@1"], r["t2i_r@5"], ...

Each text describes one image (`text_to_image[j]` = its image's row; an image may have several
texts, e.g. five COCO captions). image->text: an image is a hit at K when any of its texts is
among the K most similar texts. text->image: a text is a hit at K when its image is among the K
most similar images. Rank = the number of candidates scoring strictly higher than the best
correct one (ties count in the query's favour). Similarity is the cosine.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mmjax.errors import InputError


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def retrieval_ranks(image_emb: np.ndarray, text_emb: np.ndarray,
                    text_to_image: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rank of each image's best correct text [num_images], rank of each text's image
    [num_texts]); 0 = retrieved first."""
    img, txt = np.asarray(image_emb), np.asarray(text_emb)
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
        raise InputError(f"image {img.shape} and text {txt.shape} embeddings must be [n, dim] with the same dim")
    if len(img) == 0 or len(txt) == 0:
        raise InputError(f"retrieval needs at least one image and one text, got {len(img)} and {len(txt)}")
    owner = np.arange(len(txt)) if text_to_image is None else np.asarray(text_to_image)
    if owner.shape != (len(txt),):
        raise InputError(f"text_to_image must have one entry per text ({len(txt)}), got shape {owner.shape}")
    if owner.min() < 0 or owner.max() >= len(img):
        raise InputError(f"text_to_image entries must index the {len(img)} images, got [{owner.min()}, {owner.max()}]")
    orphans = np.setdiff1d(np.arange(len(img)), owner)
    if orphans.size:
        raise InputError(f"image(s) {orphans[:8].tolist()} have no text; every image needs one for image->text recall")
    sim = _normalize(img) @ _normalize(txt).T  # [I, T]
    correct = owner[None, :] == np.arange(len(img))[:, None]  # [I, T]
    best = np.where(correct, sim, -np.inf).max(axis=1)  # [I]
    i2t = (sim > best[:, None]).sum(axis=1)
    own = sim[owner, np.arange(len(txt))]  # [T]
    t2i = (sim > own[None, :]).sum(axis=0)
    return i2t, t2i


def retrieval_recall(image_emb: np.ndarray, text_emb: np.ndarray,
                     text_to_image: Sequence[int] | None = None,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """{"i2t_r@K": ..., "t2i_r@K": ...} for each K (fractions in [0, 1]); text_to_image
    defaults to arange (text j describes image j)."""
    if any(k < 1 for k in ks):
        raise InputError(f"recall@K needs K >= 1, got {list(ks)}")
    i2t, t2i = retrieval_ranks(image_emb, text_emb, text_to_image)
    out = {}
    for k in ks:
        out[f"i2t_r@{k}"] = float(np.mean(i2t < k))
        out[f"t2i_r@{k}"] = float(np.mean(t2i < k))
    return out
