"""Dense layers whose kernels carry logical axis names."""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Initializer = Callable[..., jax.Array]


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, Sequence) else (x,)


def _dequantize(q, scale, dtype):
    n_in = q.ndim - scale.ndim
    return q.astype(dtype) * scale.astype(dtype).reshape((1,) * n_in + scale.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _int8_dot(x, q, scale, contract, dtype, precision, x_shape):
    """x . (q * scale) for a FROZEN int8 kernel: the backward pass dequantizes the kernel again
    instead of keeping the float kernel as a residual (it saves only q and the scales), and
    gives no gradient to q or the scales."""
    return lax.dot_general(x, _dequantize(q, scale, dtype), (contract, ((), ())),
                           precision=precision)


def _int8_dot_fwd(x, q, scale, contract, dtype, precision, x_shape):
    return _int8_dot(x, q, scale, contract, dtype, precision, x_shape), (q, scale)


def _int8_dot_bwd(contract, dtype, precision, x_shape, residuals, g):
    q, scale = residuals
    kernel = _dequantize(q, scale, dtype)
    dot = lambda x: lax.dot_general(x, kernel, (contract, ((), ())), precision=precision)  # noqa: E731
    (dx,) = jax.linear_transpose(dot, jax.ShapeDtypeStruct(x_shape, dtype))(g.astype(dtype))
    return dx, np.zeros(q.shape, jax.dtypes.float0), jnp.zeros_like(scale)


_int8_dot.defvjp(_int8_dot_fwd, _int8_dot_bwd)


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
        contract = (axis, tuple(range(len(axis))))
        if self.has_variable("params", "kernel_scale"):  # int8 weight-only (mmjax.nn.quant)
            scale = self.get_variable("params", "kernel_scale")
            y = _int8_dot(x, kernel, scale, contract, jnp.dtype(self.dtype), self.precision,
                          tuple(x.shape))
        else:
            kernel = kernel.astype(self.dtype)
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
