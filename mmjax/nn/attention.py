"""Multi-head attention block for self- and cross-attention (MHA / GQA / MQA, RoPE, KV cache).

All attention math goes through `mmjax.ops.attention`.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn.linear import DenseGeneral
from mmjax.nn.norms import LayerNorm, RMSNorm
from mmjax.ops.attention import attention
from mmjax.ops.rope import apply_rope


class Attention(nn.Module):
    """Projections q/k/v -> ops.attention -> output projection.

    Params: query [embed, heads, head_dim], key/value [embed, kv_heads, head_dim],
    out [heads, head_dim, embed] (+ biases when asked).

    Call: `attn(x, kv_input=None, *, value_input, mask, causal, segment_ids, positions,
    kv_positions, inv_freq, cache_kv, cache_index)`.
      x [batch, q_len, embed]; kv_input [batch, kv_len, embed_kv] for cross-attention.
      value_input: [batch, kv_len, embed_kv] the values are projected from, when they differ
        from the keys' input (DETR / Qwen-VL add positions to the keys only); default kv_input.
      inv_freq: RoPE inverse frequencies, or None for no rotary embedding.
      cache_kv: (k, v) each [batch, max_len, kv_heads, head_dim] -> the new K/V are written at
        slot `cache_index` and the queries attend over the whole cache (with `mask`).
    Returns out [batch, q_len, out_features or embed], plus the updated (k, v) when
    cache_kv is given.

    qk_norm: "rms" or "layer" normalises each query and key head over head_dim right after
    the projection, before RoPE (params `query_norm`, `key_norm` [head_dim]; Idefics' gated
    cross-attention uses RMSNorm, its perceiver LayerNorm; Qwen3 / OLMo-2 style); None: none.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    out_features: int | None = None
    qkv_bias: bool = False
    out_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.normal(0.02)
    implementation: str | None = None
    scale: float | None = None
    qk_norm: str | None = None  # None | "rms" | "layer" (per head, over head_dim)
    qk_norm_eps: float = 1e-6

    def _qk_norm(self, x: jax.Array, name: str) -> jax.Array:
        if self.qk_norm == "rms":
            return RMSNorm(self.qk_norm_eps, self.dtype, self.param_dtype, name=name)(x)
        if self.qk_norm == "layer":
            return LayerNorm(self.qk_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                             name=name)(x)
        raise ValueError(f"{self.name}: qk_norm must be None, 'rms' or 'layer', got {self.qk_norm!r}")

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        kv_input: jax.Array | None = None,
        *,
        value_input: jax.Array | None = None,
        mask: jax.Array | None = None,
        causal: bool = False,
        segment_ids: Any = None,
        positions: jax.Array | None = None,
        kv_positions: jax.Array | None = None,
        inv_freq: Any = None,
        cache_kv: tuple[jax.Array, jax.Array] | None = None,
        cache_index: jax.Array | None = None,
    ):
        kv_input = x if kv_input is None else kv_input
        value_input = kv_input if value_input is None else value_input
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init)
        q = DenseGeneral((self.num_heads, self.head_dim), ("embed", "heads", "head_dim"),
                         use_bias=self.qkv_bias, name="query", **kw)(x)
        k = DenseGeneral((self.num_kv_heads, self.head_dim), ("embed", "kv_heads", "head_dim"),
                         use_bias=self.qkv_bias, name="key", **kw)(kv_input)
        v = DenseGeneral((self.num_kv_heads, self.head_dim), ("embed", "kv_heads", "head_dim"),
                         use_bias=self.qkv_bias, name="value", **kw)(value_input)
        if self.qk_norm is not None:
            q, k = self._qk_norm(q, "query_norm"), self._qk_norm(k, "key_norm")
        if inv_freq is not None:
            if positions is None:
                raise ValueError(f"{self.name}: RoPE needs positions [batch, seq]")
            q = apply_rope(q, positions, inv_freq)
            k = apply_rope(k, positions if kv_positions is None else kv_positions, inv_freq)
        new_cache = None
        if cache_kv is not None:
            ck, cv = cache_kv
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, cache_index, 0, 0))
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, cache_index, 0, 0))
            new_cache = (ck, cv)
            k, v = ck.astype(self.dtype), cv.astype(self.dtype)
        out = attention(
            q, k, v, mask=mask, causal=causal, segment_ids=segment_ids, scale=self.scale,
            implementation=self.implementation,
        )
        out = DenseGeneral(self.out_features or x.shape[-1], ("heads", "head_dim", "embed"),
                           axis=(-2, -1), use_bias=self.out_bias, name="out", **kw)(out)
        if cache_kv is not None:
            return out, new_cache
        return out
