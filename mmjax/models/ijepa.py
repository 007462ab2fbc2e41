"""I-JEPA (Assran et al. 2023): predict the representations of masked image blocks from a context
block, in representation space, with no pixel reconstruction and no augmentations.

    config = IJepaConfig.from_variant("tiny")
    model = IJepa(config)
    params = model.init(rng, images, context_idx, target_idx)["params"]
    out = model.apply({"params": params}, images, context_idx, target_idx)
    out["predictions"]            # [T, B, Kt, D]: the predictor's guess for each target block
    targets = model.apply({"params": ema_params}, images, target_idx, method=IJepa.targets)
    loss = ijepa_loss(out["predictions"], targets)                  # mmjax.ops.jepa_losses

Masks are patch-index lists from `mmjax.data.multiblock.sample_multiblock` (context
`[B, Kc]` for one context block -- fold several into the batch --, targets `[T, B, Kt]`).

* **Context encoder** (`encoder`): an mmjax ViT in I-JEPA's layout (no [CLS]; fixed 2-D sin-cos
  positions as the paper, or a learned table as Hugging Face stores converted checkpoints) that
  sees the context patches only (`ViT(keep=context_idx)`): positions are added before the
  patches are selected, so each token keeps its place.
* **Predictor** (`predictor`): a narrow ViT: a Linear from the encoder width to `predictor_dim`,
  plus fixed sin-cos positions of the context patches; for each target block, one learned mask
  token plus the position of every target patch is appended; `predictor_layers` pre-norm blocks,
  a LayerNorm, a Linear back to the encoder width; the outputs at the target tokens are the
  predictions. Each target block is predicted in its own pass (the context repeated), as the
  reference does.
* **Targets** (`IJepa.targets`, applied with the EMA params of the *target encoder*): the encoder
  on the full image, then LayerNorm without affine (eps 1e-5, `F.layer_norm`'s), gathered at
  each target block. The EMA update and its momentum schedule (0.996 -> 1.0 linearly) and the
  loss (smooth L1 as the reference code, or L2 as the paper writes) live in
  `mmjax.ops.jepa_losses`, apart from the model.

Hugging Face's `IJepaModel` is the encoder alone: `mmjax.convert.ijepa` converts it to the ViT
that is `encoder` here (`IJepaConfig(encoder=<that ViTConfig>)`).

Param tree: encoder/... (a ViT), predictor/{embed, mask_token, layers_i/..., norm, proj}.
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
from mmjax.models.family import Family
from mmjax.models.vit import ViT, ViTConfig, sincos2d_positions, vit_block_spec
from mmjax.nn.linear import DenseGeneral
from mmjax.nn.norms import LayerNorm
from mmjax.nn.transformer import make_layers, run_layers

LOSSES = ("smooth_l1", "l2")


def ijepa_encoder(**kw) -> ViTConfig:
    """A ViTConfig in I-JEPA's layout (no [CLS], mean pooling, sin-cos positions) + `kw`."""
    return ViTConfig(**{"pool": "gap", "class_token": False, "posemb": "sincos2d", "norm_eps": 1e-6, **kw})


VARIANTS = {
    # the released ViT-H/14 at 224 px: encoder 1280 x 32, predictor 384 x 12
    "H/14": dict(encoder=dict(image_size=224, patch_size=14, dim=1280, num_layers=32, num_heads=16,
                              mlp_dim=5120),
                 predictor_dim=384, predictor_layers=12, predictor_heads=12, predictor_mlp_dim=1536),
    "tiny": dict(encoder=dict(image_size=32, patch_size=4, dim=64, num_layers=2, num_heads=4, mlp_dim=128),
                 predictor_dim=32, predictor_layers=2, predictor_heads=4, predictor_mlp_dim=64),
}


@dataclasses.dataclass(frozen=True)
class IJepaConfig(configs.Config):
    encoder: ViTConfig = dataclasses.field(default_factory=lambda: ijepa_encoder(**VARIANTS["tiny"]["encoder"]))
    predictor_dim: int = 32
    predictor_layers: int = 2
    predictor_heads: int = 4
    predictor_mlp_dim: int = 64
    target_norm_eps: float = 1e-5  # F.layer_norm's default, what the reference's targets use

    def __post_init__(self):
        if isinstance(self.encoder, dict):
            object.__setattr__(self, "encoder", ViTConfig.from_dict(self.encoder))
        e = self.encoder
        if e.class_token:
            raise ConfigError("IJepaConfig.encoder must have class_token=False (I-JEPA's encoder has no [CLS]); "
                              "build it with mmjax.models.ijepa.ijepa_encoder(...)")
        if e.num_classes or e.representation:
            raise ConfigError("IJepaConfig.encoder must be a feature encoder (num_classes=0, representation=None)")
        for name in ("predictor_dim", "predictor_layers", "predictor_heads", "predictor_mlp_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"IJepaConfig.{name} must be positive, got {getattr(self, name)}")
        if self.predictor_dim % self.predictor_heads or self.predictor_dim % 4:
            raise ConfigError(f"IJepaConfig.predictor_dim={self.predictor_dim} must be divisible by "
                              f"predictor_heads={self.predictor_heads} and by 4 (sin-cos positions)")

    @classmethod
    def from_variant(cls, name: str, **overrides) -> "IJepaConfig":
        if name not in VARIANTS:
            raise ConfigError(f"unknown I-JEPA variant {name!r}{configs.closest_name(name, VARIANTS)}; "
                              f"known: {', '.join(VARIANTS)}")
        v = dict(VARIANTS[name])
        enc = ijepa_encoder(**{**v.pop("encoder"), **overrides.pop("encoder", {})})
        return cls(encoder=enc, **{**v, **overrides})

    @property
    def predictor_vit(self) -> ViTConfig:
        """The predictor's blocks as a ViTConfig (same block as the encoder, its own width)."""
        e = self.encoder
        return ViTConfig(image_size=e.image_size, patch_size=e.patch_size, channels=e.channels,
                         dim=self.predictor_dim, num_layers=self.predictor_layers,
                         num_heads=self.predictor_heads, mlp_dim=self.predictor_mlp_dim, pool="gap",
                         class_token=False, posemb="sincos2d", norm_eps=e.norm_eps, activation=e.activation,
                         qkv_bias=True, initializer_range=e.initializer_range, dtype=e.dtype,
                         param_dtype=e.param_dtype, implementation=e.implementation)


def _check_indices(name: str, idx: jax.Array, ndim: int, batch: int, num_patches: int) -> None:
    if idx.ndim != ndim or not jnp.issubdtype(idx.dtype, jnp.integer):
        raise InputError(f"{name} must be {'[B, K]' if ndim == 2 else '[T, B, K]'} integer patch indices, "
                         f"got shape {tuple(idx.shape)} dtype {idx.dtype}")
    if idx.shape[ndim - 2] != batch:
        raise InputError(f"{name} has batch {idx.shape[ndim - 2]}, the images {batch}")
    if not isinstance(idx, jax.core.Tracer):  # concrete: checked on the host (numpy, so that it
        # also works inside jax.eval_shape, where jnp ops on a constant return tracers)
        lo, hi = int(np.min(np.asarray(idx))), int(np.max(np.asarray(idx)))
        if lo < 0 or hi >= num_patches:
            raise InputError(f"{name} holds patch index {lo if lo < 0 else hi}, outside [0, {num_patches})")


class Predictor(nn.Module):
    config: IJepaConfig

    @nn.compact
    def __call__(self, context: jax.Array, context_idx: jax.Array, target_idx: jax.Array,
                 context_valid: jax.Array | None = None, target_valid: jax.Array | None = None) -> jax.Array:
        c, pc = self.config, self.config.predictor_vit
        dtype, pdtype = jnp.dtype(pc.dtype), jnp.dtype(pc.param_dtype)
        init = nn.initializers.normal(pc.initializer_range)
        pos = jnp.asarray(sincos2d_positions(*c.encoder.grid, c.predictor_dim), dtype)  # [N, Dp]
        x = DenseGeneral(c.predictor_dim, ("embed", "mlp"), use_bias=True, dtype=dtype, param_dtype=pdtype,
                         kernel_init=init, name="embed")(context)
        x = x + pos[context_idx]  # [B, Kc, Dp]
        mask_token = self.param("mask_token", nn.with_logical_partitioning(init, ("mlp",)),
                                (c.predictor_dim,), pdtype)
        queries = mask_token.astype(dtype) + pos[target_idx]  # [T, B, Kt, Dp]
        t, b, kt, _ = queries.shape
        kc = x.shape[1]
        x = jnp.concatenate([jnp.broadcast_to(x[None], (t, *x.shape)), queries], axis=2)
        x = x.reshape(t * b, kc + kt, c.predictor_dim)
        mask = None
        if context_valid is not None or target_valid is not None:
            cv = jnp.ones((b, kc), bool) if context_valid is None else context_valid.astype(bool)
            tv = jnp.ones((t, b, kt), bool) if target_valid is None else target_valid.astype(bool)
            keys = jnp.concatenate([jnp.broadcast_to(cv[None], (t, b, kc)), tv], axis=2)
            mask = keys.reshape(t * b, 1, 1, kc + kt)  # padding is never attended to
        layers = make_layers(vit_block_spec(pc), pc.num_layers)
        x, _, _ = run_layers(layers, x, mask=mask)
        x = LayerNorm(pc.norm_eps, dtype=dtype, param_dtype=pdtype, name="norm")(x)[:, kc:]
        out = DenseGeneral(c.encoder.dim, ("mlp", "embed"), use_bias=True, dtype=dtype, param_dtype=pdtype,
                           kernel_init=init, name="proj")(x)
        return out.reshape(t, b, kt, c.encoder.dim).astype(jnp.float32)


class IJepa(nn.Module):
    config: IJepaConfig

    def setup(self):
        self.encoder = ViT(self.config.encoder)
        self.predictor = Predictor(self.config)

    def __call__(self, images: jax.Array, context_idx: jax.Array, target_idx: jax.Array,
                 context_valid: jax.Array | None = None, target_valid: jax.Array | None = None) -> dict[str, Any]:
        """{"context": [B, Kc, D] encoder tokens of the context patches,
        "predictions": [T, B, Kt, D] the predictor's output at each target block's patches}.
        `context_valid` [B, Kc] / `target_valid` [T, B, Kt] (bool) mark padded index lists
        (`sample_multiblock(pad=True)`): padding is never attended to; its outputs are garbage
        to be masked out of the loss (`ijepa_loss(mask=target_valid)`)."""
        n = self.config.encoder.num_patches
        _check_indices("context_idx", context_idx, 2, images.shape[0], n)
        _check_indices("target_idx", target_idx, 3, images.shape[0], n)
        _, inter = self.encoder(images, keep=context_idx, keep_valid=context_valid, return_intermediates=True)
        context = inter["final_hidden"]
        return {"context": context,
                "predictions": self.predictor(context, context_idx, target_idx, context_valid, target_valid)}

    def targets(self, images: jax.Array, target_idx: jax.Array) -> jax.Array:
        """[T, B, Kt, D]: LayerNorm (no affine) of the encoder's tokens on the full image, gathered
        at each target block (apply with the target encoder's EMA params)."""
        _check_indices("target_idx", target_idx, 3, images.shape[0], self.config.encoder.num_patches)
        _, inter = self.encoder(images, return_intermediates=True)
        h = inter["final_hidden"].astype(jnp.float32)
        mean = h.mean(-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(((h - mean) ** 2).mean(-1, keepdims=True) + self.config.target_norm_eps)
        b = h.shape[0]
        return jax.vmap(lambda idx: h[jnp.arange(b)[:, None], idx])(target_idx)

    def features(self, images: jax.Array) -> jax.Array:
        """[B, D] average-pooled encoder features of the full image (for linear probes)."""
        return self.encoder(images)


def example_inputs(config: IJepaConfig) -> tuple:
    h, w = config.encoder.image_hw
    n = config.encoder.num_patches
    return (jnp.zeros((1, h, w, config.encoder.channels), jnp.float32), jnp.arange(n - 1, dtype=jnp.int32)[None],
            jnp.full((1, 1, 1), n - 1, jnp.int32))


def encoder_with_position_table(encoder: ViTConfig, params: Any) -> tuple[ViTConfig, Any]:
    """The same encoder with its fixed sin-cos positions stored as a learned table (what
    transformers' `IJepaModel` holds, `position_embeddings`): equal outputs, exportable."""
    if encoder.posemb != "sincos2d":
        return encoder, params
    table = sincos2d_positions(*encoder.grid, encoder.dim).astype(np.float32)
    return encoder.replace(posemb="learned"), {**params, "pos_embedding": {"embedding": table}}


def export_parts(config: IJepaConfig, params: Any, task_state: Any) -> dict[str, tuple[str, Any, Any]]:
    """A workdir's two encoders as "vit" models in I-JEPA's layout (exported as `IJepaModel`):
    "target" (the EMA encoder of the task state; what the paper evaluates and releases) and
    "context" (the online encoder in the params)."""
    parts = {}
    if task_state is not None and "target" in task_state:
        parts["target"] = ("vit", *encoder_with_position_table(config.encoder, task_state["target"]))
    parts["context"] = ("vit", *encoder_with_position_table(config.encoder, params["encoder"]))
    return parts


FAMILIES = (Family("ijepa", IJepaConfig, IJepa, example_inputs,
                   "I-JEPA: context encoder (ViT), predictor, EMA target encoder (mmjax.ops.jepa_losses)",
                   tasks=("ijepa",), export_parts=export_parts),)
