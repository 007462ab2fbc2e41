"""Zero-shot classification with a two-tower (CLIP / SigLIP) model.

    prompts = build_prompts(["cat", "dog"], ["a photo of a {}.", "a drawing of a {}."])
    classes = class_embeddings(encode_text, prompts)          # [num_classes, dim], unit norm
    scores = zero_shot_scores(image_emb, classes)             # [num_images, num_classes] cosine
    acc = zero_shot_accuracy(image_emb, labels, classes)      # {"top1": ..., "top5": ...}

Template ensembling (CLIP paper, section 3.1.4): each class is embedded with every prompt
template, the normalised embeddings are averaged and the mean is normalised again -- one
classifier row per class. `encode_text(list_of_strings) -> [n, dim]` is any function (it may
tokenize, batch and jit as it likes); the embeddings need not come normalised.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from mmjax.errors import InputError

EncodeText = Callable[[list[str]], "np.ndarray"]


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def build_prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """[[template.format(name) for template in templates] for name in class_names]; every
    template holds one "{}" placeholder."""
    if len(class_names) == 0:
        raise InputError("zero-shot classification needs at least one class name (got an empty list)")
    if len(templates) == 0:
        raise InputError("zero-shot classification needs at least one prompt template (got an empty list)")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise InputError(f"prompt templates need exactly one '{{}}' placeholder for the class name: {bad}")
    return [[t.format(name) for t in templates] for name in class_names]


def class_embeddings(encode_text: EncodeText, prompts: Sequence[Sequence[str]],
                     batch_size: int = 256) -> np.ndarray:
    """One unit-norm row per class: mean of the normalised embeddings of the class's prompts,
    normalised again. prompts: per class, a non-empty list of strings -> [num_classes, dim]."""
    if len(prompts) == 0:
        raise InputError("zero-shot classification needs at least one class (got no prompts)")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise InputError(f"class(es) {empty} have no prompts")
    flat = [text for per_class in prompts for text in per_class]
    chunks = [np.asarray(encode_text(flat[i:i + batch_size])) for i in range(0, len(flat), batch_size)]
    emb = _normalize(np.concatenate(chunks, axis=0))
    if emb.ndim != 2 or emb.shape[0] != len(flat):
        raise InputError(f"encode_text returned shape {emb.shape} for {len(flat)} prompts; expected "
                         f"[{len(flat)}, dim]")
    rows, start = [], 0
    for per_class in prompts:
        rows.append(emb[start:start + len(per_class)].mean(axis=0))
        start += len(per_class)
    return _normalize(np.stack(rows))


def zero_shot_scores(image_emb: np.ndarray, class_emb: np.ndarray) -> np.ndarray:
    """Cosine similarity of each image with each class: [num_images, num_classes]."""
    image_emb, class_emb = np.asarray(image_emb), np.asarray(class_emb)
    if image_emb.ndim != 2 or class_emb.ndim != 2 or image_emb.shape[1] != class_emb.shape[1]:
        raise InputError(f"image embeddings {image_emb.shape} and class embeddings {class_emb.shape} "
                         "must be [n, dim] and [classes, dim] with the same dim")
    if class_emb.shape[0] == 0:
        raise InputError("zero-shot classification needs at least one class (got 0 class embeddings)")
    return _normalize(image_emb) @ _normalize(class_emb).T


def zero_shot_accuracy(image_emb: np.ndarray, labels: np.ndarray, class_emb: np.ndarray,
                       topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """{"top1": fraction of images whose label is the best-scoring class, "top5": ... among the
    5 best} (k larger than the number of classes is capped at it)."""
    scores = zero_shot_scores(image_emb, class_emb)
    labels = np.asarray(labels)
    if labels.shape != (scores.shape[0],):
        raise InputError(f"labels must be [{scores.shape[0]}] (one per image), got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= scores.shape[1]):
        raise InputError(f"labels must be class indices in [0, {scores.shape[1]}), got "
                         f"[{labels.min()}, {labels.max()}]")
    # rank of the true class: how many classes score strictly higher
    true = scores[np.arange(len(labels)), labels]
    rank = (scores > true[:, None]).sum(axis=1)
    return {f"top{k}": float(np.mean(rank < min(k, scores.shape[1]))) for k in topk}
