"""AIM (El-Nouby et al. 2024, "Scalable Pre-training of Large Autoregressive Image Models",
apple/ml-aim): a prefix-causal ViT that predicts the next image patch's (normalised) pixels.

    config = AIMConfig.from_variant("tiny")
    model = AIM(config)
    params = model.init(rng, images, prefix_len)["params"]       # images [B, H, W, C] (NHWC)
    out = model.apply({"params": params}, images, prefix_len)    # prefix_len [B] int
    out["predictions"]   # [B, N, ph*pw*C]: position i predicts patch i + 1 (raster order)
    loss = aim_loss(out["predictions"], aim_targets(images, config.trunk.patch_hw), prefix_len)
    feats = model.apply({"params": params}, images)              # prefix_len=None: bidirectional
    feats["features"]    # [B, N, dim] final-normed tokens (what the probes read)

* **Trunk** (`trunk`): a ViT without [CLS] (`aim_trunk(...)`: fixed 2-D sin-cos positions,
  pre-norm blocks, `mmjax.nn.transformer` via `vit_block_spec`), param names identical to
  `mmjax.models.vit.ViT`'s (`patch_embed`, `layers_{i}`, `final_norm`): `params["trunk"]` loads
  into `ViT(config.trunk)` unchanged, which then gives the bidirectional features (tested equal).
* **Prefix-causal attention**: with `prefix_len` [B] (K per image), the first K patches in raster
  order attend to each other bidirectionally, every later patch causally (itself and all before
  it). The mask is `mmjax.ops.masks.prefix_lm_mask` (= `make_attention_mask(input_mask,
  mask_ar)` with mask_ar 0 on the prefix, 1 after). K is drawn uniformly per image in [1, N-1]
  at training (the paper's; the task draws it, `mmjax.tasks.aim`); K = 0 is a plain causal
  trunk (the paper's ablation). The loss covers only the non-prefix patches
  (`mmjax.ops.aim_losses.aim_loss`).
* **Head** (`head`): the paper's MLP prediction head, applied to each token independently:
  Linear dim -> `head_width`, `head_blocks` residual blocks x + MLP(LN(x)), LN, Linear to the
  ph*pw*C pixels of a patch. The head is dropped after pretraining.
* **Targets**: per-patch normalised pixels (MAE's: patch minus its mean, divided by
  sqrt(var + 1e-6)), in `mmjax.ops.aim_losses`, apart from the model.

**Inference / probing: bidirectional.** The paper's point of prefix attention is that the
trunk, trained with a bidirectional prefix, can drop the causal mask downstream; ml-aim's
released trunks are probed with full bidirectional attention. So `prefix_len=None` (what
`AIM.features` and the probes use) runs the trunk with no mask, every patch seeing every patch;
`prefix_len` given runs the training mask. The probes read the last block's final-normed
tokens (AIM's own probes average several mid-to-late blocks' tokens, ml-aim `AverageLayers`;
`hidden_states` is there for that).

Outputs (a dict): `predictions` [B, N, P] float32, `features` [B, N, dim] (final-normed tokens),
`pooled` [B, dim] (their mean), `mask` (the [B, 1, N, N] bool attention mask used, None when
bidirectional), with `return_intermediates=True` also `hidden_states` (the trunk's input and
every block's output, num_layers + 1 arrays [B, N, dim]).

Param tree: trunk/{patch_embed, layers_{i}/..., final_norm}, head/{embed, blocks_{i}_norm,
blocks_{i}_mlp/{fc1, fc2}, norm, out}. Every param carries logical axis names.

`AttentiveProbe` (for evaluation on frozen features): mmjax's attention-pooling head
(`mmjax.models.vit.MAPHead`, big_vision's MAP head: one learned query attends over the tokens,
then + MLP(LN)) and a Linear classifier. ml-aim's `AttentionPoolingClassifier` differs in
detail (BatchNorm without affine on the features, no query projection, no MLP); here the
features are standardised per channel with the probe's training statistics instead of BN.
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
from mmjax.models.vit import MAPHead, PatchEmbed, ViTConfig, check_images, sincos2d_positions, vit_block_spec
from mmjax.nn.linear import DenseGeneral
from mmjax.nn.mlp import MLP
from mmjax.nn.norms import LayerNorm
from mmjax.nn.partitioning import BATCH_LEN_EMBED, constrain
from mmjax.nn.transformer import make_layers, run_layers
from mmjax.ops.masks import prefix_lm_mask


def aim_trunk(**kw) -> ViTConfig:
    """A ViTConfig in AIM's layout (no [CLS], fixed 2-D sin-cos positions, mean pooling) + `kw`."""
    return ViTConfig(**{"pool": "gap", "class_token": False, "posemb": "sincos2d", "norm_eps": 1e-6, **kw})


VARIANTS = {
    # AIM-0.6B (the paper's smallest): ViT-H/14 trunk 1536 x 24, head 8 blocks of width 2048 at 224 px
    "600M": dict(trunk=dict(image_size=224, patch_size=14, dim=1536, num_layers=24, num_heads=12,
                            mlp_dim=6144),
                 head_width=2048, head_blocks=8, head_mlp_dim=8192),
    "tiny": dict(trunk=dict(image_size=32, patch_size=4, dim=64, num_layers=2, num_heads=4, mlp_dim=128),
                 head_width=64, head_blocks=2, head_mlp_dim=128),
}


@dataclasses.dataclass(frozen=True)
class AIMConfig(configs.Config):
    trunk: ViTConfig = dataclasses.field(default_factory=lambda: aim_trunk(**VARIANTS["tiny"]["trunk"]))
    head_width: int = 64  # width of the MLP prediction head
    head_blocks: int = 2  # residual MLP blocks in the head
    head_mlp_dim: int = 128  # hidden width of each head block

    def __post_init__(self):
        if isinstance(self.trunk, dict):
            object.__setattr__(self, "trunk", ViTConfig.from_dict(self.trunk))
        t = self.trunk
        if t.class_token:
            raise ConfigError("AIMConfig.trunk must have class_token=False (AIM's trunk has no [CLS]); build it "
                              "with mmjax.models.aim.aim_trunk(...)")
        if t.num_classes or t.representation:
            raise ConfigError("AIMConfig.trunk must be a feature encoder (num_classes=0, representation=None)")
        if t.posemb != "sincos2d":
            raise ConfigError(f"AIMConfig.trunk.posemb must be 'sincos2d' (AIM's fixed positions), got {t.posemb!r}")
        if t.num_patches < 2:
            raise ConfigError(f"AIMConfig.trunk: {t.num_patches} patch(es) -- autoregression needs at least 2 "
                              f"(image_size {t.image_hw}, patch_size {t.patch_hw})")
        for name in ("head_width", "head_blocks", "head_mlp_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"AIMConfig.{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_variant(cls, name: str, **overrides) -> "AIMConfig":
        if name not in VARIANTS:
            raise ConfigError(f"unknown AIM variant {name!r}{configs.closest_name(name, VARIANTS)}; "
                              f"known: {', '.join(VARIANTS)}")
        v = dict(VARIANTS[name])
        trunk = aim_trunk(**{**v.pop("trunk"), **overrides.pop("trunk", {})})
        return cls(trunk=trunk, **{**v, **overrides})

    @property
    def num_patches(self) -> int:
        return self.trunk.num_patches

    @property
    def patch_pixels(self) -> int:
        ph, pw = self.trunk.patch_hw
        return ph * pw * self.trunk.channels


def check_prefix_len(prefix_len: Any, batch: int, num_patches: int) -> None:
    """InputError unless `prefix_len` is [batch] integers in [0, num_patches - 1] (values are
    checked when concrete; under jit they cannot be)."""
    shape = tuple(getattr(prefix_len, "shape", ()))
    dtype = getattr(prefix_len, "dtype", None)
    if shape != (batch,) or dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise InputError(f"AIM: prefix_len must be [batch={batch}] integers (prefix length per image), got "
                         f"shape {shape} dtype {dtype}")
    if not isinstance(prefix_len, jax.core.Tracer):
        values = np.asarray(prefix_len)  # on the host: a jnp op here would be staged (a tracer)
        lo, hi = int(values.min()), int(values.max())  # inside jax.eval_shape
        if lo < 0 or hi > num_patches - 1:
            raise InputError(f"AIM: prefix_len {lo if lo < 0 else hi} is outside [0, {num_patches - 1}] "
                             f"(num_patches={num_patches}: at least one patch must follow the prefix)")


class AIMTrunk(nn.Module):
    """The ViT trunk with an optional attention mask; param names as `mmjax.models.vit.ViT`."""

    config: ViTConfig

    @nn.compact
    def __call__(self, images: jax.Array, mask: jax.Array | None = None, keep_hidden: bool = False):
        c = self.config
        dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        init = nn.initializers.normal(c.initializer_range)
        x = PatchEmbed(c.dim, c.patch_hw, c.patch_bias, c.patch_embed, dtype, pdtype, init, name="patch_embed")(images)
        x = x + jnp.asarray(sincos2d_positions(*c.grid, c.dim), dtype)[None]
        if c.pre_norm:
            x = LayerNorm(c.norm_eps, dtype=dtype, param_dtype=pdtype, name="pre_norm")(x)
        x = constrain(x, BATCH_LEN_EMBED)
        layers = make_layers(vit_block_spec(c), c.num_layers, scan=c.scan_layers,
                             remat=c.remat_policy if c.remat else "none")
        embedded = x
        x, hidden, _ = run_layers(layers, x, mask=mask, keep_hidden=keep_hidden)
        encoded = LayerNorm(c.norm_eps, dtype=dtype, param_dtype=pdtype, name="final_norm")(x)
        return encoded, (embedded,) + tuple(hidden)


class PredictionHead(nn.Module):
    """AIM's MLP head, per token: Linear -> blocks of x + MLP(LN(x)) -> LN -> Linear to pixels."""

    config: AIMConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, t = self.config, self.config.trunk
        dtype, pdtype = jnp.dtype(t.dtype), jnp.dtype(t.param_dtype)
        init = nn.initializers.normal(t.initializer_range)
        h = DenseGeneral(c.head_width, ("embed", "mlp"), use_bias=True, dtype=dtype, param_dtype=pdtype,
                         kernel_init=init, name="embed")(x)
        for i in range(c.head_blocks):
            y = LayerNorm(t.norm_eps, dtype=dtype, param_dtype=pdtype, name=f"blocks_{i}_norm")(h)
            h = h + MLP(c.head_mlp_dim, t.activation, True, dtype, pdtype, init, name=f"blocks_{i}_mlp")(y)
        h = LayerNorm(t.norm_eps, dtype=dtype, param_dtype=pdtype, name="norm")(h)
        out = DenseGeneral(c.patch_pixels, ("mlp", "patch"), use_bias=True, dtype=dtype, param_dtype=pdtype,
                           kernel_init=init, name="out")(h)
        return out.astype(jnp.float32)


class AIM(nn.Module):
    config: AIMConfig

    def setup(self):
        self.trunk = AIMTrunk(self.config.trunk)
        self.head = PredictionHead(self.config)

    def __call__(self, images: jax.Array, prefix_len: jax.Array | None = None, *,
                 return_intermediates: bool = False) -> dict[str, Any]:
        """See the module docstring. `prefix_len` [B] int in [0, N-1], or None (bidirectional)."""
        t = self.config.trunk
        check_images(images, t, who="AIM")
        b, n = images.shape[0], t.num_patches
        mask = None
        if prefix_len is not None:
            check_prefix_len(prefix_len, b, n)
            mask = prefix_lm_mask(jnp.ones((b, n), bool), prefix_len)
        features, hidden = self.trunk(images, mask, keep_hidden=return_intermediates)
        out = {"predictions": self.head(features), "features": features,
               "pooled": jnp.mean(features.astype(jnp.float32), axis=1), "mask": mask}
        if return_intermediates:
            out["hidden_states"] = hidden
        return out

    def features(self, images: jax.Array) -> jax.Array:
        """[B, N, dim]: the bidirectional trunk's final-normed tokens (for the probes)."""
        check_images(images, self.config.trunk, who="AIM")
        return self.trunk(images)[0]


class AttentiveProbe(nn.Module):
    """[B, N, dim] frozen tokens -> [B, num_classes] logits: `MAPHead` attention pooling + Linear."""

    num_classes: int
    num_heads: int = 4
    mlp_dim: int = 256

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        pooled = MAPHead(self.num_heads, self.mlp_dim, name="map_head")(tokens)
        return DenseGeneral(self.num_classes, ("embed", "vocab"), use_bias=True, name="classifier")(pooled)


def example_inputs(config: AIMConfig) -> tuple:
    h, w = config.trunk.image_hw
    return (jnp.zeros((1, h, w, config.trunk.channels), jnp.float32), jnp.ones((1,), jnp.int32))


FAMILIES = (Family("aim", AIMConfig, AIM, example_inputs,
                   "AIM: prefix-causal ViT predicting normalised next patches (mmjax.ops.aim_losses)",
                   tasks=("aim",)),)
