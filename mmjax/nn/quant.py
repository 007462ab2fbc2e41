"""Int8 weight-only quantization of frozen `DenseGeneral` kernels (QLoRA-style frozen bases).

    layout = dense_layout(module, *example_inputs)        # {"layers_0/attn/query": (1, 2), ...}
    params = quantize_kernels(params, layout, frozen)     # kernel -> int8, + kernel_scale
    y = module.apply({"params": params}, tokens)          # DenseGeneral dequantizes on the fly
    params = dequantize_kernels(params)                   # back to float32 kernels

A quantized kernel keeps its name, shape and logical axis names but holds int8 values `q`; a
sibling param `kernel_scale` (float32, the kernel's output dims, per layer for a scanned stack)
holds one absmax scale per output channel: `kernel ~= q * kernel_scale`, `|q| <= 127`. The
per-channel rounding error is at most `scale / 2 = absmax / 254` of that channel. `DenseGeneral`
sees the scale and computes with `q.astype(dtype) * scale`; nothing else in a model changes.

This is weight-only storage compression for a frozen base (4x smaller than float32, 2x smaller
than bfloat16), the memory half of QLoRA (Dettmers et al. 2023), with int8 absmax instead of
NF4 blocks: XLA has no 4-bit type on CPU, and int8 per-channel keeps the error small enough for
fine-tuning (measured in docs/finetuning.md). The matmul itself still runs in `dtype`.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.nn.linear import DenseGeneral, _as_tuple

SCALE = "kernel_scale"


def dense_layout(module: nn.Module, *args: Any, **kwargs: Any) -> dict[str, tuple[int, int]]:
    """{module path: (number of input dims, number of output dims)} of every `DenseGeneral`
    that `module.init(rng, *args, **kwargs)` creates (one abstract pass; nothing runs).
    A scanned stack's kernels have one more leading dim than these counts."""
    seen: dict[str, tuple[int, int]] = {}

    def intercept(next_fun, a, kw, context):
        m = context.module
        if isinstance(m, DenseGeneral) and context.method_name == "__call__":
            n_out = len(_as_tuple(m.features))
            seen["/".join(m.path)] = (len(tuple(m.kernel_axes)) - n_out, n_out)
        return next_fun(*a, **kw)

    with nn.intercept_methods(intercept):
        jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kwargs))
    return seen


def quantize(kernel: jax.Array, n_lead: int, n_in: int) -> tuple[jax.Array, jax.Array]:
    """(int8 q, float32 scale), kernel ~= q * scale: one absmax scale per output channel.
    kernel [lead (n_lead dims: a scanned stack's), in (n_in dims), out...] -> scale [lead, out]."""
    k = jnp.asarray(kernel, jnp.float32)
    in_axes = tuple(range(n_lead, n_lead + n_in))
    absmax = jnp.max(jnp.abs(k), axis=in_axes, keepdims=True)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    q = jnp.clip(jnp.round(k / scale), -127, 127).astype(jnp.int8)
    return q, jnp.squeeze(scale, axis=in_axes)


def dequantize(q: jax.Array, scale: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """q * scale in `dtype`; `scale` has q's shape without its input dims (broadcast back by
    inserting them: the output dims are the trailing ones, the lead dims the leading ones)."""
    n_in = q.ndim - scale.ndim
    lead = lead_dims(q.shape, scale.shape)
    s = scale.reshape(scale.shape[:lead] + (1,) * n_in + scale.shape[lead:])
    return q.astype(dtype) * s.astype(dtype)


def lead_dims(q_shape, s_shape) -> int:
    """How many leading (stack) dims a kernel of `q_shape` shares with its scale `s_shape`."""
    n_in = len(q_shape) - len(s_shape)
    for lead in range(len(s_shape) + 1):
        if tuple(q_shape[:lead]) + tuple(q_shape[lead + n_in:]) == tuple(s_shape):
            return lead
    raise ValueError(f"kernel_scale {tuple(s_shape)} does not fit a kernel {tuple(q_shape)}")


def quantize_kernels(params: Mapping[str, Any], layout: Mapping[str, tuple[int, int]],
                     select=lambda path: True) -> dict[str, Any]:
    """`params` with the kernel of every `layout` module for which `select(module path)` holds
    replaced by int8 + `kernel_scale`. Boxed trees (nn.LogicallyPartitioned leaves) stay boxed:
    the scale is named by the kernel's names without its input dims."""

    def fold(path, node):
        name = "/".join(path)
        if name not in layout or "kernel" not in node or not select(name):
            return node
        n_in, n_out = layout[name]
        kernel = node["kernel"]
        boxed = isinstance(kernel, nn.meta.AxisMetadata)
        value = kernel.unbox() if boxed else kernel
        n_lead = np.ndim(value) - n_in - n_out
        q, scale = quantize(value, n_lead, n_in)
        out = dict(node)
        if boxed:
            names = tuple(kernel.names)
            out["kernel"] = kernel.replace_boxed(q)
            out[SCALE] = kernel.replace(value=scale, names=names[:n_lead] + names[n_lead + n_in:])
        else:
            out["kernel"], out[SCALE] = q, scale
        return out

    return _rebuild(params, fold)


def dequantize_kernels(params: Mapping[str, Any], dtype: Any = jnp.float32) -> dict[str, Any]:
    """Every int8 kernel with a `kernel_scale` back to a `dtype` kernel, scales removed."""

    def fold(path, node):
        if SCALE not in node:
            return node
        out = {k: v for k, v in node.items() if k != SCALE}
        out["kernel"] = dequantize(jnp.asarray(node["kernel"]), jnp.asarray(node[SCALE]), dtype)
        return out

    return _rebuild(params, fold)


def _rebuild(tree, fn, prefix=()):
    node = {k: (_rebuild(v, fn, prefix + (str(k),)) if isinstance(v, Mapping) else v)
            for k, v in tree.items()}
    return fn(prefix, node)


__all__ = ["SCALE", "dense_layout", "dequantize", "dequantize_kernels", "lead_dims", "quantize",
           "quantize_kernels"]
