"""Vision Transformer (ViT): images -> patch tokens -> pre-norm transformer encoder.

    config = ViTConfig.from_variant("B/16", num_classes=1000)
    model = ViT(config)
    params = model.init(rng, images)["params"]          # images [B, H, W, C] float (NHWC)
    logits = model.apply({"params": params}, images)    # [B, num_classes]
    feats, out = model.apply({"params": params}, images, return_intermediates=True)

With `num_classes=0` the output is the pooled feature ([B, dim], or [B, representation] when
a pre-logits layer is configured). `out` holds named activations: `hidden_states` (the
encoder input and every block's output, num_layers + 1 arrays [B, tokens, dim], before the
final norm), `final_hidden` (all tokens after the final norm), `patch_tokens` (the final-normed
patch tokens, [CLS] dropped), `pooled`, `pre_logits` and `logits`. What other models read:
LLaVA the penultimate block without [CLS], `out["hidden_states"][-2][:, c.num_prefix_tokens:]`;
BLIP-2 / Flamingo the patch tokens of the last block.

Layout: [CLS] (when `class_token`) followed by the patch tokens in row-major grid order.
Learned positions cover every token, [CLS] included (as Hugging Face stores them); 2-D
sin-cos positions cover the patches and leave [CLS] without a position (as big_vision).

Pooling: "cls" (the [CLS] token after the final norm), "gap" (mean of the final-normed patch
tokens) or "map" (big_vision's MAPHead = SigLIP's attention pooling: one learned probe query
attends over every final-normed token, then probe + MLP(LN(probe))).

Patch embedding: one kernel [ph*pw*C, dim] computed either as a Dense on flattened patches
(`patch_embed="linear"`) or as the equivalent stride-p convolution (`"conv"`); the
parameters are the same, so checkpoints load into both.

Resolution: `resample_posemb` resizes a learned position table to a new grid (bicubic or
bilinear, PyTorch's `interpolate(align_corners=False)` weights, [CLS] kept as is);
`set_image_size(module, params, 336)` gives a ViT / CLIP / SigLIP and its params at a new
image size (what CLIP did going 224 -> 336); `model.apply(..., interpolate_pos_encoding=True)`
accepts any resolution divisible by the patch size and resamples on the fly (Hugging Face's
flag of the same name, same numbers).

Norms: `mmjax.nn.norms.LayerNorm` (a hand-written backward pass, which makes a CLIP training
step ~20% cheaper on CPU than autodiff of the formula).

Encoder: the shared transformer stack (`mmjax.nn.transformer`, `vit_block_spec`): pre-norm
LayerNorm blocks, bidirectional attention, plain MLP. `scan_layers=True` runs it as one
`nn.scan`ned block (params stacked on a leading [num_layers] axis under `layers/block/...`;
`mmjax.nn.transformer.stack_layer_params` / `match_layer_layout` convert loop-layout params,
e.g. from Hugging Face); `remat=True` recomputes each block in the backward pass with
`remat_policy` ("full", "dots", "dots_no_batch").

Param tree: patch_embed/{kernel [ph*pw*C, dim], bias}, cls [dim], pos_embedding/embedding
[tokens, dim] (learned only), pre_norm (CLIP's "pre_layrnorm"), layers_{i}/{attn_norm,
attn/{query,key,value,out}, mlp_norm, mlp/{fc1,fc2}} (or layers/block/... when scanned),
final_norm, map_head/{probe, attn/{query,key,value,out}, norm, mlp/{fc1,fc2}} ("map" pooling),
pre_logits (optional), head (optional).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import configs
from mmjax.errors import ConfigError, InputError
from mmjax.models.family import Family, image_inputs
from mmjax.nn.attention import Attention
from mmjax.nn.embeddings import LearnedPositions
from mmjax.nn.linear import DenseGeneral
from mmjax.nn.mlp import ACTIVATIONS, MLP
from mmjax.nn.norms import LayerNorm
from mmjax.nn.partitioning import BATCH_LEN_EMBED, constrain
from mmjax.nn.transformer import BlockSpec, check_remat_policy, make_layers, run_layers
from mmjax.ops.resize import RESAMPLE_METHODS, resize_grid, resize_matrix  # noqa: F401 (re-export)

POOLS = ("cls", "gap", "map")
POSEMBS = ("learned", "sincos2d")
PATCH_EMBEDS = ("linear", "conv")


def _pair(x) -> tuple[int, int]:
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ConfigError(f"expected one int or a pair (height, width), got {x!r}")
        return int(x[0]), int(x[1])
    return int(x), int(x)


@dataclasses.dataclass(frozen=True)
class ViTConfig(configs.Config):
    RENAMED = {"attention_impl": "implementation"}  # dicts written before the rename
    image_size: int | tuple[int, int] = 224  # one side, or (height, width)
    patch_size: int | tuple[int, int] = 16
    channels: int = 3
    dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    pool: str = "cls"  # "cls": the [CLS] token; "gap": mean of the patch tokens; "map": attention pooling
    posemb: str = "learned"  # "learned" table or fixed "sincos2d"
    class_token: bool = True
    pre_norm: bool = False  # LayerNorm on the embeddings before the encoder (CLIP)
    patch_bias: bool = True  # bias of the patch projection (HF ViT: yes, CLIP: no)
    patch_embed: str = "linear"  # "linear" (Dense on flattened patches) or "conv" (same kernel)
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    activation: str = "gelu"
    num_classes: int = 0  # 0 = no classification head, return features
    representation: int | None = None  # width of a Dense+tanh pre-logits layer (HF ViT pooler)
    initializer_range: float = 0.02
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    implementation: str | None = None  # ops.attention implementation (None = best for platform)
    remat: bool = False  # recompute each block in the backward pass
    remat_policy: str = "full"  # with remat: "full" (save nothing), "dots", "dots_no_batch"
    scan_layers: bool = False  # nn.scan over layers: one compiled block (params [layers, ...])

    def __post_init__(self):
        for name in ("image_size", "patch_size"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
            pair = _pair(getattr(self, name))
            if min(pair) <= 0:
                raise ConfigError(f"ViTConfig.{name} must be positive, got {value!r}")
        (h, w), (ph, pw) = self.image_hw, self.patch_hw
        if h % ph or w % pw:
            raise ConfigError(
                f"ViTConfig: image_size {h}x{w} is not divisible by patch_size {ph}x{pw}; "
                "crop or resize the images, or pick a patch size that divides them"
            )
        for name in ("channels", "dim", "num_layers", "num_heads", "mlp_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"ViTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            raise ConfigError(f"ViTConfig: dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.pool not in POOLS:
            raise ConfigError(f"ViTConfig.pool {self.pool!r}{configs.closest_name(self.pool, POOLS)}; "
                              f"known: {', '.join(POOLS)}")
        if self.pool == "cls" and not self.class_token:
            raise ConfigError("ViTConfig: pool='cls' needs class_token=True")
        if self.patch_embed not in PATCH_EMBEDS:
            raise ConfigError(f"ViTConfig.patch_embed {self.patch_embed!r}"
                              f"{configs.closest_name(self.patch_embed, PATCH_EMBEDS)}; "
                              f"known: {', '.join(PATCH_EMBEDS)}")
        if self.posemb not in POSEMBS:
            raise ConfigError(f"ViTConfig.posemb {self.posemb!r}{configs.closest_name(self.posemb, POSEMBS)}; "
                              f"known: {', '.join(POSEMBS)}")
        if self.posemb == "sincos2d" and self.dim % 4:
            raise ConfigError(f"ViTConfig: sincos2d positions need dim divisible by 4, got {self.dim}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"ViTConfig.activation {self.activation!r}; known: {', '.join(ACTIVATIONS)}")
        if self.num_classes < 0:
            raise ConfigError(f"ViTConfig.num_classes must be >= 0, got {self.num_classes}")
        if self.representation is not None and self.representation <= 0:
            raise ConfigError(f"ViTConfig.representation must be positive or None, got {self.representation}")
        self.check_dtypes("dtype", "param_dtype")
        check_remat_policy("ViTConfig", self.remat_policy)

    @property
    def image_hw(self) -> tuple[int, int]:
        return _pair(self.image_size)

    @property
    def patch_hw(self) -> tuple[int, int]:
        return _pair(self.patch_size)

    @property
    def grid(self) -> tuple[int, int]:
        """Patches along (height, width)."""
        (h, w), (ph, pw) = self.image_hw, self.patch_hw
        return h // ph, w // pw

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid
        return gh * gw

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches ([CLS] or none)."""
        return int(self.class_token)

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens

    @property
    def head_size(self) -> int:
        """Per-head width (dim // num_heads)."""
        return self.dim // self.num_heads

    @property
    def features_dim(self) -> int:
        """Width of the output when num_classes == 0."""
        return self.representation or self.dim

    @classmethod
    def from_variant(cls, name: str, **overrides) -> "ViTConfig":
        """"tiny" (tests), or "<size>/<patch>" with size in Ti, S, M, B, L, H, g, G ("B/16")."""
        if name in TEST_VARIANTS:
            return cls(**{**TEST_VARIANTS[name], **overrides})
        match = re.fullmatch(r"(\w+)/(\d+)", name)
        if not match or match.group(1) not in WIDTHS:
            known = list(TEST_VARIANTS) + [f"{k}/16" for k in WIDTHS]
            raise ConfigError(
                f"unknown ViT variant {name!r}{configs.closest_name(name, known)}; known: "
                f"{', '.join(TEST_VARIANTS)}, or <size>/<patch> with size in {', '.join(WIDTHS)}"
            )
        dim, layers, mlp, heads = WIDTHS[match.group(1)]
        base = dict(dim=dim, num_layers=layers, mlp_dim=mlp, num_heads=heads,
                    patch_size=int(match.group(2)))
        return cls(**{**base, **overrides})

    def num_params(self) -> int:
        d, m = self.dim, self.mlp_dim
        ph, pw = self.patch_hw
        n = ph * pw * self.channels * d + (d if self.patch_bias else 0)
        n += d * int(self.class_token)
        n += self.num_tokens * d if self.posemb == "learned" else 0
        n += 2 * d if self.pre_norm else 0
        attn = 4 * d * d + (3 * d if self.qkv_bias else 0) + d
        n += self.num_layers * (attn + 2 * d * m + m + d + 4 * d) + 2 * d
        if self.pool == "map":  # probe, attention (with biases), norm, MLP
            n += d + 4 * d * d + 4 * d + 2 * d + 2 * d * m + m + d
        width = d
        if self.representation:
            n += d * self.representation + self.representation
            width = self.representation
        if self.num_classes:
            n += width * self.num_classes + self.num_classes
        return n


# size name -> (width, depth, mlp width, heads), the shapes of the ViT / big_vision papers
WIDTHS: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
}
ViTConfig.NAME = "ViT"

TEST_VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(image_size=32, patch_size=8, dim=64, num_layers=2, num_heads=4, mlp_dim=128),
}


def encoder_block_spec(*, num_heads: int, mlp_dim: int, head_dim: int, activation: str,
                       norm_eps: float, qkv_bias: bool, initializer_range: float,
                       implementation: str | None, dtype: str, param_dtype: str) -> BlockSpec:
    """The shared transformer block (`mmjax.nn.transformer`) of a ViT / CLIP / SigLIP encoder
    layer: pre-norm LayerNorm, multi-head attention with an output bias (query/key/value bias
    optional), plain MLP with biases, no RoPE."""
    return BlockSpec(
        num_heads=num_heads, mlp_dim=mlp_dim, head_dim=head_dim, norm="layer", norm_eps=norm_eps,
        norm_position="pre", mlp="plain", activation=activation, qkv_bias=qkv_bias, out_bias=True,
        mlp_bias=True, initializer_range=initializer_range, implementation=implementation,
        dtype=dtype, param_dtype=param_dtype)


def vit_block_spec(c: ViTConfig) -> BlockSpec:
    """The block every layer of a ViT encoder is."""
    return encoder_block_spec(
        num_heads=c.num_heads, mlp_dim=c.mlp_dim, head_dim=c.head_size, activation=c.activation,
        norm_eps=c.norm_eps, qkv_bias=c.qkv_bias, initializer_range=c.initializer_range,
        implementation=c.implementation, dtype=c.dtype, param_dtype=c.param_dtype)


def sincos2d_positions(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0) -> np.ndarray:
    """Fixed 2-D sin-cos position embeddings [grid_h * grid_w, dim] (row-major grid).

    A quarter of the channels each holds sin(x w), cos(x w), sin(y w), cos(y w) with the
    frequencies w = temperature ** -(k / (dim/4 - 1)), k = 0 .. dim/4 - 1.
    """
    quarter = dim // 4
    k = np.arange(quarter, dtype=np.float64) / max(quarter - 1, 1)
    freq = temperature ** -k
    ys, xs = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    ax = xs.reshape(-1, 1) * freq[None]
    ay = ys.reshape(-1, 1) * freq[None]
    return np.concatenate([np.sin(ax), np.cos(ax), np.sin(ay), np.cos(ay)], axis=1).astype(np.float32)


def patchify(images: jax.Array, patch_hw: tuple[int, int]) -> jax.Array:
    """[B, H, W, C] -> [B, (H/ph) * (W/pw), ph * pw * C]: row-major patches, each flattened in
    (row, column, channel) order -- a stride-`patch` convolution is a Dense on these."""
    b, h, w, c = images.shape
    ph, pw = patch_hw
    x = images.reshape(b, h // ph, ph, w // pw, pw, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // ph) * (w // pw), ph * pw * c)


def check_images(images: Any, config: ViTConfig, who: str = "ViT", any_size: bool = False) -> None:
    """InputError unless `images` is a float [batch, height, width, channels] array of the
    configured resolution (with `any_size`: of any resolution divisible by the patch size)."""
    shape = tuple(getattr(images, "shape", ()))
    if len(shape) != 4:
        raise InputError(f"{who}: images must be [batch, height, width, channels], got shape {shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise InputError(f"{who}: images must be floating point (rescaled and normalised), "
                         f"got dtype {images.dtype}")
    h, w = config.image_hw
    ph, pw = config.patch_hw
    if shape[3] != config.channels:
        hint = " (channels-first NCHW input? mmjax takes NHWC)" if shape[1] == config.channels else ""
        raise InputError(f"{who}: images have {shape[3]} channels in the last axis, the model takes "
                         f"{config.channels}{hint}; got shape {shape}")
    if shape[1] % ph or shape[2] % pw:
        raise InputError(
            f"{who}: images are {shape[1]}x{shape[2]}, not divisible by the patch size {ph}x{pw}; "
            f"resize them explicitly (mmjax.data.images.resize_images(images, {(h, w)}))")
    if not any_size and shape[1:3] != (h, w):
        raise InputError(f"{who}: images are {shape[1]}x{shape[2]}, the model takes {h}x{w} "
                         f"(patch size {ph}x{pw}); resize them first, or call with "
                         "interpolate_pos_encoding=True to resample the position embeddings")


# --- position-embedding resampling ------------------------------------------------------------

def resample_posemb(posemb: Any, old_grid: tuple[int, int], new_grid: tuple[int, int], *,
                    num_prefix_tokens: int = 0, method: str = "bicubic") -> Any:
    """Resize a learned position table to a new patch grid.

    Args:
      posemb: [num_prefix_tokens + gh * gw, dim] (jax or numpy), prefix ([CLS]) rows first,
        then the grid in row-major order.
      old_grid, new_grid: (gh, gw) patch grids.
      num_prefix_tokens: rows kept unchanged (1 for a [CLS] position).
      method: "bicubic" or "bilinear", separable, PyTorch's `interpolate(align_corners=False)`.
    Returns:
      [num_prefix_tokens + nh * nw, dim], same array type and dtype (differentiable in JAX).
    """
    xp = jnp if isinstance(posemb, jax.Array) else np
    (gh, gw), (nh, nw) = tuple(old_grid), tuple(new_grid)
    n, d = posemb.shape
    if n != num_prefix_tokens + gh * gw:
        raise InputError(f"resample_posemb: table has {n} rows, expected {num_prefix_tokens} prefix + "
                         f"{gh}x{gw} grid = {num_prefix_tokens + gh * gw}")
    prefix, grid = posemb[:num_prefix_tokens], posemb[num_prefix_tokens:].reshape(gh, gw, d)
    if (gh, gw) == (nh, nw):
        return posemb
    out = resize_grid(grid, (nh, nw), method)
    return xp.concatenate([prefix, out.reshape(nh * nw, d)], axis=0)


def set_image_size(module_or_config: Any, params: Any, image_size: int | tuple[int, int], *,
                   method: str = "bicubic"):
    """A ViT (or CLIP / SigLIP, through its `vision` tower) at a new image size.

    Returns (module, params) when given a module, else (config, params): the config with the
    new `image_size` and the params with the learned position table resampled to the new grid
    ([CLS] position kept). Sin-cos positions need no params. Use it after loading a checkpoint:
    `module, params = set_image_size(*from_hf(path), 336)`.
    """
    import flax.linen as linen

    config = getattr(module_or_config, "config", module_or_config)
    plain = linen.meta.unbox(params)
    if isinstance(config, ViTConfig):
        new_vision, vision_params = _resize_vit(config, plain, image_size, method)
        new_config, new_params = new_vision, vision_params
    elif isinstance(getattr(config, "vision", None), ViTConfig):
        new_vision, vision_params = _resize_vit(config.vision, plain["vision"], image_size, method)
        new_config = dataclasses.replace(config, vision=new_vision)
        new_params = {**plain, "vision": vision_params}
    else:
        raise ConfigError(f"set_image_size: {type(config).__name__} has no ViT image tower")
    if isinstance(module_or_config, linen.Module):
        return module_or_config.clone(config=new_config), new_params
    return new_config, new_params


def _resize_vit(c: ViTConfig, params: dict[str, Any], image_size, method: str):
    new = c.replace(image_size=tuple(image_size) if isinstance(image_size, (list, tuple)) else image_size)
    if c.posemb != "learned":
        return new, params
    table = params["pos_embedding"]["embedding"]
    table = resample_posemb(table, c.grid, new.grid, num_prefix_tokens=c.num_prefix_tokens, method=method)
    return new, {**params, "pos_embedding": {**params["pos_embedding"], "embedding": table}}


# --- modules ----------------------------------------------------------------------------------

class MAPHead(nn.Module):
    """Multihead attention pooling (big_vision's MAPHead, SigLIP's pooling head).

    [batch, tokens, dim] -> [batch, dim]: a learned probe query attends over the tokens, then
    h + MLP(LN(h)). Params: probe [dim], attn/{query,key,value,out} (with biases), norm,
    mlp/{fc1,fc2}.
    """

    num_heads: int
    mlp_dim: int
    activation: str = "gelu"
    norm_eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    initializer_range: float = 0.02
    implementation: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, _, dim = x.shape
        init = nn.initializers.normal(self.initializer_range)
        probe = self.param("probe", nn.with_logical_partitioning(init, ("embed",)), (dim,), self.param_dtype)
        query = jnp.broadcast_to(probe.astype(self.dtype), (b, 1, dim))
        h = Attention(
            num_heads=self.num_heads, num_kv_heads=self.num_heads, head_dim=dim // self.num_heads,
            qkv_bias=True, out_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=init, implementation=self.implementation, name="attn",
        )(query, x)
        y = LayerNorm(self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(h)
        h = h + MLP(self.mlp_dim, self.activation, True, self.dtype, self.param_dtype, init, name="mlp")(y)
        return h[:, 0]


class PatchEmbed(nn.Module):
    """[B, H, W, C] -> [B, (H/ph)*(W/pw), dim] with one kernel [ph*pw*C, dim] ("patch", "embed"):
    a Dense on `patchify`d patches ("linear") or the same kernel as a stride-p convolution
    ("conv"). Params: kernel, bias (optional)."""

    dim: int
    patch_hw: tuple[int, int]
    use_bias: bool = True
    implementation: str = "linear"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        b, h, w, c = images.shape
        ph, pw = self.patch_hw
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, ("patch", "embed")),
                            (ph * pw * c, self.dim), self.param_dtype).astype(self.dtype)
        x = images.astype(self.dtype)
        if self.implementation == "conv":
            y = jax.lax.conv_general_dilated(x, kernel.reshape(ph, pw, c, self.dim), (ph, pw), "VALID",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            y = y.reshape(b, (h // ph) * (w // pw), self.dim)
        else:
            y = patchify(x, self.patch_hw) @ kernel
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                              (self.dim,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class ViT(nn.Module):
    """Vision Transformer. See the module docstring for the call forms."""

    config: ViTConfig

    @nn.compact
    def __call__(self, images: jax.Array, *, return_intermediates: bool = False,
                 interpolate_pos_encoding: bool = False, keep: jax.Array | None = None,
                 keep_valid: jax.Array | None = None):
        """
        Args:
          images: [batch, height, width, channels] float, already rescaled and normalised.
          return_intermediates: also return a dict of named activations (module docstring).
          interpolate_pos_encoding: accept any height/width divisible by the patch size,
            resampling learned positions bicubically to that grid (sin-cos ones are recomputed).
          keep: [batch, K] int patch indices (row-major): only these patches, with their
            positions, enter the encoder (I-JEPA's context encoder, MAE); needs
            class_token=False. Token order follows `keep`.
          keep_valid: [batch, K] bool, False at padding entries of `keep` (fixed-shape batches
            of lists of different lengths): padded tokens are never attended to and the "gap"
            pooling averages the valid ones only.
        Returns:
          logits [batch, num_classes] float32 when num_classes > 0, else the pooled features
          [batch, features_dim] float32; then the intermediates dict if asked.
        """
        c = self.config
        check_images(images, c, any_size=interpolate_pos_encoding)
        dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        init = nn.initializers.normal(c.initializer_range)
        b, h, w, _ = images.shape
        grid = (h // c.patch_hw[0], w // c.patch_hw[1])

        x = PatchEmbed(c.dim, c.patch_hw, c.patch_bias, c.patch_embed, dtype, pdtype, init,
                       name="patch_embed")(images)
        if c.posemb == "sincos2d":
            x = x + jnp.asarray(sincos2d_positions(*grid, c.dim), dtype)[None]
        if c.class_token:
            cls = self.param("cls", nn.with_logical_partitioning(init, ("embed",)), (c.dim,), pdtype)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (b, 1, c.dim)), x], axis=1)
        if c.posemb == "learned":
            table = LearnedPositions(c.num_tokens, c.dim, dtype, pdtype, init,
                                     name="pos_embedding")(jnp.arange(c.num_tokens))
            if grid != c.grid:
                table = resample_posemb(table, c.grid, grid, num_prefix_tokens=c.num_prefix_tokens)
            x = x + table[None]
        if keep is not None:
            if c.class_token:
                raise InputError("ViT(keep=...) selects patches of a model without [CLS]; this one has "
                                 "class_token=True")
            if keep.ndim != 2 or keep.shape[0] != b or not jnp.issubdtype(keep.dtype, jnp.integer):
                raise InputError(f"keep must be [batch={b}, K] integer patch indices, got shape "
                                 f"{tuple(keep.shape)} dtype {keep.dtype}")
            x = jnp.take_along_axis(x, keep[:, :, None].astype(jnp.int32), axis=1)
        elif keep_valid is not None:
            raise InputError("keep_valid needs keep")
        attn_mask = None if keep_valid is None else keep_valid[:, None, None, :].astype(bool)
        if c.pre_norm:
            x = LayerNorm(c.norm_eps, dtype=dtype, param_dtype=pdtype, name="pre_norm")(x)
        x = constrain(x, BATCH_LEN_EMBED)

        layers = make_layers(vit_block_spec(c), c.num_layers, scan=c.scan_layers,
                             remat=c.remat_policy if c.remat else "none")
        embedded = x
        x, hidden, _ = run_layers(layers, x, mask=attn_mask, keep_hidden=return_intermediates)
        hidden_states = (embedded,) + hidden
        encoded = LayerNorm(c.norm_eps, dtype=dtype, param_dtype=pdtype, name="final_norm")(x)

        if c.pool == "cls":
            pooled = encoded[:, 0]
        elif c.pool == "gap" and keep_valid is not None:
            w = keep_valid.astype(jnp.float32)[..., None]
            pooled = (jnp.sum(encoded.astype(jnp.float32) * w, 1) / jnp.maximum(w.sum(1), 1.0)).astype(dtype)
        elif c.pool == "gap":
            pooled = jnp.mean(encoded[:, c.num_prefix_tokens:].astype(jnp.float32), axis=1).astype(dtype)
        else:  # map
            pooled = MAPHead(c.num_heads, c.mlp_dim, c.activation, c.norm_eps, dtype, pdtype,
                             c.initializer_range, c.implementation, name="map_head")(encoded)
        out = {"hidden_states": hidden_states, "last_hidden": x, "final_hidden": encoded,
               "patch_tokens": encoded[:, c.num_prefix_tokens:], "pooled": pooled}
        features = pooled
        if c.representation:
            features = jnp.tanh(DenseGeneral(c.representation, ("embed", "mlp"), use_bias=True,
                                             dtype=dtype, param_dtype=pdtype, kernel_init=init,
                                             name="pre_logits")(pooled))
        out["pre_logits"] = features
        result = features.astype(jnp.float32)
        if c.num_classes:
            logits = DenseGeneral(c.num_classes, ("embed", "vocab"), use_bias=True, dtype=dtype,
                                  param_dtype=pdtype, kernel_init=init, name="head")(features)
            result = out["logits"] = logits.astype(jnp.float32)
        if return_intermediates:
            return result, out
        return result


FAMILIES = (Family("vit", ViTConfig, ViT, image_inputs,
                   "Vision Transformer (classifier or feature encoder; CLIP/SigLIP image towers)",
                   tasks=("classification",)),)
