"""SigLIP: CLIP's two towers trained with a sigmoid loss (Zhai et al. 2023).

    config = SigLIPConfig.from_variant("tiny")
    model = SigLIP(config)
    params = model.init(rng, images, tokens)["params"]     # images NHWC float, tokens [B, T] int
    out = model.apply({"params": params}, images, tokens)  # same dict as mmjax.models.clip.CLIP
    probs = jax.nn.sigmoid(out["logits_per_image"])        # independent match probabilities

Differences from CLIP, all expressed through the shared pieces:
  * image tower: `mmjax.models.vit.ViT` with no [CLS] token, learned positions over the patches
    only, no pre-norm, a patch bias, and `pool="map"` (big_vision's MAPHead: a learned probe
    attends over the final-normed tokens). Its pooled output is the image embedding: there is
    no visual projection.
  * text tower: `mmjax.models.clip.TextTransformer` with bidirectional attention
    (`causal=False`), pooled at the last position (`eos_pooling="last"`: SigLIP pads every
    text to max_len), then a Dense head with bias (`text_head`, HF's `text_model.head`).
  * logits = exp(t) * cos(img, txt) + b with a learned bias b; t is not clamped. The loss is
    `mmjax.ops.losses.siglip_loss` (in `mmjax.ops.losses`, apart from the model).

Param tree: vision/... (ViT, with map_head), text/... (TextTransformer), text_head/{kernel,
bias}, logit_scale, logit_bias.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import configs
from mmjax.errors import ConfigError
from mmjax.models.family import Family
from mmjax.models.clip import CLIPTextConfig, TextTransformer, contrastive_outputs, l2_normalize
from mmjax.models.vit import ViT, ViTConfig
from mmjax.nn.linear import DenseGeneral

# ViTConfig fields that make a ViT a SigLIP image tower
SIGLIP_VISION_LAYOUT = dict(pool="map", posemb="learned", class_token=False, pre_norm=False,
                            patch_bias=True, qkv_bias=True)
# CLIPTextConfig fields that make a TextTransformer a SigLIP text tower
SIGLIP_TEXT_LAYOUT = dict(causal=False, eos_pooling="last")


def _default_vision() -> ViTConfig:
    return ViTConfig(**SIGLIP_VISION_LAYOUT, image_size=224, patch_size=16, dim=768, num_layers=12,
                     num_heads=12, mlp_dim=3072, activation="gelu_tanh", norm_eps=1e-6)


def _default_text() -> CLIPTextConfig:
    return CLIPTextConfig(**SIGLIP_TEXT_LAYOUT, vocab_size=32000, max_len=64, dim=768, num_layers=12,
                          num_heads=12, mlp_dim=3072, activation="gelu_tanh", norm_eps=1e-6,
                          bos_token_id=None, eos_token_id=1, pad_token_id=1)


@dataclasses.dataclass(frozen=True)
class SigLIPConfig(configs.Config):
    vision: ViTConfig = dataclasses.field(default_factory=_default_vision)
    text: CLIPTextConfig = dataclasses.field(default_factory=_default_text)
    projection_dim: int | None = None  # text head width (HF projection_size); None = text.dim
    logit_scale_init: float = math.log(10.0)  # the paper's t' init (t = exp(t') = 10)
    logit_bias_init: float = -10.0  # the paper's b init

    def __post_init__(self):
        if isinstance(self.vision, dict):
            object.__setattr__(self, "vision", ViTConfig.from_dict(self.vision))
        if isinstance(self.text, dict):
            object.__setattr__(self, "text", configs.from_dict(CLIPTextConfig, self.text))
        if self.vision.pool != "map":
            raise ConfigError(f"SigLIPConfig.vision.pool must be 'map' (SigLIP's attention pooling), "
                              f"got {self.vision.pool!r}")
        if self.vision.num_classes or self.vision.representation:
            raise ConfigError("SigLIPConfig.vision: the image tower must output pooled features "
                              "(num_classes=0, representation=None)")
        if self.embed_dim != self.vision.dim:
            raise ConfigError(f"SigLIPConfig: the text head width {self.embed_dim} must equal the image "
                              f"tower width vision.dim={self.vision.dim} (image features are not projected)")

    @property
    def embed_dim(self) -> int:
        """Width of the joint embedding space."""
        return self.projection_dim or self.text.dim



def _tiny() -> dict[str, Any]:
    return dict(
        vision=ViTConfig(**SIGLIP_VISION_LAYOUT, image_size=32, patch_size=8, dim=64, num_layers=2,
                         num_heads=4, mlp_dim=128, activation="gelu_tanh", norm_eps=1e-6),
        text=CLIPTextConfig(**SIGLIP_TEXT_LAYOUT, vocab_size=100, max_len=16, dim=64, num_layers=2,
                            num_heads=4, mlp_dim=128, activation="gelu_tanh", norm_eps=1e-6,
                            bos_token_id=None, eos_token_id=1, pad_token_id=1),
    )


VARIANTS = {
    "tiny": _tiny,
    "B/16": lambda: dict(vision=_default_vision(), text=_default_text()),
}
SigLIPConfig.NAME = "SigLIP"
SigLIPConfig.VARIANTS = VARIANTS
SiglipConfig = SigLIPConfig  # the name before configs followed the module's casing (SigLIP)


class SigLIP(nn.Module):
    """Two towers + text head + temperature and bias. See the module docstring."""

    config: SigLIPConfig

    def setup(self):
        c = self.config
        self.vision = ViT(c.vision)
        self.text = TextTransformer(c.text)
        self.text_head = _dense(c.embed_dim, c.text)
        const = nn.initializers.constant
        self.logit_scale = self.param(
            "logit_scale", nn.with_logical_partitioning(const(c.logit_scale_init), ()), (), jnp.float32)
        self.logit_bias = self.param(
            "logit_bias", nn.with_logical_partitioning(const(c.logit_bias_init), ()), (), jnp.float32)

    def encode_image(self, images: jax.Array, *, normalize: bool = True,
                     return_intermediates: bool = False, interpolate_pos_encoding: bool = False):
        """images [batch, H, W, C] float -> [batch, embed_dim] float32 (the MAP-pooled feature,
        L2-normalised unless normalize=False); plus the ViT's intermediates when asked."""
        pooled, out = self.vision(images, return_intermediates=True,
                                  interpolate_pos_encoding=interpolate_pos_encoding)
        z = pooled.astype(jnp.float32)
        z = l2_normalize(z) if normalize else z
        return (z, out) if return_intermediates else z

    def encode_text(self, tokens: jax.Array, *, input_mask: jax.Array | None = None,
                    normalize: bool = True, return_intermediates: bool = False):
        """tokens [batch, seq] int -> [batch, embed_dim] float32 (head output at the last
        position, L2-normalised unless normalize=False)."""
        pooled, out = self.text(tokens, input_mask=input_mask, return_intermediates=True)
        z = self.text_head(pooled).astype(jnp.float32)
        z = l2_normalize(z) if normalize else z
        return (z, out) if return_intermediates else z

    def __call__(self, images: jax.Array, tokens: jax.Array, *, input_mask: jax.Array | None = None,
                 return_intermediates: bool = False, interpolate_pos_encoding: bool = False):
        img, vout = self.encode_image(images, return_intermediates=True,
                                      interpolate_pos_encoding=interpolate_pos_encoding)
        txt, tout = self.encode_text(tokens, input_mask=input_mask, return_intermediates=True)
        scale = jnp.exp(self.logit_scale.astype(jnp.float32))
        out = contrastive_outputs(img, txt, scale, self.logit_bias.astype(jnp.float32))
        if return_intermediates:
            return out, {"vision": vout, "text": tout}
        return out


def _dense(features: int, text: CLIPTextConfig) -> DenseGeneral:
    return DenseGeneral(features, ("embed", "mlp"), use_bias=True, dtype=jnp.dtype(text.dtype),
                        param_dtype=jnp.dtype(text.param_dtype),
                        kernel_init=nn.initializers.normal(text.dim ** -0.5))


def _siglip_inputs(config: SigLIPConfig) -> tuple:
    from mmjax.models.clip import _clip_inputs

    return _clip_inputs(config)


FAMILIES = (Family("siglip", SigLIPConfig, SigLIP, _siglip_inputs,
                   "SigLIP: ViT with MAP pooling + text tower, sigmoid loss with a learned bias"),)
