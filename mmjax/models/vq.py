"""VQ-VAE / VQGAN-style image tokenizer (van den Oord et al. 2017; Esser et al. 2021 without the
perceptual and adversarial losses): a conv encoder downsamples by `downsample`, each latent
vector is replaced by its nearest code of a learnt codebook (straight-through gradient), a conv
decoder reconstructs the image. Images <-> a grid of token ids, what LVM-style models read.

    config = VQConfig(image_size=16, channels=1, downsample=4, codebook_size=64, codebook_dim=16)
    model = VQModel(config)
    params = model.init(rng, images)["params"]                       # images [B, H, W, C]
    out = model.apply({"params": params}, images)                    # named intermediates:
    out["reconstruction"]   # [B, H, W, C]
    out["z"], out["quantized"]  # [B, h, w, D] encoder output, its quantisation (straight-through)
    out["ids"]              # [B, h, w] int32 token ids, h = H / downsample
    out["codebook_loss"], out["commitment_loss"], out["perplexity"], out["usage"]
    ids = model.apply({"params": params}, images, method=VQModel.encode)        # [B, h, w]
    images = model.apply({"params": params}, ids, method=VQModel.decode_ids)    # [B, H, W, C]

The objective (reconstruction + codebook + beta * commitment, the taming `legacy` weighting
note, EMA codebook updates, dead-code restart) lives in `mmjax.ops.vq_losses`; the training
task in `mmjax.tasks.vq`.

* **Encoder**: conv 3x3 to `hidden_dim`, then log2(downsample) stride-2 4x4 convs (ReLU), then
  `num_res_blocks` residual blocks (ReLU, conv 3x3 to `res_dim`, ReLU, conv 1x1 back; the VQ-VAE
  paper's), ReLU, conv 1x1 to `codebook_dim`.
* **Quantizer**: codebook [codebook_size, codebook_dim] (uniform(-1/K, 1/K) init as taming's),
  nearest code by squared distance, straight-through estimator z + sg[z_q - z].
* **Decoder**: conv 3x3 from `codebook_dim` to `hidden_dim`, the residual blocks, ReLU, then
  log2(downsample) stride-2 4x4 transposed convs (ReLU between), conv 3x3 to `channels`.

Params carry logical axis names: conv kernels (None, None, "embed", "mlp"), biases ("mlp",),
the codebook ("vocab", "embed"). Param tree: encoder/{conv_in, down_i, res_i/{conv1, conv2},
conv_out}, quantizer/codebook, decoder/{conv_in, res_i/..., up_i, conv_out}.
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
from mmjax.ops import vq_losses

VARIANTS = {
    # 16x16 one-channel digits -> 4x4 tokens of 64 codes (experiments/vq_digits.py)
    "digits": dict(image_size=16, channels=1, downsample=4, hidden_dim=64, res_dim=32, num_res_blocks=1,
                   codebook_size=64, codebook_dim=16),
    # the smallest sensible model, for tests
    "tiny": dict(image_size=8, channels=1, downsample=2, hidden_dim=8, res_dim=4, num_res_blocks=1,
                 codebook_size=8, codebook_dim=4),
}


@dataclasses.dataclass(frozen=True)
class VQConfig(configs.Config):
    NAME = "VQ"
    VARIANTS = VARIANTS

    image_size: int | tuple[int, int] = 16
    channels: int = 1
    downsample: int = 4  # a power of 2: log2(downsample) stride-2 convs; tokens per side = size / downsample
    hidden_dim: int = 64
    res_dim: int = 32
    num_res_blocks: int = 1
    codebook_size: int = 64
    codebook_dim: int = 16
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        size = self.image_size
        if isinstance(size, list):
            size = tuple(size)
            object.__setattr__(self, "image_size", size)
        hw = (size, size) if isinstance(size, int) else tuple(size)
        if len(hw) != 2 or any(not isinstance(s, int) or s <= 0 for s in hw):
            raise ConfigError(f"VQConfig.image_size must be a positive int or (height, width), got {size!r}")
        d = self.downsample
        if not isinstance(d, int) or d < 1 or d & (d - 1):
            raise ConfigError(f"VQConfig.downsample must be a power of 2 (1, 2, 4, 8, ...: one stride-2 conv "
                              f"per factor 2), got {d!r}")
        if hw[0] % d or hw[1] % d:
            raise ConfigError(f"VQConfig.image_size {hw[0]}x{hw[1]} is not divisible by downsample={d}; "
                              f"use a size that is a multiple of {d} or a smaller downsample")
        if self.codebook_size < 2:
            raise ConfigError(f"VQConfig.codebook_size must be >= 2 (one code carries no information), "
                              f"got {self.codebook_size}")
        for name in ("channels", "hidden_dim", "res_dim", "codebook_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"VQConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_res_blocks < 0:
            raise ConfigError(f"VQConfig.num_res_blocks must be >= 0, got {self.num_res_blocks}")
        self.check_dtypes("dtype", "param_dtype")

    @property
    def image_hw(self) -> tuple[int, int]:
        s = self.image_size
        return (s, s) if isinstance(s, int) else tuple(s)

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid (h, w) of an image of the config's size."""
        h, w = self.image_hw
        return h // self.downsample, w // self.downsample

    @property
    def num_downsamples(self) -> int:
        return self.downsample.bit_length() - 1


def _kernel_init():
    return nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, "embed", "mlp"))


def _bias_init():
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",))


def _conv(features: int, kernel: int, stride: int, c: VQConfig, name: str) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=(kernel - stride + 1) // 2
                   if stride > 1 else "SAME", dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype),
                   kernel_init=_kernel_init(), bias_init=_bias_init(), name=name)


class ResBlock(nn.Module):
    config: VQConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        h = _conv(c.res_dim, 3, 1, c, "conv1")(nn.relu(x))
        return x + _conv(c.hidden_dim, 1, 1, c, "conv2")(nn.relu(h))


class Encoder(nn.Module):
    config: VQConfig

    @nn.compact
    def __call__(self, images):
        c = self.config
        x = _conv(c.hidden_dim, 3, 1, c, "conv_in")(images.astype(jnp.dtype(c.dtype)))
        for i in range(c.num_downsamples):
            x = nn.relu(_conv(c.hidden_dim, 4, 2, c, f"down_{i}")(x))
        for i in range(c.num_res_blocks):
            x = ResBlock(c, name=f"res_{i}")(x)
        return _conv(c.codebook_dim, 1, 1, c, "conv_out")(nn.relu(x))


class Decoder(nn.Module):
    config: VQConfig

    @nn.compact
    def __call__(self, z):
        c = self.config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        x = _conv(c.hidden_dim, 3, 1, c, "conv_in")(z.astype(dt))
        for i in range(c.num_res_blocks):
            x = ResBlock(c, name=f"res_{i}")(x)
        x = nn.relu(x)
        for i in range(c.num_downsamples):
            x = nn.ConvTranspose(c.hidden_dim, (4, 4), strides=(2, 2), padding="SAME", dtype=dt, param_dtype=pdt,
                                 kernel_init=_kernel_init(), bias_init=_bias_init(), name=f"up_{i}")(x)
            x = nn.relu(x)
        return _conv(c.channels, 3, 1, c, "conv_out")(x)


class Quantizer(nn.Module):
    config: VQConfig

    def setup(self):
        k = self.config.codebook_size
        init = nn.initializers.uniform(scale=2.0 / k)  # U(0, 2/K), shifted to U(-1/K, 1/K) below
        self.codebook = self.param("codebook", nn.with_logical_partitioning(
            lambda rng, shape, dtype: init(rng, shape, dtype) - 1.0 / k, ("vocab", "embed")),
            (k, self.config.codebook_dim), jnp.dtype(self.config.param_dtype))

    def __call__(self, z):
        ids = vq_losses.nearest_codes(z, self.codebook)
        return ids, self.lookup(ids).astype(z.dtype)

    def lookup(self, ids):
        return jnp.take(self.codebook, ids, axis=0)


class VQModel(nn.Module):
    """See the module docstring."""

    config: VQConfig

    def setup(self):
        self.encoder = Encoder(self.config)
        self.quantizer = Quantizer(self.config)
        self.decoder = Decoder(self.config)

    def _check_images(self, images) -> None:
        c = self.config
        if images.ndim != 4:
            raise InputError(f"VQModel: images must be [batch, height, width, channels], got shape "
                             f"{tuple(images.shape)}")
        _, h, w, ch = images.shape
        if ch != c.channels:
            raise InputError(f"VQModel: images have {ch} channels, the model takes {c.channels}")
        if h % c.downsample or w % c.downsample:
            raise InputError(f"VQModel: image size {h}x{w} is not divisible by downsample={c.downsample}")

    def __call__(self, images: jax.Array) -> dict[str, Any]:
        """Named intermediates (module docstring); `quantized` is the straight-through value the
        decoder reads, so the reconstruction's gradient reaches the encoder."""
        self._check_images(images)
        z = self.encoder(images)
        ids, z_q = self.quantizer(z)
        terms = vq_losses.vq_terms(z, z_q)
        quantized = vq_losses.straight_through(z, z_q)
        counts = vq_losses.code_counts(ids, self.config.codebook_size)
        return {"reconstruction": self.decoder(quantized), "z": z, "quantized": quantized, "ids": ids,
                "codebook_loss": terms["codebook_loss"], "commitment_loss": terms["commitment_loss"],
                "perplexity": vq_losses.codebook_perplexity(counts), "usage": vq_losses.codebook_usage(counts)}

    def encode(self, images: jax.Array) -> jax.Array:
        """Token ids [B, h, w] (int32)."""
        self._check_images(images)
        return self.quantizer(self.encoder(images))[0]

    def decode(self, quantized: jax.Array) -> jax.Array:
        """Images from (quantized) latents [B, h, w, codebook_dim]."""
        return self.decoder(quantized)

    def decode_ids(self, ids: jax.Array) -> jax.Array:
        """Images [B, H, W, C] from token ids [B, h, w]. Concrete ids outside [0, codebook_size)
        are an InputError; under jit they cannot be checked (jnp.take clamps them)."""
        k = self.config.codebook_size
        if ids.ndim != 3 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise InputError(f"VQModel.decode_ids: ids must be [batch, h, w] integers, got shape "
                             f"{tuple(ids.shape)} dtype {ids.dtype}")
        if not isinstance(ids, jax.core.Tracer) and ids.size:
            values = np.asarray(ids)  # on the host (a jnp op would be staged inside eval_shape)
            lo, hi = int(values.min()), int(values.max())
            if lo < 0 or hi >= k:
                raise InputError(f"VQModel.decode_ids: token id {lo if lo < 0 else hi} is outside the codebook "
                                 f"[0, {k}) (codebook_size={k})")
        return self.decoder(self.quantizer.lookup(ids))


def example_inputs(config: VQConfig) -> tuple:
    h, w = config.image_hw
    return (jnp.zeros((1, h, w, config.channels), jnp.float32),)


FAMILIES = (Family("vq", VQConfig, VQModel, example_inputs,
                   "VQ-VAE / VQGAN-style image tokenizer (conv encoder, codebook, conv decoder)",
                   tasks=("vq",)),)
