"""Image (+ caption) data for the image tasks: the dataset, per-process training streams and
fixed-shape evaluation batches.

    data = load(cfg.data)                                  # DigitsCaptions (train/test splits)
    it = train_iterator(data, cfg.data, with_text=True)    # grain, endless, get/set_state
    for batch, n_real in eval_batches(data.test.images, data.test.labels, 256): ...

Datasets: "digits" (scikit-learn's 1,797 real 8x8 handwritten digits, upscaled, CLIP-normalised,
with template captions; `mmjax.data.digits`). Multi-host: the global `batch_size` is split over
processes, each process shuffling and reading only its own shard of the training examples.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import jax
import numpy as np

from mmjax import configs
from mmjax.errors import ConfigError

DATASETS = ("digits",)


@dataclasses.dataclass(frozen=True)
class ImageDataConfig:
    """An image (+ caption) dataset and how it is batched."""

    dataset: str = "digits"
    image_size: int = 32  # images are resized to image_size x image_size (the model's size)
    test_fraction: float = 0.2  # stratified held-out split
    batch_size: int = 64  # global batch (split over processes)
    eval_batch_size: int = 256
    max_text_len: int = 16  # caption tokens, BOS/EOS included
    seed: int = 0

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ConfigError(f"data.dataset {self.dataset!r}{configs.closest_name(self.dataset, DATASETS)}; "
                              f"known: {', '.join(DATASETS)}")
        for name in ("image_size", "batch_size", "eval_batch_size", "max_text_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"data.{name} must be positive, got {getattr(self, name)}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"data.test_fraction must be in (0, 1), got {self.test_fraction}")


def load(cfg: ImageDataConfig):
    """The dataset's train/test splits (+ caption tokenizer and templates)."""
    from mmjax.data.digits import load_digits_captions

    return load_digits_captions(image_size=cfg.image_size, test_fraction=cfg.test_fraction,
                                seed=cfg.seed)


def process_shard(split, batch_size: int):
    """(this process's examples of `split`, this process's batch size)."""
    from mmjax.data.digits import DigitsSplit

    count, index = jax.process_count(), jax.process_index()
    if batch_size % count:
        raise ConfigError(f"data.batch_size={batch_size} is not divisible by the {count} processes")
    idx = np.arange(len(split))[index::count]
    local = DigitsSplit(images=split.images[idx], labels=split.labels[idx], indices=split.indices[idx])
    return local, batch_size // count


def train_iterator(data, cfg: ImageDataConfig, *, with_text: bool) -> Iterator[dict[str, Any]]:
    """Endless shuffled training batches of this process: {"images", "labels"} (+ "tokens",
    "input_mask" with captions drawn per example and epoch), resumable via get/set_state."""
    from mmjax.data.digits import make_digits_dataset

    local, batch = process_shard(data.train, cfg.batch_size)
    ds = make_digits_dataset(local, data.tokenizer, batch, seed=cfg.seed, max_len=cfg.max_text_len,
                             templates=data.train_templates)
    keys = ("images", "labels", "tokens", "input_mask") if with_text else ("images", "labels")
    ds = ds.map(lambda b: {k: b[k] for k in keys})
    return iter(ds.to_iter_dataset())


def eval_batches(*arrays: np.ndarray, batch_size: int) -> Iterator[tuple[tuple[np.ndarray, ...], int]]:
    """Fixed-shape batches over the rows of `arrays` (the last one padded by repeating row 0,
    so one compiled program serves all): yields (batch arrays, number of real rows)."""
    n = len(arrays[0])
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        real = stop - start
        out = []
        for a in arrays:
            chunk = a[start:stop]
            if real < batch_size:
                pad = np.repeat(a[:1], batch_size - real, axis=0)
                chunk = np.concatenate([chunk, pad], axis=0)
            out.append(chunk)
        yield tuple(out), real
