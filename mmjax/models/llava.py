"""LLaVA: a CLIP image tower, a connector, and a LLaMA-family decoder reading image features in
place of image tokens (LLaVA-1: one Linear; LLaVA-1.5: Linear-GELU-Linear; or a Qwen-VL
resampler).

    config = LlavaConfig.from_variant("tiny")
    model = Llava(config)
    params = model.init(rng, tokens, images)["params"]
    logits = model.apply({"params": params}, tokens, images)                 # [B, T, vocab]
    logits, out = model.apply({"params": params}, tokens, images, return_intermediates=True)
    cache = model.init_cache(batch, max_len)
    logits, cache = model.apply({"params": params}, tokens, images, input_mask=m, cache=cache)
    logits, cache = model.apply({"params": params}, next_tokens, cache=cache)  # decoding

Inputs: `tokens` [B, T] int hold `image_token_index` at every image slot, already expanded
(each image takes `config.image_seq_length` slots, as transformers 5's processor writes them);
`images` [n_images, H, W, C] float NHWC, rescaled and normalised, or None (text only). The
image features [n_images, P, dim] fill the image slots in row-major order over the batch (the
first image's P features go to the first P image tokens, ...; transformers' `masked_scatter`).
The number of image tokens must equal n_images * P: checked whenever the token values are
concrete (not under jit), else only what the shapes decide. Image tokens under `input_mask`
False (padding) are not image slots.

Features: the ViT's `hidden_states[l]` for each l of `vision_feature_layer` (hidden_states[0]
is the input of the first block after CLIP's `pre_layrnorm`, hidden_states[-1] the last
block's output before the final norm; as transformers' CLIP tower numbers them), [CLS]
dropped with strategy "default" or kept with "full"; several layers are concatenated on the
last axis. Every ViT layer runs, also those after the deepest one read (LLaVA-1.5 reads -2:
one of 24 layers is spare work; skipping it would drop params the checkpoint holds).

Param tree: vision/... (`mmjax.models.vit.ViT`), projector/{linear_1, linear_2} ("mlp"),
projector/linear ("linear") or projector/resampler/... ("resampler"), language_model/...
(`mmjax.models.llama.Llama`).

Generation: `mmjax.generate.generate(model, params, prompts, gen, prefill_inputs={"images":
images})` -- the images go into the prompt's prefill only; `LlavaConfig` has `vocab_size`,
`max_len`, `eos_ids` and `dim` of its language model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import configs
from mmjax.errors import ConfigError, InputError
from mmjax.models.clip import CLIP_VISION_LAYOUT
from mmjax.models.family import Family, ReadsAsLanguageModel
from mmjax.models.llama import Llama, LlamaConfig
from mmjax.models.vit import ViT, ViTConfig, check_images
from mmjax.nn.cache import KVCache
from mmjax.nn.linear import DenseGeneral
from mmjax.nn.mlp import ACTIVATIONS
from mmjax.nn.resampler import QwenVLResampler

STRATEGIES = ("default", "full")
CONNECTORS = ("linear", "mlp", "resampler")


def _default_vision() -> ViTConfig:  # LLaVA-1.5's CLIP ViT-L/14 at 336 px
    return ViTConfig(**CLIP_VISION_LAYOUT, image_size=336, patch_size=14, dim=1024, num_layers=24,
                     num_heads=16, mlp_dim=4096)


@dataclasses.dataclass(frozen=True)
class LlavaConfig(ReadsAsLanguageModel, configs.Config):
    vision: ViTConfig = dataclasses.field(default_factory=_default_vision)
    text: LlamaConfig = dataclasses.field(default_factory=LlamaConfig)
    image_token_index: int = 32000
    vision_feature_layer: int | tuple[int, ...] = -2  # a tuple: those layers concatenated
    vision_feature_select_strategy: str = "default"  # "default": drop [CLS]; "full": keep it
    connector: str = "mlp"  # "linear" (LLaVA-1), "mlp" (LLaVA-1.5), "resampler" (Qwen-VL)
    projector_hidden_act: str = "gelu"  # "mlp": the activation between the two Linears
    projector_bias: bool = True
    resampler_queries: int = 256  # "resampler": features per image
    resampler_heads: int | None = None  # "resampler": None = text.dim // 128 (Qwen-VL)

    def __post_init__(self):
        if isinstance(self.vision, dict):
            object.__setattr__(self, "vision", ViTConfig.from_dict(self.vision))
        if isinstance(self.text, dict):
            object.__setattr__(self, "text", LlamaConfig.from_dict(self.text))
        if isinstance(self.vision_feature_layer, list):
            object.__setattr__(self, "vision_feature_layer", tuple(self.vision_feature_layer))
        v, t = self.vision, self.text
        if v.num_classes or v.representation:
            raise ConfigError("LlavaConfig.vision: the image tower must be a feature encoder "
                              "(num_classes=0, representation=None); the connector follows it")
        if v.pool == "map":
            raise ConfigError("LlavaConfig.vision: pool='map' adds an attention-pooling head LLaVA "
                              "never reads; use pool='cls' (CLIP) or 'gap'")
        idx = self.image_token_index
        if isinstance(idx, bool) or not isinstance(idx, (int, np.integer)) or not 0 <= idx < t.vocab_size:
            raise ConfigError(f"LlavaConfig.image_token_index={idx!r} must be a token id in [0, "
                              f"text.vocab_size={t.vocab_size}); add the image token to the "
                              "vocabulary (and grow the embedding) first")
        layers = self.feature_layers
        if not layers:
            raise ConfigError("LlavaConfig.vision_feature_layer: give at least one layer")
        n = v.num_layers + 1  # hidden_states: the embeddings, then each block's output
        bad = [layer for layer in layers
               if isinstance(layer, bool) or not isinstance(layer, (int, np.integer))
               or not -n <= layer < n]
        if bad:
            raise ConfigError(f"LlavaConfig.vision_feature_layer {bad} out of range: the image "
                              f"tower has {n} hidden states (embeddings + {v.num_layers} layers), "
                              f"so a layer index must be in [{-n}, {n - 1}]")
        s = self.vision_feature_select_strategy
        if s not in STRATEGIES:
            raise ConfigError(f"LlavaConfig.vision_feature_select_strategy {s!r}"
                              f"{configs.closest_name(str(s), STRATEGIES)}; known: {', '.join(STRATEGIES)}")
        if s == "default" and not v.class_token:
            raise ConfigError("LlavaConfig: vision_feature_select_strategy='default' drops the [CLS] "
                              "token, but the image tower has none (class_token=False); use 'full'")
        if self.connector not in CONNECTORS:
            raise ConfigError(f"LlavaConfig.connector {self.connector!r}"
                              f"{configs.closest_name(str(self.connector), CONNECTORS)}; known: "
                              f"{', '.join(CONNECTORS)}")
        if self.projector_hidden_act not in ACTIVATIONS:
            raise ConfigError(f"LlavaConfig.projector_hidden_act {self.projector_hidden_act!r}"
                              f"{configs.closest_name(str(self.projector_hidden_act), ACTIVATIONS)}; "
                              f"known: {', '.join(ACTIVATIONS)}")
        if self.connector == "resampler":
            q = self.resampler_queries
            if q <= 0 or int(np.sqrt(q)) ** 2 != q:
                raise ConfigError(f"LlavaConfig.resampler_queries must be a positive perfect square "
                                  f"(a g x g query grid), got {q}")
            if s != "default":
                raise ConfigError("LlavaConfig: connector='resampler' reads the patch grid; use "
                                  "vision_feature_select_strategy='default' (drops [CLS])")
            if t.dim % 4:
                raise ConfigError(f"LlavaConfig: connector='resampler' needs text.dim divisible by 4 "
                                  f"(2-D sin-cos positions), got {t.dim}")
            heads = self.resampler_num_heads
            if heads <= 0 or t.dim % heads:
                raise ConfigError(f"LlavaConfig: the resampler's {heads} heads must divide "
                                  f"text.dim={t.dim}; set resampler_heads")

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """The ViT hidden states read, as a tuple."""
        layer = self.vision_feature_layer
        return tuple(layer) if isinstance(layer, (tuple, list)) else (layer,)

    @property
    def features_dim(self) -> int:
        """Width of the selected image features (vision.dim per layer read)."""
        return self.vision.dim * len(self.feature_layers)

    @property
    def resampler_num_heads(self) -> int:
        return self.resampler_heads or max(self.text.dim // 128, 1)

    @property
    def image_seq_length(self) -> int:
        """Features (= image tokens) per image."""
        if self.connector == "resampler":
            return self.resampler_queries
        v = self.vision
        return v.num_tokens if self.vision_feature_select_strategy == "full" else v.num_patches



def _tiny() -> dict[str, Any]:
    return dict(
        vision=ViTConfig(**CLIP_VISION_LAYOUT, image_size=16, patch_size=4, dim=32, num_layers=2,
                         num_heads=4, mlp_dim=64),
        text=LlamaConfig.from_variant("tiny", vocab_size=128, dim=64, num_layers=2, num_heads=4,
                                      num_kv_heads=2, mlp_dim=128, max_len=128),
        image_token_index=127,
    )


def _llava15(vocab: int, dim: int, layers: int, heads: int, mlp: int) -> Any:
    def make() -> dict[str, Any]:
        return dict(text=LlamaConfig(vocab_size=vocab, dim=dim, num_layers=layers, num_heads=heads,
                                     mlp_dim=mlp, max_len=4096, norm_eps=1e-5, pad_token_id=32001),
                    image_token_index=32000)
    return make


VARIANTS = {
    "tiny": _tiny,
    "llava-1.5-7b": _llava15(32064, 4096, 32, 32, 11008),
    "llava-1.5-13b": _llava15(32064, 5120, 40, 40, 13824),
}
LlavaConfig.NAME = "LLaVA"
LlavaConfig.VARIANTS = VARIANTS


def count_image_tokens(tokens: Any, image_token_index: int, input_mask: Any = None) -> int | None:
    """Image slots in `tokens` (under `input_mask` when given), or None when the values are
    not concrete (under jit)."""
    if isinstance(tokens, jax.core.Tracer) or isinstance(input_mask, jax.core.Tracer):
        return None
    slots = np.asarray(tokens) == image_token_index
    if input_mask is not None:
        slots &= np.asarray(input_mask).astype(bool)
    return int(slots.sum())


def check_image_tokens(tokens: Any, n_images: int, config: LlavaConfig, input_mask: Any = None) -> None:
    """InputError unless `tokens` hold exactly n_images * image_seq_length image tokens (checked
    on concrete values; under jit only that the features fit into the sequence at all)."""
    per_image = config.image_seq_length
    n_features = n_images * per_image
    n_tokens = count_image_tokens(tokens, config.image_token_index, input_mask)
    if n_tokens is None:
        if n_features > int(np.prod(tokens.shape)):
            raise InputError(f"Image features and image tokens do not match: {n_images} image(s) give "
                             f"{n_features} features ({per_image} per image), more than the "
                             f"{int(np.prod(tokens.shape))} token slots of tokens {tuple(tokens.shape)}")
        return
    if n_tokens != n_features:
        raise InputError(
            f"Image features and image tokens do not match: tokens hold {n_tokens} image tokens "
            f"(image_token_index={config.image_token_index}), the {n_images} image(s) give {n_features} "
            f"features ({per_image} per image); expand each image to {per_image} image tokens")


def scatter_features(embeddings: jax.Array, slots: jax.Array, features: jax.Array) -> jax.Array:
    """embeddings [B, T, D] with the positions where `slots` [B, T] is True replaced, in
    row-major order, by the rows of `features` [N, D] (transformers' `masked_scatter`)."""
    b, t, d = embeddings.shape
    flat = slots.reshape(-1)
    rank = jnp.clip(jnp.cumsum(flat.astype(jnp.int32)) - 1, 0, max(features.shape[0] - 1, 0))
    gathered = jnp.take(features.astype(embeddings.dtype), rank, axis=0).reshape(b, t, d)
    return jnp.where(slots[..., None], gathered, embeddings)


class Projector(nn.Module):
    """LLaVA's connector: features [n, P, features_dim] -> [n, P', text.dim]."""

    config: LlavaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        t = c.text
        dtype, pdtype = jnp.dtype(t.dtype), jnp.dtype(t.param_dtype)
        init = nn.initializers.normal(t.initializer_range)
        if c.connector == "resampler":
            return QwenVLResampler(
                dim=t.dim, num_queries=c.resampler_queries, num_heads=c.resampler_num_heads,
                kv_dim=c.features_dim, dtype=dtype, param_dtype=pdtype,
                implementation=t.implementation, name="resampler")(x, grid_hw=c.vision.grid)
        if c.connector == "linear":
            return DenseGeneral(t.dim, ("embed", "mlp"), use_bias=c.projector_bias, dtype=dtype,
                                param_dtype=pdtype, kernel_init=init, name="linear")(x)
        h = DenseGeneral(t.dim, ("embed", "mlp"), use_bias=c.projector_bias, dtype=dtype,
                         param_dtype=pdtype, kernel_init=init, name="linear_1")(x)
        h = ACTIVATIONS[c.projector_hidden_act](h)
        return DenseGeneral(t.dim, ("mlp", "embed"), use_bias=c.projector_bias, dtype=dtype,
                            param_dtype=pdtype, kernel_init=init, name="linear_2")(h)


class Llava(nn.Module):
    """Image tower + connector + decoder. See the module docstring for the call forms."""

    config: LlavaConfig

    def setup(self):
        c = self.config
        self.vision = ViT(c.vision)
        self.projector = Projector(c)
        self.language_model = Llama(c.text)

    @nn.nowrap
    def init_cache(self, batch: int, max_len: int | None = None, dtype: Any = None) -> KVCache:
        """An empty KV cache of the language model (works on an unbound module)."""
        return Llama(self.config.text).init_cache(batch, max_len, dtype)

    @nn.nowrap
    def check_prefill_inputs(self, tokens: Any, input_mask: Any = None, images: Any = None) -> None:
        """The eager input checks of a call with `images` (`mmjax.generate.generate` runs them
        on the concrete prompt before its jitted prefill)."""
        if images is not None:
            check_images(images, self.config.vision, who="Llava")
            check_image_tokens(tokens, images.shape[0], self.config, input_mask)

    def _select_features(self, images: jax.Array) -> tuple[jax.Array, tuple]:
        c = self.config
        _, out = self.vision(images, return_intermediates=True)
        hidden = out["hidden_states"]
        start = 1 if c.vision_feature_select_strategy == "default" else 0
        picked = [hidden[layer][:, start:] for layer in c.feature_layers]
        feats = picked[0] if len(picked) == 1 else jnp.concatenate(picked, axis=-1)
        return feats, hidden

    def encode_images(self, images: jax.Array, return_intermediates: bool = False):
        """images [n, H, W, C] -> projected features [n, image_seq_length, text.dim] (in the
        text compute dtype); plus the vision tower's hidden states when asked."""
        check_images(images, self.config.vision, who="Llava")
        feats, hidden = self._select_features(images)
        z = self.projector(feats)
        return (z, hidden) if return_intermediates else z

    def embed(self, tokens: jax.Array, images: jax.Array | None = None, *,
              input_mask: jax.Array | None = None, return_intermediates: bool = False):
        """tokens [B, T] (+ images [n, H, W, C]) -> the decoder's input embeddings [B, T, dim]:
        token embeddings with the image slots holding the image features."""
        c = self.config
        if getattr(tokens, "ndim", None) != 2:
            raise InputError(f"Llava: tokens must be [batch, seq], got shape "
                             f"{tuple(getattr(tokens, 'shape', ()))}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise InputError(f"Llava: tokens must be integer ids, got dtype {tokens.dtype}")
        if input_mask is not None and tuple(input_mask.shape) != tuple(tokens.shape):
            raise InputError(f"Llava: input_mask must have shape {tuple(tokens.shape)}, got "
                             f"{tuple(input_mask.shape)}")
        features, vision_hidden = None, ()
        if images is None:
            x = self.language_model.embed_tokens(tokens)
        else:
            check_images(images, c.vision, who="Llava")
            check_image_tokens(tokens, images.shape[0], c, input_mask)
            slots = tokens == c.image_token_index
            if input_mask is not None:
                slots &= input_mask.astype(bool)
            # the image slots' own ids are never looked up
            x = self.language_model.embed_tokens(jnp.where(slots, 0, tokens))
            features, vision_hidden = self.encode_images(images, return_intermediates=True)
            x = scatter_features(x, slots, features.reshape(-1, features.shape[-1]))
        if return_intermediates:
            return x, {"image_features": features, "vision_hidden_states": vision_hidden}
        return x

    def __call__(self, tokens: jax.Array, images: jax.Array | None = None, *,
                 input_mask: jax.Array | None = None, positions: jax.Array | None = None,
                 cache: KVCache | None = None, return_intermediates: bool = False,
                 deterministic: bool = True):
        """
        Args:
          tokens: [batch, seq] int ids, `image_token_index` at the image slots.
          images: [n_images, H, W, C] float (NHWC) or None.
          input_mask, positions, cache, deterministic: as `Llama` (causal attention).
          return_intermediates: also return `image_features` [n, P, dim] (None without
            images), `inputs_embeds` [B, T, dim], the decoder's `hidden_states` and
            `final_hidden`, and the image tower's `vision_hidden_states`.
        Returns:
          logits [batch, seq, vocab] float32; then the new cache if `cache` was given; then the
          intermediates dict if asked.
        """
        x, inter = self.embed(tokens, images, input_mask=input_mask, return_intermediates=True)
        out = self.language_model(embeddings=x, input_mask=input_mask, positions=positions,
                                  cache=cache, return_intermediates=return_intermediates,
                                  deterministic=deterministic)
        if not return_intermediates:
            return out
        *head, lm_inter = out if isinstance(out, tuple) else (out,)
        inter = {**inter, "inputs_embeds": x, **lm_inter}
        return (*head, inter)


def llava_inputs(config: LlavaConfig) -> tuple:
    """One zero image and a row of exactly image_seq_length image tokens (then one text token)."""
    h, w = config.vision.image_hw
    n = config.image_seq_length
    tokens = jnp.concatenate([jnp.full((1, n), config.image_token_index, jnp.int32),
                              jnp.zeros((1, 1), jnp.int32)], axis=1)
    return tokens, jnp.zeros((1, h, w, config.vision.channels), jnp.float32)


FAMILIES = (Family("llava", LlavaConfig, Llava, llava_inputs,
                   "LLaVA: CLIP image tower + linear / MLP / resampler connector + LLaMA decoder",
                   tasks=("visual_sft",)),)
