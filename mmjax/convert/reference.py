"""Pieces the per-family `compare` runners share (the runners live in their family's
converter file, `Converter.compare`; the driver is `mmjax.convert.compare`).

A runner loads the transformers model with `load_reference` (float32, eager attention, eval
mode), runs the mmjax model with `run_mmjax` (jitted, `return_intermediates=True`, highest
matmul precision so TF32 on GPUs does not count as a difference) and reports `max_abs`
differences. torch, transformers and jax are imported by the caller or lazily here, never at
import time.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from mmjax.errors import MmjaxError


def to_numpy(x: Any) -> np.ndarray:
    """A torch tensor, jax array or numpy array as a numpy array."""
    if hasattr(x, "detach"):  # torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def max_abs(a: Any, b: Any, mask: np.ndarray | None = None) -> float:
    """max |a - b|, over the positions where `mask` [batch, seq] is True when given."""
    diff = np.abs(np.asarray(to_numpy(a), np.float32) - np.asarray(to_numpy(b), np.float32))
    if mask is None:
        return float(diff.max())
    return float(diff[mask].max()) if mask.any() else 0.0


def layer_diffs(ours: Sequence[Any], reference: Sequence[Any], mask: np.ndarray | None = None) -> list[float]:
    """`max_abs` of each hidden state; MmjaxError when the two sides have different counts."""
    if len(ours) != len(reference):
        raise MmjaxError(f"hidden state count differs: mmjax {len(ours)}, reference {len(reference)}")
    return [max_abs(a, b, mask) for a, b in zip(ours, reference)]


def random_images(rng: np.random.Generator, batch: int, vision_config: Any) -> np.ndarray:
    """Normalised-looking random images, NCHW as transformers takes them (mmjax takes NHWC:
    `nhwc(images)`)."""
    h, w = vision_config.image_hw
    return rng.normal(size=(batch, vision_config.channels, h, w)).astype(np.float32)


def nhwc(images_nchw: np.ndarray) -> np.ndarray:
    return images_nchw.transpose(0, 2, 3, 1)


def load_reference(transformers: Any, torch: Any, model_class: Any, hf_dir: str) -> Any:
    """The transformers model `model_class` (a class or its name in `transformers`) of `hf_dir`
    in float32 with eager attention, in eval mode."""
    cls = getattr(transformers, model_class) if isinstance(model_class, str) else model_class
    return cls.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()


def run_mmjax(module: Any, np_params: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """(output, intermediates) of `module.apply(..., *args, **kwargs, return_intermediates=True)`,
    jitted (args and kwargs are traced arrays), at highest matmul precision."""
    import jax
    import jax.numpy as jnp

    params = jax.tree_util.tree_map(jnp.asarray, np_params)
    apply = jax.jit(lambda p, a, k: module.apply({"params": p}, *a, **k, return_intermediates=True))
    with jax.default_matmul_precision("highest"):
        return apply(params, args, kwargs)
