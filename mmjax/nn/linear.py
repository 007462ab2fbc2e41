"""Dense layers whose kernels carry logical axis names."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Initializer = Callable[..., jax.Array]


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, Sequence) else (x,)


class DenseGeneral(nn.Module):
    """y = x . kernel (+ bias), contracting `axis` of x against the leading kernel dims.

    kernel shape = [x.shape[a] for a in axis] + features, named by `kernel_axes` (one logical
    name per kernel dim). E.g. a query projection: features=(heads, head_dim),
    kernel_axes=("embed", "heads", "head_dim"); the output projection: axis=(-2, -1),
    kernel_axes=("heads", "head_dim", "embed").

    Params are stored in `param_dtype`; the matmul runs in `dtype` (e.g. fp32 params, bf16 compute).
    A frozen kernel quantized to int8 (`mmjax.nn.quant`) comes with a `kernel_scale` param beside
    it (one scale per output channel) and is dequantized on the fly: `q.astype(dtype) * scale`.
    """

    features: int | Sequence[int]
    kernel_axes: Sequence[str]
    axis: int | Sequence[int] = -1
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.normal(0.02)
    bias_init: Initializer = nn.initializers.zeros_init()
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = _as_tuple(self.features)
        axis = tuple(a % x.ndim for a in _as_tuple(self.axis))
        in_shape = tuple(x.shape[a] for a in axis)
        if len(self.kernel_axes) != len(in_shape) + len(features):
            raise ValueError(
                f"{self.name}: kernel_axes {tuple(self.kernel_axes)} must name "
                f"{len(in_shape) + len(features)} dims (in {in_shape} + out {features})"
            )
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, tuple(self.kernel_axes)),
            in_shape + features,
            self.param_dtype,
        )
        x = x.astype(self.dtype)
        if self.has_variable("params", "kernel_scale"):  # int8 weight-only (mmjax.nn.quant)
            scale = self.get_variable("params", "kernel_scale").astype(self.dtype)
            kernel = kernel.astype(self.dtype) * scale.reshape((1,) * len(in_shape) + scale.shape)
        else:
            kernel = kernel.astype(self.dtype)
        contract = (axis, tuple(range(len(axis))))
        # output: x's free dims in order, then the feature dims
        y = lax.dot_general(x, kernel, (contract, ((), ())), precision=self.precision)
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(self.bias_init, tuple(self.kernel_axes[len(in_shape):])),
                features,
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y
