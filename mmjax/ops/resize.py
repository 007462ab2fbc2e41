"""Resize matrices matching PyTorch's `interpolate(..., align_corners=False)` (bicubic, bilinear).

A separable 2-D resize of a grid [h, w, d] to [H, W, d] is `Mh @ grid @ Mw^T` with
`Mh = resize_matrix(h, H)`, `Mw = resize_matrix(w, W)` (`resize_grid`). Used to resample
position tables: ViT's `resample_posemb`, the Qwen-VL resampler's key positions.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import configs
from mmjax.errors import ConfigError

RESAMPLE_METHODS = ("bicubic", "bilinear")


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys cubic-convolution weights of the 4 taps at offsets -1, 0, 1, 2 for fractions t."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def resize_matrix(in_size: int, out_size: int, method: str = "bicubic") -> np.ndarray:
    """[out_size, in_size] float64 matrix M with `M @ x` = PyTorch's 1-D
    `interpolate(x, out_size, mode=method, align_corners=False)` (no antialiasing): source
    coordinate (i + 0.5) * in/out - 0.5, cubic coefficient -0.75, edges clamped."""
    if method not in RESAMPLE_METHODS:
        raise ConfigError(f"resampling method {method!r}{configs.closest_name(method, RESAMPLE_METHODS)}; "
                          f"known: {', '.join(RESAMPLE_METHODS)}")
    if in_size <= 0 or out_size <= 0:
        raise ConfigError(f"resize_matrix: sizes must be positive, got {in_size} -> {out_size}")
    scale = in_size / out_size
    src = (np.arange(out_size) + 0.5) * scale - 0.5
    m = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    if method == "bilinear":
        src = np.maximum(src, 0.0)
        lo = np.floor(src).astype(int)
        frac = src - lo
        hi = np.minimum(lo + 1, in_size - 1)
        np.add.at(m, (rows, np.minimum(lo, in_size - 1)), 1.0 - frac)
        np.add.at(m, (rows, hi), frac)
        return m
    lo = np.floor(src).astype(int)
    weights = _cubic_weights(src - lo)
    for tap in range(4):
        np.add.at(m, (rows, np.clip(lo - 1 + tap, 0, in_size - 1)), weights[:, tap])
    return m


def resize_grid(grid: Any, new_hw: tuple[int, int], method: str = "bicubic") -> Any:
    """[h, w, d] -> [H, W, d] (jax or numpy in, same type out; computed in float32, cast back
    to the input dtype). Equals `interpolate(grid as [1, d, h, w], (H, W), mode=method,
    align_corners=False)`; differentiable in JAX. The same size returns the input."""
    h, w, _ = grid.shape
    nh, nw = new_hw
    if (h, w) == (nh, nw):
        return grid
    xp = jnp if isinstance(grid, jax.Array) else np
    mh = xp.asarray(resize_matrix(h, nh, method), np.float32)
    mw = xp.asarray(resize_matrix(w, nw, method), np.float32)
    kw = {"precision": jax.lax.Precision.HIGHEST} if xp is jnp else {}
    return xp.einsum("ph,hwd,qw->pqd", mh, grid.astype(np.float32), mw, **kw).astype(grid.dtype)
