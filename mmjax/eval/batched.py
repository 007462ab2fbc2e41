"""Run a jitted function over many rows in fixed-size chunks: one compiled shape, the last chunk
zero-padded and its padding cut from the outputs."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np


def in_fixed_batches(fn: Callable[[np.ndarray], Any], rows: np.ndarray, batch_size: int) -> Any:
    """`fn(chunk)` over `rows` in chunks of exactly `batch_size`; returns its outputs (an array or
    a pytree of arrays with the rows first) concatenated as numpy, `len(rows)` rows each."""
    outs = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        pad = batch_size - len(chunk)
        x = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)]) if pad else chunk
        outs.append(jax.tree_util.tree_map(lambda y, n=len(chunk): np.asarray(y)[:n], fn(x)))
    return jax.tree_util.tree_map(lambda *ys: np.concatenate(ys), *outs)
