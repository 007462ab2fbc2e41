"""Resamplers: learned queries that compress image features to a fixed number of tokens.

`QwenVLResampler` (below, first) is Qwen-VL's position-aware adapter; `PerceiverResampler`
(at the end of the file) is Flamingo's Perceiver Resampler (Idefics / OpenFlamingo).

Qwen-VL's position-aware adapter: learned queries cross-attend to image features of any grid.

    resampler = QwenVLResampler(num_queries=256, dim=text_dim, num_heads=h, kv_dim=vision_dim)
    params = resampler.init(rng, feats, grid_hw=vit_config.grid)["params"]
    tokens = resampler.apply({"params": params}, feats, grid_hw=vit_config.grid)  # [B, 256, dim]

`feats` [batch, h * w, kv_dim] are patch features in row-major grid order (no [CLS] token),
`grid_hw` = (h, w) (None: a square grid of sqrt(N) x sqrt(N)). Any grid gives exactly
`num_queries` tokens.

Computation (Qwen-VL `visual.py`: `Resampler` then the tower's `ln_post` and `proj`):

    x   = ln_kv(kv_proj(feats))                          # [B, N, dim]
    q   = ln_q(query) + pos                              # [Q, dim], pos: the g x g query grid
    k   = x + resize(pos, (h, w))                        # positions on the keys ...
    v   = x                                              # ... never on the values
    out = ln_post(MultiheadAttention(q, k, v)) @ proj    # [B, Q, dim]

- `query`: Q = g * g learned queries (g = sqrt(num_queries), a perfect square), init with std
  0.02, cut at 2 std (Qwen's `trunc_normal_(std=.02)` cuts at +-2 absolute, i.e. practically
  N(0, 0.02^2); the difference is immaterial for a random init).
- `pos`: fixed 2-D sin-cos positions of the g x g query grid (`qwen_sincos2d_positions`, MAE's
  convention, which Qwen-VL uses: channels [sin x, cos x, sin y, cos y] with frequencies
  10000 ** -(k / (dim / 4)); note `mmjax.models.vit.sincos2d_positions` divides by dim/4 - 1).
  A constant, not a param: Qwen stores it as a frozen tensor, always equal to this formula.
  For the keys it is resized bicubically to the input grid (Qwen's `get_abs_pos`:
  `interpolate(bicubic, align_corners=False)`, here separable per axis so grids need not be
  square), and used as is when the grid is already g x g.
- `kv_proj`: Linear kv_dim -> dim without bias, present only when kv_dim != dim (Qwen uses an
  identity otherwise: ln_kv and the attention's own projections follow, so a square matrix
  adds nothing; the param tree then matches Qwen checkpoints either way).
- `attn`: one `torch.nn.MultiheadAttention`-equivalent layer: num_heads (default dim // 128,
  at least 1; Qwen-VL: 4096 / 128 = 32) over head_dim = dim // num_heads, in-projections and
  output projection with biases, softmax scale 1/sqrt(head_dim). (The key bias shifts all of
  a query's logits alike, so the softmax cancels it and its gradient is 0, as in torch; it is
  kept so checkpoints map one to one.)
- `ln_q`, `ln_kv`, `ln_post`: LayerNorm with eps `norm_eps` (1e-6).
- `proj`: a [dim, dim] matrix applied as `x @ proj` (no bias), init N(0, 1/dim) as Qwen's
  `dim ** -0.5 * randn`. The other kernels: the same std-0.02 init.

Param tree (logical axes): query [Q, dim] ("position", "embed");
kv_proj/kernel [kv_dim, dim] ("embed", "mlp"); ln_kv, ln_q, ln_post /{scale, bias} [dim]
("norm"); attn/{query, key, value}/{kernel [dim, heads, head_dim] ("embed", "heads",
"head_dim"), bias [heads, head_dim]}, attn/out/{kernel [heads, head_dim, dim] ("heads",
"head_dim", "embed"), bias [dim]}; proj/kernel [dim, dim] ("embed", "mlp").
From PyTorch: query <- attn_pool.query; kv_proj <- kv_proj.weight.T; attn/{query,key,value}
<- in_proj_weight split in three, each .T reshaped [dim, heads, head_dim] (biases likewise);
attn/out <- out_proj.weight.T reshaped [heads, head_dim, dim]; proj <- proj as is.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.errors import ConfigError, InputError
from mmjax.nn.attention import Attention
from mmjax.nn.linear import DenseGeneral
from mmjax.nn.mlp import MLP
from mmjax.nn.norms import LayerNorm
from mmjax.nn.partitioning import BATCH_LEN_EMBED, constrain
from mmjax.ops.resize import resize_grid


def qwen_sincos2d_positions(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
    """Fixed 2-D sin-cos positions [grid_h * grid_w, dim] (row-major), MAE / Qwen-VL convention.

    Channel quarters: sin(x f), cos(x f), sin(y f), cos(y f) with x the column and y the row
    index and f_k = 10000 ** -(k / (dim / 4)), k = 0 .. dim/4 - 1.
    """
    if dim % 4:
        raise ConfigError(f"2-D sin-cos positions need dim divisible by 4, got {dim}")
    quarter = dim // 4
    freq = 10000.0 ** -(np.arange(quarter, dtype=np.float64) / quarter)
    ys, xs = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    ax = xs.reshape(-1, 1) * freq[None]
    ay = ys.reshape(-1, 1) * freq[None]
    pos = np.concatenate([np.sin(ax), np.cos(ax), np.sin(ay), np.cos(ay)], axis=1)
    return pos.astype(np.float32)


# std 0.02 after truncation at +-2 std (jax's truncated_normal scales a unit draw cut at +-2,
# whose std is 0.8796)
_TRUNC_NORMAL_002 = nn.initializers.truncated_normal(0.02 / 0.87962566103423978)


def _square_side(n: int) -> int | None:
    s = math.isqrt(n)
    return s if s * s == n else None


class QwenVLResampler(nn.Module):
    """[batch, h * w, kv_dim] image features -> [batch, num_queries, dim] (see module docstring).

    Call: `resampler(features, grid_hw=None)`; grid_hw (h, w) of the feature grid, None for a
    square one.
    """

    dim: int
    num_queries: int = 256
    num_heads: int | None = None  # None: max(dim // 128, 1)
    kv_dim: int | None = None  # None: dim
    norm_eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    implementation: str | None = None  # mmjax.ops.attention implementation (None = best)

    @property
    def heads(self) -> int:
        return self.num_heads if self.num_heads is not None else max(self.dim // 128, 1)

    @property
    def query_grid(self) -> int:
        """Side g of the g x g query grid."""
        return _square_side(self.num_queries) or 0

    def _check_config(self) -> None:
        if self.num_queries <= 0 or not self.query_grid:
            raise ConfigError(f"QwenVLResampler: num_queries must be a positive perfect square "
                              f"(a g x g query grid), got {self.num_queries}")
        if self.dim <= 0 or self.dim % 4:
            raise ConfigError(f"QwenVLResampler: dim must be positive and divisible by 4 "
                              f"(2-D sin-cos positions), got {self.dim}")
        if self.heads <= 0 or self.dim % self.heads:
            raise ConfigError(f"QwenVLResampler: dim={self.dim} is not divisible by "
                              f"num_heads={self.heads}")
        if self.kv_dim is not None and self.kv_dim <= 0:
            raise ConfigError(
                f"QwenVLResampler: kv_dim must be positive or None, got {self.kv_dim}")

    def _grid(self, features: Any, grid_hw: tuple[int, int] | None) -> tuple[int, int]:
        shape = tuple(getattr(features, "shape", ()))
        if len(shape) != 3:
            raise InputError(
                f"QwenVLResampler: features must be [batch, tokens, kv_dim], got shape {shape}")
        _, n, c = shape
        kv_dim = self.kv_dim or self.dim
        if c != kv_dim:
            raise InputError(f"QwenVLResampler: features have width {c}, the resampler takes "
                             f"kv_dim={kv_dim}; got shape {shape}")
        if grid_hw is None:
            side = _square_side(n)
            if side is None:
                hint = (" (a [CLS] token left in? drop it: features[:, 1:])"
                        if n > 1 and _square_side(n - 1) else "")
                raise InputError(f"QwenVLResampler: {n} tokens are no square grid; pass "
                                 f"grid_hw=(h, w){hint}")
            return side, side
        if not isinstance(grid_hw, (tuple, list)) or len(grid_hw) != 2:
            raise InputError(f"QwenVLResampler: grid_hw must be (h, w), got {grid_hw!r}")
        h, w = (int(v) for v in grid_hw)
        if h <= 0 or w <= 0 or h * w != n:
            raise InputError(f"QwenVLResampler: grid_hw={h}x{w} = {h * w} positions, but features "
                             f"have {n} tokens (shape {shape})")
        return h, w

    @nn.compact
    def __call__(self, features: jax.Array, grid_hw: tuple[int, int] | None = None) -> jax.Array:
        self._check_config()
        h, w = self._grid(features, grid_hw)
        batch, dim, g = features.shape[0], self.dim, self.query_grid
        dt = jnp.dtype(self.dtype)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        init = _TRUNC_NORMAL_002

        pos_q = qwen_sincos2d_positions(g, g, dim)  # [Q, dim] constants
        pos_k = resize_grid(pos_q.reshape(g, g, dim), (h, w)).reshape(h * w, dim)

        x = features
        if (self.kv_dim or dim) != dim:
            x = DenseGeneral(dim, ("embed", "mlp"), use_bias=False, kernel_init=init,
                             name="kv_proj", **kw)(x)
        x = LayerNorm(self.norm_eps, name="ln_kv", **kw)(x.astype(dt))
        x = constrain(x, BATCH_LEN_EMBED)

        query = self.param("query", nn.with_logical_partitioning(init, ("position", "embed")),
                           (self.num_queries, dim), self.param_dtype)
        q = LayerNorm(self.norm_eps, name="ln_q", **kw)(query.astype(dt)) + jnp.asarray(pos_q, dt)
        q = jnp.broadcast_to(q, (batch, self.num_queries, dim))

        out = Attention(
            num_heads=self.heads, num_kv_heads=self.heads, head_dim=dim // self.heads,
            qkv_bias=True, out_bias=True, kernel_init=init, implementation=self.implementation,
            name="attn", **kw,
        )(q, x + jnp.asarray(pos_k, dt), value_input=x)
        out = LayerNorm(self.norm_eps, name="ln_post", **kw)(out)
        out = DenseGeneral(dim, ("embed", "mlp"), use_bias=False,
                           kernel_init=nn.initializers.normal(dim ** -0.5), name="proj", **kw)(out)
        return constrain(out, BATCH_LEN_EMBED)


class _PerceiverBlock(nn.Module):
    """One Perceiver Resampler block (see `PerceiverResampler`): (context, latents) -> latents."""

    num_heads: int
    head_dim: int
    mlp_dim: int
    activation: str
    qk_norm: bool
    norm_eps: float
    dtype: Any
    param_dtype: Any
    implementation: str | None

    @nn.compact
    def __call__(self, x: jax.Array, lat: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        init = nn.initializers.normal(0.02)
        ctx = LayerNorm(self.norm_eps, name="context_norm", **kw)(x)
        q_in = LayerNorm(self.norm_eps, name="latents_norm", **kw)(lat)
        h = Attention(num_heads=self.num_heads, num_kv_heads=self.num_heads, head_dim=self.head_dim,
                      out_features=lat.shape[-1], kernel_init=init, implementation=self.implementation,
                      qk_norm="layer" if self.qk_norm else None, qk_norm_eps=self.norm_eps,
                      name="attn", **kw)(q_in, jnp.concatenate([ctx, q_in], axis=1))
        lat = lat + h
        h = LayerNorm(self.norm_eps, name="mlp_norm", **kw)(lat)
        return lat + MLP(self.mlp_dim, self.activation, False, self.dtype, self.param_dtype, init,
                         name="mlp")(h)


class PerceiverResampler(nn.Module):
    """Flamingo's Perceiver Resampler: features [batch, frames, tokens, dim] (or [batch, tokens,
    dim] = one frame) -> [batch, num_latents, dim].

    Per block (`depth` of them), with L the latents:
        kv = concat(context_norm(x), latents_norm(L))      # the latents attend to themselves too
        L  = L + attn(q=latents_norm(L), kv)               # heads x head_dim, no biases
        L  = L + mlp(mlp_norm(L))                          # fc1 -> act -> fc2, no biases
    then `final_norm(L)`. Frames are flattened into one context of frames * tokens keys
    (the paper's [T*S, d]); with `max_frames > 0` a learned per-frame embedding [max_frames,
    dim] is added first (the paper's time embeddings; OpenFlamingo's `frame_embs`).

    Idefics (`IdeficsPerceiverResampler`): activation "relu", mlp_dim 4 x dim, LayerNorms with
    eps 1e-5, optional q/k LayerNorms over head_dim (`qk_norm`, params attn/{query,key}_norm),
    latents initialised N(0, 1) (torch.randn), no frame embeddings. OpenFlamingo: "gelu".
    Queries are scaled by head_dim ** -0.5 after the q/k norms (as both references).

    Param tree: latents [num_latents, dim] ("position", "embed"); frame_embed [max_frames, dim]
    (when max_frames > 0); blocks_{i}/{context_norm, latents_norm, mlp_norm}/{scale, bias},
    blocks_{i}/attn/{query, key, value}/kernel [dim, heads, head_dim],
    blocks_{i}/attn/out/kernel [heads, head_dim, dim], blocks_{i}/mlp/{fc1, fc2}/kernel;
    final_norm/{scale, bias}.
    """

    dim: int
    num_latents: int = 64
    depth: int = 6
    num_heads: int = 16
    head_dim: int = 96
    mlp_dim: int | None = None  # None: 4 * dim
    activation: str = "relu"
    qk_norm: bool = False
    max_frames: int = 0
    norm_eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    implementation: str | None = None

    def _check(self, features: Any) -> jax.Array:
        for name in ("dim", "num_latents", "depth", "num_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"PerceiverResampler.{name} must be positive, got {getattr(self, name)}")
        shape = tuple(getattr(features, "shape", ()))
        if len(shape) == 3:
            features = features[:, None]
        elif len(shape) != 4:
            raise InputError(f"PerceiverResampler: features must be [batch, tokens, dim] or "
                             f"[batch, frames, tokens, dim], got shape {shape}")
        if features.shape[-1] != self.dim:
            raise InputError(f"PerceiverResampler: features have width {features.shape[-1]}, the "
                             f"resampler takes dim={self.dim}; got shape {shape}")
        if self.max_frames and features.shape[1] > self.max_frames:
            raise InputError(f"PerceiverResampler: {features.shape[1]} frames, but the frame "
                             f"embeddings cover max_frames={self.max_frames}")
        return features

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        x = self._check(features)
        dt = jnp.dtype(self.dtype)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, f, s, d = x.shape
        x = x.astype(dt)
        if self.max_frames:
            frame = self.param("frame_embed", nn.with_logical_partitioning(
                nn.initializers.normal(1.0), ("position", "embed")), (self.max_frames, d),
                self.param_dtype)
            x = x + frame[:f, None].astype(dt)
        x = x.reshape(b, f * s, d)
        latents = self.param("latents", nn.with_logical_partitioning(
            nn.initializers.normal(1.0), ("position", "embed")), (self.num_latents, d),
            self.param_dtype)
        lat = jnp.broadcast_to(latents.astype(dt), (b, self.num_latents, d))
        for i in range(self.depth):
            lat = _PerceiverBlock(self.num_heads, self.head_dim, self.mlp_dim or 4 * d,
                                  self.activation, self.qk_norm, self.norm_eps, self.dtype,
                                  self.param_dtype, self.implementation, name=f"blocks_{i}")(x, lat)
        out = LayerNorm(self.norm_eps, name="final_norm", **kw)(lat)
        return constrain(out, BATCH_LEN_EMBED)
