"""CLIP: a ViT image tower and a causal text tower projected into one embedding space.

    config = CLIPConfig.from_variant("tiny")
    model = CLIP(config)
    params = model.init(rng, images, tokens)["params"]     # images NHWC float, tokens [B, T] int
    out = model.apply({"params": params}, images, tokens)  # dict, below
    img = model.apply({"params": params}, images, method=CLIP.encode_image)  # [B, projection_dim]
    txt = model.apply({"params": params}, tokens, method=CLIP.encode_text)

`out`: `image_embeds` / `text_embeds` (L2-normalised, [B, projection_dim]), `logits_per_image`
[B_img, B_txt] = exp(logit_scale) * image_embeds @ text_embeds.T, `logits_per_text` (its
transpose) and `logit_scale` (the multiplier exp(t)), all float32. With
`return_intermediates=True` a second dict holds each tower's named activations under
`vision` and `text`.

Image tower: `mmjax.models.vit.ViT` with CLIP's layout -- no patch bias, a LayerNorm on the
embeddings before the encoder (HF's `pre_layrnorm`), the [CLS] token after the final norm
(HF's `post_layernorm`) as the pooled feature. Text tower: token + learned positions, causal
pre-norm blocks, final LayerNorm, pooled at the end-of-text token: with `eos_pooling="argmax"`
at the largest token id (OpenAI's original vocabulary puts end-of-text last; Hugging Face keeps
this rule for configs whose `eos_token_id` is 2), with "first_eos" at the first `eos_token_id`.

The temperature is a learned scalar `logit_scale` = t (init ln(1/0.07)); the forward pass
multiplies the cosine similarities by min(exp(t), logit_scale_max = 100) -- OpenAI's clamp,
applied where the value is used so any training loop gets it (the PyTorch reference does not
clamp in the forward pass; the two agree for every t <= ln 100, which is where OpenAI's
training keeps t). `clamp_logit_scale(params, config)` also clips the parameter itself after
an optimizer step. `logit_bias_init` (None by default) adds SigLIP's learned bias b:
logits = scale * cos + b, for training with `mmjax.ops.losses.siglip_loss`; the losses
themselves live in `mmjax.ops.losses` (`clip_loss` is the symmetric ITC loss).

The text tower (`TextTransformer`, config `CLIPTextConfig`) is also SigLIP's: `causal=False`
and `eos_pooling="last"` (pooled at the last position) give SigLIP's text encoder.

Both towers are the shared transformer stack (`mmjax.nn.transformer`); each config's
`scan_layers` / `remat` / `remat_policy` pick a loop or `nn.scan` over its layers and the
rematerialisation (see `mmjax.models.vit`).

Param tree: vision/... (ViT), text/{embed, pos_embedding, layers_{i} (or layers/block/... when
scanned), final_norm}, visual_projection/kernel, text_projection/kernel, logit_scale
(, logit_bias).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import configs
from mmjax.errors import ConfigError, InputError
from mmjax.models.family import Family, image_inputs
from mmjax.models.vit import LayerNorm, ViT, ViTConfig, encoder_block_spec
from mmjax.nn.embeddings import Embed, LearnedPositions
from mmjax.nn.linear import DenseGeneral
from mmjax.nn.mlp import ACTIVATIONS
from mmjax.nn.partitioning import BATCH_LEN_EMBED, constrain
from mmjax.nn.transformer import BlockSpec, check_remat_policy, make_layers, run_layers
from mmjax.ops import masks as masks_lib

EOS_POOLINGS = ("first_eos", "argmax", "last")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(configs.Config):
    RENAMED = {"attention_impl": "implementation"}  # dicts written before the rename
    vocab_size: int = 49408
    max_len: int = 77  # context length (learned positions)
    dim: int = 512
    num_layers: int = 12
    num_heads: int = 8
    mlp_dim: int = 2048
    activation: str = "quick_gelu"
    norm_eps: float = 1e-5
    eos_pooling: str = "first_eos"  # "first_eos": first eos_token_id; "argmax": largest token id;
    # "last": the last position (SigLIP, whose text is padded to max_len)
    causal: bool = True  # causal self-attention (CLIP); False = bidirectional (SigLIP)
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407
    pad_token_id: int | None = 1
    initializer_range: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    implementation: str | None = None
    remat: bool = False  # recompute each block in the backward pass
    remat_policy: str = "full"  # with remat: "full" (save nothing), "dots", "dots_no_batch"
    scan_layers: bool = False  # nn.scan over layers: one compiled block (params [layers, ...])

    def __post_init__(self):
        for name in ("vocab_size", "max_len", "dim", "num_layers", "num_heads", "mlp_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"CLIPTextConfig.{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            raise ConfigError(f"CLIPTextConfig: dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.eos_pooling not in EOS_POOLINGS:
            raise ConfigError(f"CLIPTextConfig.eos_pooling {self.eos_pooling!r}"
                              f"{configs.closest_name(self.eos_pooling, EOS_POOLINGS)}; "
                              f"known: {', '.join(EOS_POOLINGS)}")
        if self.eos_pooling == "first_eos" and self.eos_token_id is None:
            raise ConfigError("CLIPTextConfig: eos_pooling='first_eos' needs an eos_token_id")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"CLIPTextConfig.activation {self.activation!r}; known: {', '.join(ACTIVATIONS)}")
        self.check_dtypes("dtype", "param_dtype")
        check_remat_policy("CLIPTextConfig", self.remat_policy)

    @property
    def head_size(self) -> int:
        """Per-head width (dim // num_heads)."""
        return self.dim // self.num_heads



def _default_vision() -> ViTConfig:
    return ViTConfig(**CLIP_VISION_LAYOUT, image_size=224, patch_size=32, dim=768, num_layers=12,
                     num_heads=12, mlp_dim=3072)


# ViTConfig fields that make a ViT an OpenAI-CLIP image tower
CLIP_VISION_LAYOUT = dict(pool="cls", posemb="learned", class_token=True, pre_norm=True,
                          patch_bias=False, qkv_bias=True, activation="quick_gelu", norm_eps=1e-5)


@dataclasses.dataclass(frozen=True)
class CLIPConfig(configs.Config):
    vision: ViTConfig = dataclasses.field(default_factory=_default_vision)
    text: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
    projection_dim: int = 512
    logit_scale_init: float = math.log(1 / 0.07)  # 2.6593; HF rounds it to 2.6592
    logit_scale_max: float | None = 100.0  # exp(logit_scale) is clamped here (None: no clamp)
    logit_bias_init: float | None = None  # SigLIP-style learned bias (e.g. -10); None: no bias

    def __post_init__(self):
        if isinstance(self.vision, dict):
            object.__setattr__(self, "vision", ViTConfig.from_dict(self.vision))
        if isinstance(self.text, dict):
            object.__setattr__(self, "text", configs.from_dict(CLIPTextConfig, self.text))
        if self.projection_dim <= 0:
            raise ConfigError(f"CLIPConfig.projection_dim must be positive, got {self.projection_dim}")
        if self.vision.num_classes or self.vision.representation:
            raise ConfigError("CLIPConfig.vision: the image tower must output pooled features "
                              "(num_classes=0, representation=None); the projection follows it")
        if self.logit_scale_max is not None and self.logit_scale_max <= 0:
            raise ConfigError(f"CLIPConfig.logit_scale_max must be positive or None, got {self.logit_scale_max}")



def _tiny() -> dict[str, Any]:
    return dict(
        vision=ViTConfig(**CLIP_VISION_LAYOUT, image_size=32, patch_size=8, dim=64, num_layers=2,
                         num_heads=4, mlp_dim=128),
        text=CLIPTextConfig(vocab_size=100, max_len=16, dim=64, num_layers=2, num_heads=4, mlp_dim=128,
                            bos_token_id=98, eos_token_id=99, pad_token_id=0),
        projection_dim=32,
    )


def _openai(patch: int, image: int, vdim: int, vlayers: int, vheads: int, tdim: int, theads: int,
            proj: int) -> Any:
    def make() -> dict[str, Any]:
        return dict(
            vision=ViTConfig(**CLIP_VISION_LAYOUT, image_size=image, patch_size=patch, dim=vdim,
                             num_layers=vlayers, num_heads=vheads, mlp_dim=4 * vdim),
            text=CLIPTextConfig(dim=tdim, num_heads=theads, mlp_dim=4 * tdim),
            projection_dim=proj,
        )
    return make


VARIANTS = {
    "tiny": _tiny,
    "ViT-B/32": _openai(32, 224, 768, 12, 12, 512, 8, 512),
    "ViT-B/16": _openai(16, 224, 768, 12, 12, 512, 8, 512),
    "ViT-L/14": _openai(14, 224, 1024, 24, 16, 768, 12, 768),
    "ViT-L/14@336": _openai(14, 336, 1024, 24, 16, 768, 12, 768),
}
CLIPConfig.NAME = "CLIP"
CLIPConfig.VARIANTS = VARIANTS
CLIPTextConfig.NAME = "CLIP text"


def text_block_spec(c: CLIPTextConfig) -> BlockSpec:
    """The block every layer of the text tower is (the ViT encoder block; causality is a call
    argument, `c.causal`)."""
    return encoder_block_spec(
        num_heads=c.num_heads, mlp_dim=c.mlp_dim, head_dim=c.head_size, activation=c.activation,
        norm_eps=c.norm_eps, qkv_bias=True, initializer_range=c.initializer_range,
        implementation=c.implementation, dtype=c.dtype, param_dtype=c.param_dtype)


def eos_positions(tokens: jax.Array, config: CLIPTextConfig) -> jax.Array:
    """Index of the pooled (end-of-text) token of each row: [batch, seq] -> [batch]."""
    if config.eos_pooling == "argmax":
        return jnp.argmax(tokens, axis=-1)
    if config.eos_pooling == "last":
        return jnp.full(tokens.shape[:1], tokens.shape[1] - 1, jnp.int32)
    return jnp.argmax(tokens == config.eos_token_id, axis=-1)


def check_text_tokens(tokens: Any, config: CLIPTextConfig) -> None:
    """InputError for ids outside the vocabulary or (first_eos pooling) a row without the
    end-of-text token -- checked only when the values are concrete (not under jit). An
    `eos_token_id` outside the vocabulary can never occur: such a model (transformers' small
    test configs keep CLIP's 49407 beside a tiny vocab) pools at position 0, as transformers
    does, and is not refused."""
    if isinstance(tokens, jax.core.Tracer):
        return
    ids = np.asarray(tokens)
    if ids.size == 0:
        raise InputError("CLIP text: empty token ids")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= config.vocab_size:
        bad = hi if hi >= config.vocab_size else lo
        raise InputError(f"CLIP text: token id {bad} is outside the vocabulary [0, {config.vocab_size})")
    if config.eos_pooling == "first_eos" and 0 <= config.eos_token_id < config.vocab_size:
        missing = np.flatnonzero(~np.any(ids == config.eos_token_id, axis=-1)).tolist()
        if missing:
            raise InputError(f"CLIP text: row(s) {missing} have no end-of-text token "
                             f"(eos_token_id={config.eos_token_id}) to pool at")


class TextTransformer(nn.Module):
    """CLIP's (and SigLIP's) text tower: tokens [batch, seq] int -> the final-normed hidden
    state at the pooled position [batch, dim] (float32), plus named intermediates when asked:
    `hidden_states` (embeddings and each block's output, num_layers + 1 arrays), `final_hidden`,
    `eos_index`. `input_mask` [batch, seq] bool marks real tokens (False = padding)."""

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, *, input_mask: jax.Array | None = None,
                 return_intermediates: bool = False):
        c = self.config
        dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        if getattr(tokens, "ndim", None) != 2:
            raise InputError(f"CLIP text: tokens must be [batch, seq], got shape {tuple(getattr(tokens, 'shape', ()))}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise InputError(f"CLIP text: tokens must be integer ids, got dtype {tokens.dtype}")
        b, t = tokens.shape
        if t > c.max_len:
            raise InputError(f"CLIP text: sequence length {t} exceeds the context length max_len={c.max_len}")
        if input_mask is not None and tuple(input_mask.shape) != (b, t):
            raise InputError(f"CLIP text: input_mask must have shape {(b, t)}, got {tuple(input_mask.shape)}")
        check_text_tokens(tokens, c)
        init = nn.initializers.normal(c.initializer_range)
        x = Embed(c.vocab_size, c.dim, dtype, pdtype, init, name="embed")(tokens)
        x = x + LearnedPositions(c.max_len, c.dim, dtype, pdtype, init, name="pos_embedding")(jnp.arange(t))[None]
        x = constrain(x, BATCH_LEN_EMBED)
        mask = None if input_mask is None else masks_lib.padding_mask(input_mask)
        layers = make_layers(text_block_spec(c), c.num_layers, scan=c.scan_layers,
                             remat=c.remat_policy if c.remat else "none")
        embedded = x
        x, hidden, _ = run_layers(layers, x, mask=mask, causal=c.causal,
                                  keep_hidden=return_intermediates)
        h = LayerNorm(c.norm_eps, dtype=dtype, param_dtype=pdtype, name="final_norm")(x)
        index = eos_positions(tokens, c)
        pooled = h[jnp.arange(b), index].astype(jnp.float32)
        if return_intermediates:
            return pooled, {"hidden_states": (embedded,) + hidden, "final_hidden": h,
                            "eos_index": index}
        return pooled


def l2_normalize(x: jax.Array) -> jax.Array:
    """x / ||x|| along the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class CLIP(nn.Module):
    """Two towers + projections + temperature. See the module docstring for the call forms."""

    config: CLIPConfig

    def setup(self):
        c = self.config
        self.vision = ViT(c.vision)
        self.text = TextTransformer(c.text)
        self.visual_projection = DenseGeneral(
            c.projection_dim, ("embed", "mlp"), dtype=jnp.dtype(c.vision.dtype),
            param_dtype=jnp.dtype(c.vision.param_dtype),
            kernel_init=nn.initializers.normal(c.vision.dim ** -0.5))
        self.text_projection = DenseGeneral(
            c.projection_dim, ("embed", "mlp"), dtype=jnp.dtype(c.text.dtype),
            param_dtype=jnp.dtype(c.text.param_dtype),
            kernel_init=nn.initializers.normal(c.text.dim ** -0.5))
        self.logit_scale = self.param(
            "logit_scale", nn.with_logical_partitioning(nn.initializers.constant(c.logit_scale_init), ()),
            (), jnp.float32)
        if c.logit_bias_init is not None:
            self.logit_bias = self.param(
                "logit_bias", nn.with_logical_partitioning(nn.initializers.constant(c.logit_bias_init), ()),
                (), jnp.float32)

    def encode_image(self, images: jax.Array, *, normalize: bool = True,
                     return_intermediates: bool = False, interpolate_pos_encoding: bool = False):
        """images [batch, H, W, C] float -> [batch, projection_dim] float32 (L2-normalised
        unless normalize=False); plus the ViT's intermediates when asked."""
        pooled, out = self.vision(images, return_intermediates=True,
                                  interpolate_pos_encoding=interpolate_pos_encoding)
        z = self.visual_projection(pooled).astype(jnp.float32)
        z = l2_normalize(z) if normalize else z
        return (z, out) if return_intermediates else z

    def encode_text(self, tokens: jax.Array, *, input_mask: jax.Array | None = None,
                    normalize: bool = True, return_intermediates: bool = False):
        """tokens [batch, seq] int -> [batch, projection_dim] float32 (L2-normalised unless
        normalize=False); input_mask [batch, seq] marks real tokens (False = padding)."""
        pooled, out = self.text(tokens, input_mask=input_mask, return_intermediates=True)
        z = self.text_projection(pooled).astype(jnp.float32)
        z = l2_normalize(z) if normalize else z
        return (z, out) if return_intermediates else z

    def temperature(self) -> jax.Array:
        """min(exp(logit_scale), logit_scale_max), the multiplier of the cosine similarities."""
        return scale_from_param(self.logit_scale, self.config.logit_scale_max)

    def bias(self) -> jax.Array | None:
        """The learned logit bias (SigLIP option), or None."""
        return self.logit_bias.astype(jnp.float32) if self.config.logit_bias_init is not None else None

    def __call__(self, images: jax.Array, tokens: jax.Array, *, input_mask: jax.Array | None = None,
                 return_intermediates: bool = False, interpolate_pos_encoding: bool = False):
        """images [B_img, H, W, C] float, tokens [B_txt, T] int -> dict (module docstring)."""
        img, vout = self.encode_image(images, return_intermediates=True,
                                      interpolate_pos_encoding=interpolate_pos_encoding)
        txt, tout = self.encode_text(tokens, input_mask=input_mask, return_intermediates=True)
        out = contrastive_outputs(img, txt, self.temperature(), self.bias())
        if return_intermediates:
            return out, {"vision": vout, "text": tout}
        return out


def scale_from_param(logit_scale: jax.Array, limit: float | None) -> jax.Array:
    """The similarity multiplier exp(t) for the parameter t, clamped at `limit` (None: not)."""
    scale = jnp.exp(logit_scale.astype(jnp.float32))
    return scale if limit is None else jnp.minimum(scale, jnp.float32(limit))


def contrastive_outputs(img: jax.Array, txt: jax.Array, scale: jax.Array,
                        bias: jax.Array | None = None) -> dict[str, jax.Array]:
    """The output dict of a two-tower model from normalised embeddings img [B_img, P] and
    txt [B_txt, P]: logits_per_image = scale * img @ txt.T (+ bias) and its transpose."""
    logits = scale * jnp.einsum("ip,tp->it", img, txt)
    if bias is not None:
        logits = logits + bias
    out = {"image_embeds": img, "text_embeds": txt, "logits_per_image": logits,
           "logits_per_text": logits.T, "logit_scale": scale}
    if bias is not None:
        out["logit_bias"] = bias
    return out


def clamp_logit_scale(params: dict[str, Any], config: CLIPConfig) -> dict[str, Any]:
    """params with logit_scale clipped to [0, ln(logit_scale_max)] (OpenAI's training rule)."""
    if config.logit_scale_max is None:
        return params
    limit = math.log(config.logit_scale_max)
    return {**params, "logit_scale": jnp.clip(params["logit_scale"], 0.0, limit)}


def _text_inputs(config: CLIPTextConfig) -> tuple:
    # the end-of-text id where the tower pools at it (it refuses concrete rows without one)
    eos = config.eos_token_id if config.eos_pooling == "first_eos" else 0
    return (jnp.full((1, 1), eos, jnp.int32),)


def _clip_inputs(config) -> tuple:
    return image_inputs(config.vision) + _text_inputs(config.text)


FAMILIES = (
    Family("clip", CLIPConfig, CLIP, _clip_inputs,
           "CLIP: ViT image tower + causal text tower pooled at EOS, contrastive (ITC)",
           tasks=("contrastive",)),
    Family("clip_text", CLIPTextConfig, TextTransformer, _text_inputs,
           "CLIP's text tower alone (CLIPTextModel)"),
)
