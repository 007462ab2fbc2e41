"""Flamingo: a frozen image tower, a Perceiver Resampler, and GATED XATTN-DENSE blocks between
the layers of a frozen LLaMA-family decoder, reading interleaved image-text sequences.

    config = FlamingoConfig.from_variant("tiny")
    model = Flamingo(config)
    params = model.init(rng, tokens, images)["params"]
    logits = model.apply({"params": params}, tokens, images)                # [B, T, vocab]
    logits, out = model.apply({"params": params}, tokens, images, return_intermediates=True)
    cache = model.init_cache(batch, max_len)
    logits, cache = model.apply({"params": params}, tokens, images, input_mask=m, cache=cache)
    logits, cache = model.apply({"params": params}, next_tokens, cache=cache)  # decoding

Inputs. `tokens` [B, T] int hold one `image_token_index` (`<image>`) where each image sits in
the text; `<|endofchunk|>` (`end_of_chunk_token_id`) ends the text about an image (it is an
ordinary token to the model: data and evaluation write it, the loss trains it). `images`
[B, N, H, W, C] (or [B, N, F, H, W, C] with F video frames) float NHWC, rescaled and
normalised; rows with fewer images pad with any image (zeros) and say so in `image_valid`
[B, N] bool. The j-th `<image>` token of a row is the row's image j.

Media masking (`mmjax.ops.masks.media_index` / `media_mask`, the one mask builder): a text token
attends only to the latents of the image that most recently precedes it (the `<image>` token
counts itself); with `only_attend_immediate_media=False` to every image up to it. A token
before its row's first image attends to none: its cross-attention output is exactly zero (not
the uniform average over padding that transformers returned before PR #26839). An explicit
`media_mask` [B, T, N] bool overrides the rule (transformers' `image_attention_mask`).

Per gated block (one per `cross_interval` decoder layers):
    x = x + tanh(alpha_attn) * where(has_image, XAttn(norm(x), media), 0)
    x = x + tanh(alpha_mlp)  * FFW(norm(x))
with alpha_attn = alpha_mlp = 0 at initialisation ("zeros"), so a fresh model's logits equal
the frozen LM's exactly, with images or without.

The two published layouts (`layout`):
  * "idefics" (`IdeficsForVisionText2Text`): blocks before decoder layers 0, k, 2k, ...
    (k = cross_interval); RMSNorm (the LM's eps); cross-attention with the LM's head count
    and head_dim = dim / heads, k/v projected from the image width, no biases, no RoPE,
    optional RMSNorm on q and k over head_dim (`qk_layer_norms`); SwiGLU FFW of the LM's
    width; `alpha_type` "float" (one scalar per gate) or "vector" ([dim]); the perceiver
    uses ReLU; image features are the tower's whole last hidden state ([CLS] included,
    before its final LayerNorm).
  * "openflamingo": blocks after every n-th decoder layer (after layers n-1, 2n-1, ...);
    LayerNorm (eps 1e-5); cross-attention `cross_heads` x `cross_head_dim` (8 x 64); GELU
    FFW 4 x dim, no biases; the perceiver uses GELU; image features are the tower's patch
    tokens after its final LayerNorm, [CLS] dropped (open_clip's `output_tokens`).

`additional_vocab_size` > 0 adds rows for new special tokens (Idefics' decoupled embedding):
ids vocab_size .. vocab_size + additional - 1 read `additional_embed` and the logits grow by
`additional_head`; the base table and head stay the frozen LM's.

Trainable in Flamingo training (`TRAINABLE`): the resampler, the gated blocks and the
additional rows; the vision tower and the whole LM stay frozen. `freeze_vision` (default True)
also stops the gradient at the tower's output, so no backward pass runs through the tower
(the optimizer's freeze alone would still compute its gradients, then drop them); set it False
for the fine-tuning option that trains the tower.

Param tree: vision/... (`mmjax.models.vit.ViT`), resampler/... (`mmjax.nn.resampler.
PerceiverResampler`, with use_resampler), language_model/... (`mmjax.models.llama.Llama`,
exactly a LLaMA checkpoint's tree), gated_xattn_{j}/{cross_norm, cross_attn/{query, key,
value, out, query_norm, key_norm}, alpha_attn, mlp_norm, mlp/{gate, up, down} or {fc1, fc2},
alpha_mlp}, additional_embed/embedding, additional_head/kernel.

Generation: `mmjax.generate.generate(model, params, prompts, gen, prefill_inputs={"images":
images, "image_valid": valid})`. The prefill stores the media (resampled latents, up to
`max_images` per row) and each row's last image index in the `FlamingoCache`, so decoding
steps read their row's image without the pixels.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mmjax import configs
from mmjax.errors import ConfigError, InputError
from mmjax.models.clip import CLIP_VISION_LAYOUT
from mmjax.models.family import Family, ReadsAsLanguageModel
from mmjax.models.llama import Llama, LlamaConfig, check_token_ids
from mmjax.models.vit import ViT, ViTConfig, check_images
from mmjax.nn.attention import Attention
from mmjax.nn.cache import KVCache
from mmjax.nn.embeddings import Embed
from mmjax.nn.linear import DenseGeneral
from mmjax.nn.mlp import ACTIVATIONS, MLP, GatedMLP
from mmjax.nn.norms import LayerNorm, RMSNorm
from mmjax.nn.partitioning import BATCH_LEN_EMBED, constrain
from mmjax.nn.resampler import PerceiverResampler
from mmjax.ops import masks as masks_lib

LAYOUTS = ("idefics", "openflamingo")
ALPHA_TYPES = ("float", "vector")
ALPHA_INITS = ("zeros", "ones", "normal")
# what Flamingo training updates (regexes over "/"-joined param paths); everything else frozen
TRAINABLE = (r"^resampler/", r"^gated_xattn_\d+/", r"^additional_(embed|head)/")


def _default_vision() -> ViTConfig:  # Idefics-9b's CLIP ViT-H/14 at 224 px
    return ViTConfig(**{**CLIP_VISION_LAYOUT, "activation": "gelu"}, image_size=224,
                     patch_size=14, dim=1280, num_layers=32, num_heads=16, mlp_dim=5120)


@dataclasses.dataclass(frozen=True)
class FlamingoConfig(ReadsAsLanguageModel, configs.Config):
    vision: ViTConfig = dataclasses.field(default_factory=_default_vision)
    text: LlamaConfig = dataclasses.field(default_factory=LlamaConfig)
    layout: str = "idefics"  # "idefics" | "openflamingo" (see the module docstring)
    cross_interval: int = 4  # a gated block every this many decoder layers
    use_resampler: bool = True
    resampler_latents: int = 64
    resampler_depth: int = 6
    resampler_heads: int = 16
    resampler_head_dim: int = 96
    resampler_qk_norm: bool = False  # LayerNorm over head_dim on the perceiver's q and k
    resampler_activation: str | None = None  # None: the layout's (relu idefics, gelu openflamingo)
    max_frames: int = 0  # > 0: learned frame (time) embeddings for video inputs
    cross_heads: int | None = None  # None: text.num_heads (idefics) / 8 (openflamingo)
    cross_head_dim: int | None = None  # None: text.dim // heads (idefics) / 64 (openflamingo)
    qk_layer_norms: bool = False  # idefics: RMSNorm on the cross-attention's q and k
    alpha_type: str = "float"  # "float": one scalar per gate; "vector": one per channel
    alpha_init: str = "zeros"  # "zeros" (the paper), "ones", "normal" (std alpha_init_range)
    alpha_init_range: float = 0.0
    additional_vocab_size: int = 0  # trainable rows for new special tokens (Idefics)
    image_token_index: int = 32001  # `<image>` (idefics-9b: vocab 32000 + 2 additional)
    end_of_chunk_token_id: int | None = None  # `<|endofchunk|>` (data / evaluation)
    only_attend_immediate_media: bool = True
    max_images: int = 5  # media slots per row of a decoding cache (M3W: 5 per window)
    freeze_vision: bool = True  # stop_gradient on the tower's features (no backward through it)
    dropout: float = 0.0  # residual dropout inside the gated blocks (training only)

    def __post_init__(self):
        if isinstance(self.vision, dict):
            object.__setattr__(self, "vision", ViTConfig.from_dict(self.vision))
        if isinstance(self.text, dict):
            object.__setattr__(self, "text", LlamaConfig.from_dict(self.text))
        v, t = self.vision, self.text
        for name, value, allowed in (("layout", self.layout, LAYOUTS),
                                     ("alpha_type", self.alpha_type, ALPHA_TYPES),
                                     ("alpha_init", self.alpha_init, ALPHA_INITS)):
            if value not in allowed:
                raise ConfigError(f"FlamingoConfig.{name} {value!r}"
                                  f"{configs.closest_name(str(value), allowed)}; known: "
                                  f"{', '.join(allowed)}")
        if v.num_classes or v.representation:
            raise ConfigError("FlamingoConfig.vision: the image tower must be a feature encoder "
                              "(num_classes=0, representation=None)")
        if t.scan_layers:
            raise ConfigError("FlamingoConfig.text.scan_layers=True: the gated blocks run between "
                              "the decoder's layers, which needs the unscanned stack; set "
                              "text.scan_layers=False")
        if self.cross_interval < 1 or self.cross_interval > t.num_layers:
            raise ConfigError(f"FlamingoConfig.cross_interval must be in [1, text.num_layers="
                              f"{t.num_layers}], got {self.cross_interval}")
        if self.layout == "openflamingo" and not v.class_token:
            raise ConfigError("FlamingoConfig: layout='openflamingo' drops the tower's [CLS] "
                              "token, but it has none (vision.class_token=False)")
        if self.use_resampler:
            for name in ("resampler_latents", "resampler_depth", "resampler_heads",
                         "resampler_head_dim"):
                if getattr(self, name) <= 0:
                    raise ConfigError(f"FlamingoConfig.{name} must be positive, got "
                                      f"{getattr(self, name)}")
        act = self.perceiver_activation
        if act not in ACTIVATIONS:
            raise ConfigError(f"FlamingoConfig.resampler_activation {act!r}"
                              f"{configs.closest_name(str(act), ACTIVATIONS)}; known: "
                              f"{', '.join(ACTIVATIONS)}")
        if self.max_frames < 0:
            raise ConfigError(f"FlamingoConfig.max_frames must be >= 0, got {self.max_frames}")
        if self.max_frames and not self.use_resampler:
            raise ConfigError("FlamingoConfig.max_frames > 0 (video) needs use_resampler=True: "
                              "the resampler is what reads several frames")
        if self.xattn_heads <= 0 or self.xattn_head_dim <= 0:
            raise ConfigError("FlamingoConfig: cross_heads and cross_head_dim must be positive")
        if self.layout == "idefics" and self.cross_head_dim is None and t.dim % self.xattn_heads:
            raise ConfigError(f"FlamingoConfig: text.dim={t.dim} is not divisible by "
                              f"cross_heads={self.xattn_heads}; set cross_head_dim")
        if self.additional_vocab_size < 0:
            raise ConfigError(f"FlamingoConfig.additional_vocab_size must be >= 0, got "
                              f"{self.additional_vocab_size}")
        for name in ("image_token_index", "end_of_chunk_token_id"):
            idx = getattr(self, name)
            if idx is None and name == "end_of_chunk_token_id":
                continue
            if isinstance(idx, bool) or not isinstance(idx, (int, np.integer)) or not 0 <= idx < self.vocab_size:
                raise ConfigError(f"FlamingoConfig.{name}={idx!r} must be a token id in [0, "
                                  f"vocab_size={self.vocab_size}) (text.vocab_size + "
                                  "additional_vocab_size); add the token to the vocabulary first")
        if self.end_of_chunk_token_id is not None and self.end_of_chunk_token_id == self.image_token_index:
            raise ConfigError("FlamingoConfig: end_of_chunk_token_id equals image_token_index; "
                              "`<image>` and `<|endofchunk|>` must be two tokens")
        if self.max_images < 1:
            raise ConfigError(f"FlamingoConfig.max_images must be >= 1, got {self.max_images}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"FlamingoConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.alpha_init_range < 0:
            raise ConfigError(f"FlamingoConfig.alpha_init_range must be >= 0, got "
                              f"{self.alpha_init_range}")

    # --- derived ----------------------------------------------------------------------------
    @property
    def perceiver_activation(self) -> str:
        if self.resampler_activation is not None:
            return self.resampler_activation
        return "relu" if self.layout == "idefics" else "gelu"

    @property
    def xattn_heads(self) -> int:
        if self.cross_heads is not None:
            return self.cross_heads
        return self.text.num_heads if self.layout == "idefics" else 8

    @property
    def xattn_head_dim(self) -> int:
        if self.cross_head_dim is not None:
            return self.cross_head_dim
        return self.text.dim // self.xattn_heads if self.layout == "idefics" else 64

    @property
    def block_positions(self) -> tuple[int, ...]:
        """Where the gated blocks run, as `layer_hook` indices: i = before decoder layer i
        (idefics: 0, k, 2k, ...), num_layers = after the last (openflamingo: after layers
        n-1, 2n-1, ... = hook indices n, 2n, ...)."""
        n, k = self.text.num_layers, self.cross_interval
        if self.layout == "idefics":
            return tuple(range(0, n, k))
        return tuple(range(k, n + 1, k))

    @property
    def num_cross_layers(self) -> int:
        return len(self.block_positions)

    @property
    def media_dim(self) -> int:
        """Width of the media tokens the cross-attention reads (the image tower's)."""
        return self.vision.dim

    @property
    def tokens_per_image(self) -> int:
        """Media tokens per image: the latents, or the tower's tokens without a resampler."""
        if self.use_resampler:
            return self.resampler_latents
        v = self.vision
        return v.num_tokens if self.layout == "idefics" else v.num_patches

    @property
    def vocab_size(self) -> int:  # the decoder's rows plus the additional ones
        return self.text.vocab_size + self.additional_vocab_size


def _tiny() -> dict[str, Any]:
    return dict(
        vision=ViTConfig(**{**CLIP_VISION_LAYOUT, "activation": "gelu"}, image_size=16,
                         patch_size=8, dim=32, num_layers=1, num_heads=2, mlp_dim=64),
        text=LlamaConfig.from_variant("tiny", vocab_size=96, dim=64, num_layers=2, num_heads=4,
                                      num_kv_heads=4, mlp_dim=128, max_len=128),
        cross_interval=1, resampler_latents=4, resampler_depth=1, resampler_heads=2,
        resampler_head_dim=16, additional_vocab_size=2, image_token_index=97,
        end_of_chunk_token_id=96, max_images=3,
    )


def _idefics(vocab: int, dim: int, layers: int, heads: int, mlp: int, vision: dict) -> Any:
    def make() -> dict[str, Any]:
        return dict(
            vision=ViTConfig(**{**CLIP_VISION_LAYOUT, "activation": "gelu"}, **vision),
            text=LlamaConfig(vocab_size=vocab, dim=dim, num_layers=layers, num_heads=heads,
                             mlp_dim=mlp, max_len=2048, norm_eps=1e-6, pad_token_id=0),
            cross_interval=4, resampler_latents=64, resampler_depth=6, resampler_heads=16,
            resampler_head_dim=96, qk_layer_norms=False, alpha_type="float",
            additional_vocab_size=2, image_token_index=vocab + 1, max_images=5)
    return make


_VIT_H14 = dict(image_size=224, patch_size=14, dim=1280, num_layers=32, num_heads=16, mlp_dim=5120)
VARIANTS = {
    "tiny": _tiny,
    "idefics-9b": _idefics(32000, 4096, 32, 32, 11008, _VIT_H14),
    "idefics-80b": _idefics(32000, 8192, 80, 64, 22016, _VIT_H14),
}
FlamingoConfig.NAME = "Flamingo"
FlamingoConfig.VARIANTS = VARIANTS


# --- input checks -------------------------------------------------------------------------------

def _concrete(*xs: Any) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs if x is not None)


def check_media_tokens(tokens: Any, num_images: int, config: FlamingoConfig,
                       input_mask: Any = None, image_valid: Any = None) -> None:
    """InputError unless each row's `<image>` tokens match its images: at most `num_images`
    per row, and with `image_valid` exactly the row's valid images (checked on concrete
    values only; under jit nothing can be read)."""
    if not _concrete(tokens, input_mask, image_valid):
        return
    slots = np.asarray(tokens) == config.image_token_index
    if input_mask is not None:
        slots &= np.asarray(input_mask).astype(bool)
    counts = slots.sum(axis=1)
    over = np.nonzero(counts > num_images)[0]
    if over.size:
        r = int(over[0])
        raise InputError(f"Flamingo: row {r} holds {int(counts[r])} <image> tokens "
                         f"(image_token_index={config.image_token_index}) but only {num_images} "
                         f"image slot(s) were given; one <image> token per image")
    if image_valid is not None:
        valid = np.asarray(image_valid).astype(bool).sum(axis=1)
        bad = np.nonzero(valid != counts)[0]
        if bad.size:
            r = int(bad[0])
            more = "more images than <image> tokens" if valid[r] > counts[r] else "more <image> tokens than images"
            raise InputError(f"Flamingo: row {r} has {int(valid[r])} valid image(s) but "
                             f"{int(counts[r])} <image> token(s) ({more}); each image needs "
                             "exactly one <image> token where it sits in the text")


# --- decoding state -----------------------------------------------------------------------------

@struct.dataclass
class FlamingoCache:
    """Decoding state: the decoder's KV cache, the media its prompt showed (latents, flattened
    [batch, max_images * tokens_per_image, media_dim]), which media slots hold an image
    ([batch, max_images]) and each row's last image index so far ([batch], -1 = none)."""

    kv: KVCache
    media: jax.Array
    media_valid: jax.Array
    last_media: jax.Array

    def map_rows(self, fn) -> "FlamingoCache":
        """`fn(array, axis)` on every per-row array (beam search repeats and gathers rows)."""
        return self.replace(kv=self.kv.map_rows(fn), media=fn(self.media, 0),
                            media_valid=fn(self.media_valid, 0), last_media=fn(self.last_media, 0))


# --- the gated block ----------------------------------------------------------------------------

class GatedCrossAttentionBlock(nn.Module):
    """GATED XATTN-DENSE (see the module docstring). Call: `block(x, media, media_attn_mask,
    has_media, deterministic)` with media [B, M, media_dim] or None (no images: the
    cross-attention contributes exactly zero and only the gated FFW runs), media_attn_mask
    [B, 1, T, M] bool, has_media [B, T] bool."""

    config: FlamingoConfig

    def _norm(self, name: str):
        c, t = self.config, self.config.text
        dt, pdt = jnp.dtype(t.dtype), jnp.dtype(t.param_dtype)
        if c.layout == "idefics":
            return RMSNorm(t.norm_eps, dt, pdt, name=name)
        return LayerNorm(1e-5, dtype=dt, param_dtype=pdt, name=name)

    def _alpha(self, name: str) -> jax.Array:
        c = self.config
        shape = () if c.alpha_type == "float" else (c.text.dim,)
        axes = () if c.alpha_type == "float" else ("norm",)
        init = {"zeros": nn.initializers.zeros_init(), "ones": nn.initializers.ones_init(),
                "normal": nn.initializers.normal(c.alpha_init_range)}[c.alpha_init]
        return self.param(name, nn.with_logical_partitioning(init, axes), shape,
                          jnp.dtype(c.text.param_dtype))

    @nn.compact
    def __call__(self, x, media, media_attn_mask, has_media, deterministic: bool = True):
        c, t = self.config, self.config.text
        dt, pdt = jnp.dtype(t.dtype), jnp.dtype(t.param_dtype)
        init = nn.initializers.normal(t.initializer_range)
        drop = nn.Dropout(c.dropout, deterministic=deterministic or c.dropout == 0.0)
        alpha_attn = self._alpha("alpha_attn")
        alpha_mlp = self._alpha("alpha_mlp")
        attn = Attention(num_heads=c.xattn_heads, num_kv_heads=c.xattn_heads,
                         head_dim=c.xattn_head_dim, out_features=t.dim, dtype=dt, param_dtype=pdt,
                         kernel_init=init, implementation=t.implementation,
                         qk_norm="rms" if c.qk_layer_norms else None, qk_norm_eps=t.norm_eps,
                         name="cross_attn")
        h = self._norm("cross_norm")(x)
        if media is None:
            if self.is_initializing():  # create the cross-attention params all the same
                attn(h, jnp.zeros((x.shape[0], 1, c.media_dim), dt))
        else:
            # a row with no image to read attends to every media token (its output is then
            # zeroed): a fully masked softmax would put NaNs into the backward pass
            mask = media_attn_mask | ~has_media[:, None, :, None]
            h = attn(h, media.astype(dt), mask=mask)
            h = jnp.where(has_media[..., None], drop(h), 0.0)
            x = x + jnp.tanh(alpha_attn).astype(dt) * h
        h = self._norm("mlp_norm")(x)
        if c.layout == "idefics":
            h = GatedMLP(t.mlp_dim, t.activation, False, dt, pdt, init, name="mlp")(h)
        else:
            h = MLP(4 * t.dim, "gelu", False, dt, pdt, init, name="mlp")(h)
        x = x + jnp.tanh(alpha_mlp).astype(dt) * drop(h)
        return constrain(x, BATCH_LEN_EMBED)


# --- the model ----------------------------------------------------------------------------------

class Flamingo(nn.Module):
    """Image tower + Perceiver Resampler + gated cross-attention into a frozen decoder. See the
    module docstring for the call forms."""

    config: FlamingoConfig

    def setup(self):
        c = self.config
        t = c.text
        dt, pdt = jnp.dtype(t.dtype), jnp.dtype(t.param_dtype)
        self.vision = ViT(c.vision)
        if c.use_resampler:
            self.resampler = PerceiverResampler(
                dim=c.media_dim, num_latents=c.resampler_latents, depth=c.resampler_depth,
                num_heads=c.resampler_heads, head_dim=c.resampler_head_dim,
                activation=c.perceiver_activation, qk_norm=c.resampler_qk_norm,
                max_frames=c.max_frames, dtype=jnp.dtype(c.vision.dtype),
                param_dtype=jnp.dtype(c.vision.param_dtype),
                implementation=c.vision.implementation)
        self.language_model = Llama(t)
        self.gated_xattn = [GatedCrossAttentionBlock(c, name=f"gated_xattn_{j}")
                            for j in range(c.num_cross_layers)]
        if c.additional_vocab_size:
            init = nn.initializers.normal(t.initializer_range)
            # a few rows: never split over the mesh (logical axis "vocab_extra" has no rule)
            self.additional_embed = Embed(c.additional_vocab_size, t.dim, dt, pdt, init,
                                          axes=("vocab_extra", "embed"))
            self.additional_head = DenseGeneral(c.additional_vocab_size, ("embed", "vocab_extra"),
                                                dtype=dt, param_dtype=pdt, kernel_init=init)

    @nn.nowrap
    def init_cache(self, batch: int, max_len: int | None = None, dtype: Any = None) -> FlamingoCache:
        """An empty decoding cache (works on an unbound module): the decoder's KV cache and
        `max_images` empty media slots per row."""
        c = self.config
        kv = Llama(c.text).init_cache(batch, max_len, dtype)
        media = jnp.zeros((batch, c.max_images * c.tokens_per_image, c.media_dim),
                          jnp.dtype(dtype or c.text.dtype))
        return FlamingoCache(kv=kv, media=media, media_valid=jnp.zeros((batch, c.max_images), bool),
                             last_media=jnp.full((batch,), -1, jnp.int32))

    @nn.nowrap
    def check_prefill_inputs(self, tokens: Any, input_mask: Any = None, images: Any = None,
                             image_valid: Any = None, media_mask: Any = None) -> None:
        """The eager input checks of a call with `images` (generation runs them on the
        concrete prompt before its jitted prefill)."""
        if images is not None:
            _image_shape(images, self.config)
            check_media_tokens(tokens, images.shape[1], self.config, input_mask, image_valid)

    # --- pieces ---------------------------------------------------------------------------------
    def encode_images(self, images: jax.Array, return_intermediates: bool = False,
                      interpolate_pos_encoding: bool = False):
        """images [B, N, H, W, C] or [B, N, F, H, W, C] -> media [B, N, tokens_per_image,
        media_dim]; plus the tower's features [B, N, F, S, media_dim] when asked.
        interpolate_pos_encoding: images of another resolution (divisible by the patch size),
        the tower's position embeddings resampled to their grid (Flamingo's fine-tuning at a
        higher resolution; without a resampler the media length then changes too)."""
        c = self.config
        b, n, f = _image_shape(images, c)
        flat = images.reshape((b * n * f,) + images.shape[-3:])
        check_images(flat, c.vision, who="Flamingo", any_size=interpolate_pos_encoding)
        _, out = self.vision(flat, return_intermediates=True,
                             interpolate_pos_encoding=interpolate_pos_encoding)
        if c.layout == "idefics":
            feats = out["last_hidden"]  # every token, before the tower's final LayerNorm
        else:
            feats = out["patch_tokens"]  # after the final LayerNorm, [CLS] dropped
        if c.freeze_vision:  # Flamingo's frozen tower: no gradient flows into (or through) it
            feats = jax.lax.stop_gradient(feats)
        feats = feats.reshape((b * n, f) + feats.shape[1:])
        if c.use_resampler:
            media = self.resampler(feats)
        else:
            media = feats[:, 0]
        media = media.reshape((b, n) + media.shape[1:])
        feats = feats.reshape((b, n) + feats.shape[1:])
        return (media, feats) if return_intermediates else media

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """Token ids [B, T] -> input embeddings [B, T, dim]: the frozen table for ids below
        text.vocab_size, `additional_embed` for the additional ids above it."""
        c = self.config
        if not c.additional_vocab_size:  # the decoder's own checks (shape, dtype, range)
            return self.language_model.embed_tokens(tokens)
        check_token_ids(tokens, c.vocab_size)  # the whole range, additional rows included;
        base = c.text.vocab_size  # shape and dtype: the decoder's embed_tokens below
        extra = tokens >= base
        x = self.language_model.embed_tokens(jnp.where(extra, 0, tokens))
        y = self.additional_embed(jnp.where(extra, tokens - base, 0))
        return jnp.where(extra[..., None], y.astype(x.dtype), x)

    def __call__(self, tokens: jax.Array, images: jax.Array | None = None, *,
                 image_valid: jax.Array | None = None, media: jax.Array | None = None,
                 media_mask: jax.Array | None = None, input_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, cache: FlamingoCache | None = None,
                 return_intermediates: bool = False, deterministic: bool = True,
                 interpolate_pos_encoding: bool = False):
        """
        Args:
          tokens: [B, T] int ids, one `image_token_index` per image.
          images: [B, N, H, W, C] or [B, N, F, H, W, C] float, or None: text only (or, with
            a filled cache, the images the prompt showed).
          image_valid: [B, N] bool, False for padding image slots (checked against the
            `<image>` tokens: each row needs exactly one per valid image).
          media: [B, N, tokens_per_image, media_dim], precomputed `encode_images` output,
            instead of images.
          media_mask: [B, T, N] bool, which images each token attends (default: the rule of
            the module docstring from the `<image>` tokens).
          input_mask, positions, deterministic: as `Llama` (causal attention).
          cache: a `FlamingoCache` (`init_cache`); the prefill's images are stored in it.
          interpolate_pos_encoding: images of another resolution (`encode_images`).
          return_intermediates: also return `media` [B, N, R, media_dim] (None without
            images), `vision_features`, `media_mask`, `inputs_embeds`, the decoder's
            `hidden_states` (embeddings and each decoder layer's output) and `final_hidden`.
        Returns:
          logits [B, T, vocab_size] float32 (vocab_size = text + additional); then the new
          cache if `cache` was given; then the intermediates dict if asked.
        """
        c = self.config
        x = self.embed_tokens(tokens)
        b, t = tokens.shape
        if input_mask is not None and tuple(input_mask.shape) != (b, t):
            raise InputError(f"Flamingo: input_mask must have shape {(b, t)}, got "
                             f"{tuple(input_mask.shape)}")
        if images is not None and media is not None:
            raise InputError("Flamingo: pass images or precomputed media, not both")
        feats = None
        if images is not None:
            _image_shape(images, c)
            if image_valid is not None and tuple(image_valid.shape) != tuple(images.shape[:2]):
                raise InputError(f"Flamingo: image_valid must be [batch, images] = "
                                 f"{tuple(images.shape[:2])}, got {tuple(image_valid.shape)}")
            media, feats = self.encode_images(images, return_intermediates=True,
                                              interpolate_pos_encoding=interpolate_pos_encoding)
        elif media is not None:
            want = (b, c.tokens_per_image, c.media_dim)
            if media.ndim != 4 or (media.shape[0], media.shape[2], media.shape[3]) != want:
                raise InputError(f"Flamingo: media must be [batch={b}, images, "
                                 f"{c.tokens_per_image}, {c.media_dim}], got {tuple(media.shape)}")
        if media is not None:
            n = media.shape[1]
            if media_mask is None:
                check_media_tokens(tokens, n, c, input_mask, image_valid)
            start = None
            if cache is not None:
                if n > c.max_images:
                    raise InputError(f"Flamingo: {n} images per row, the decoding cache holds "
                                     f"max_images={c.max_images}; raise max_images")
                if media.shape[2] != c.tokens_per_image:
                    raise InputError(f"Flamingo: {media.shape[2]} media tokens per image, the "
                                     f"decoding cache holds {c.tokens_per_image} (another image "
                                     "size without a resampler); decode at the trained size")
                pad = c.max_images - n
                valid = (jnp.ones((b, n), bool) if image_valid is None else image_valid.astype(bool))
                cache = cache.replace(
                    media=jnp.pad(media, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(
                        cache.media.shape).astype(cache.media.dtype),
                    media_valid=jnp.pad(valid, ((0, 0), (0, pad))))
            per_image = media.shape[2]  # tokens_per_image (more for a bigger image, no resampler)
            flat_media = media.reshape(b, n * per_image, c.media_dim)
        elif cache is not None:  # decoding: the prompt's media
            n, flat_media, image_valid = c.max_images, cache.media, cache.media_valid
            start = cache.last_media
        else:
            n, flat_media, start = 0, None, None

        index = masks_lib.media_index(tokens, c.image_token_index, input_mask, start)
        if media_mask is not None:
            if flat_media is None or tuple(media_mask.shape) != (b, t, n):
                raise InputError(f"Flamingo: media_mask must be [batch, seq, images] = {(b, t, n)} "
                                 f"(and needs images), got {tuple(media_mask.shape)}")
            mmask = media_mask.astype(bool)
        elif flat_media is not None:
            mmask = masks_lib.media_mask(index, n, only_immediate=c.only_attend_immediate_media,
                                         media_valid=image_valid)
        else:
            mmask = jnp.zeros((b, t, 0), bool)
        has_media = mmask.any(-1)
        attn_mask = (None if flat_media is None
                     else masks_lib.media_attention_mask(mmask, flat_media.shape[1] // max(n, 1)))
        where = {p: j for j, p in enumerate(c.block_positions)}

        def hook(i, h):
            if i not in where:
                return h
            return self.gated_xattn[where[i]](h, flat_media, attn_mask, has_media, deterministic)

        out = self.language_model(embeddings=x, input_mask=input_mask, positions=positions,
                                  cache=None if cache is None else cache.kv,
                                  return_intermediates=True, deterministic=deterministic,
                                  layer_hook=hook)
        if cache is not None:
            logits, kv, inter = out
            cache = cache.replace(kv=kv, last_media=index[:, -1].astype(jnp.int32))
        else:
            logits, inter = out
        if c.additional_vocab_size:
            extra = self.additional_head(inter["final_hidden"]).astype(jnp.float32)
            logits = jnp.concatenate([logits, extra], axis=-1)
        outputs: tuple = (logits,)
        if cache is not None:
            outputs += (cache,)
        if return_intermediates:
            outputs += ({"media": media, "vision_features": feats, "media_mask": mmask,
                         "inputs_embeds": x, **inter},)
        return outputs[0] if len(outputs) == 1 else outputs


def _image_shape(images: Any, config: FlamingoConfig) -> tuple[int, int, int]:
    """(batch, images, frames) of a 5-D [B, N, H, W, C] or 6-D [B, N, F, H, W, C] input."""
    shape = tuple(getattr(images, "shape", ()))
    if len(shape) == 5:
        b, n, f = shape[0], shape[1], 1
    elif len(shape) == 6:
        b, n, f = shape[:3]
        if f > 1 and not config.max_frames:
            raise InputError(f"Flamingo: images have {f} frames (shape {shape}), but the model "
                             "reads single images (max_frames=0); set max_frames for video")
        if config.max_frames and f > config.max_frames:
            raise InputError(f"Flamingo: {f} frames per image, more than max_frames="
                             f"{config.max_frames}")
    else:
        hint = (" (one image per row? add the images axis: images[:, None])"
                if len(shape) == 4 else "")
        raise InputError(f"Flamingo: images must be [batch, images, H, W, C] or [batch, images, "
                         f"frames, H, W, C], got shape {shape}{hint}")
    if n < 1:
        raise InputError(f"Flamingo: images has no image axis entries, shape {shape}")
    return b, n, f


def flamingo_inputs(config: FlamingoConfig) -> tuple:
    """One row `<image>` + one text token and one zero image."""
    h, w = config.vision.image_hw
    tokens = jnp.asarray([[config.image_token_index, 0]], jnp.int32)
    return tokens, jnp.zeros((1, 1, h, w, config.vision.channels), jnp.float32)


FAMILIES = (Family("flamingo", FlamingoConfig, Flamingo, flamingo_inputs,
                   "Flamingo / Idefics: image tower + Perceiver Resampler + gated "
                   "cross-attention into a frozen LLaMA decoder", tasks=("flamingo",)),)
