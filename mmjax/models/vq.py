"""VQ-VAE / VQGAN-style image tokenizer (van den Oord et al. 2017; Esser et al. 2021, with its
optional PatchGAN discriminator): a conv encoder downsamples by `downsample`, each latent
vector is replaced by its nearest code of a learnt codebook (straight-through gradient), a conv
decoder reconstructs the image. Images <-> a grid of token ids, what LVM-style models read.

    config = VQConfig(image_size=16, channels=1, downsample=4, codebook_size=64, codebook_dim=16)
    model = VQModel(config)
    params = model.init(rng, images)["params"]                       # images [B, H, W, C]
    out = model.apply({"params": params}, images)                    # named intermediates:
    out["reconstruction"]   # [B, H, W, C]
    out["decoder_hidden"]   # [B, H, W, hidden_dim]: the decoder's last layer's input
    out["z"], out["quantized"]  # [B, h, w, D] encoder output, its quantisation (straight-through)
    out["ids"]              # [B, h, w] int32 token ids, h = H / downsample
    out["codebook_loss"], out["commitment_loss"], out["perplexity"], out["usage"]
    ids = model.apply({"params": params}, images, method=VQModel.encode)        # [B, h, w]
    images = model.apply({"params": params}, ids, method=VQModel.decode_ids)    # [B, H, W, C]
    logits = model.apply({"params": params}, images, method=VQModel.discriminate)  # [B, h', w', 1]
                                                     # (only with discriminator_layers > 0)

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

* **Discriminator** (`discriminator_layers` = n > 0; VQGAN's adversarial loss, training only):
  `PatchDiscriminator`, taming's `NLayerDiscriminator` -- n stride-2 4x4 convs, a stride-1 4x4
  conv, LeakyReLU 0.2, a batch-statistics norm after every conv but the first and last, a last
  conv to one channel of patch logits. `__call__` creates its params at init and never runs it
  otherwise; `encode` / `decode_ids` never read it. Losses: `mmjax.ops.vq_losses` (hinge /
  vanilla, adaptive weight), training: `mmjax.tasks.vq`.

Params carry logical axis names: conv kernels (None, None, "embed", "mlp"), biases ("mlp",),
the codebook ("vocab", "embed"), the discriminator's norm scales / biases ("norm",). Param tree:
encoder/{conv_in, down_i, res_i/{conv1, conv2}, conv_out}, quantizer/codebook,
decoder/{conv_in, res_i/..., up_i, conv_out}, and with a discriminator
discriminator/{conv_0, conv_i, norm_i, conv_out}.
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
    # PatchGAN discriminator for VQGAN's adversarial loss (training only; 0 = none, the default).
    # Its params live under params["discriminator"]; encode / decode_ids never read them.
    discriminator_layers: int = 0  # stride-2 convs (taming's n_layers, 3 there)
    discriminator_width: int = 64  # channels of the first conv (taming's ndf), x2 per layer up to x8
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
        n = self.discriminator_layers
        if not isinstance(n, int) or n < 0:
            raise ConfigError(f"VQConfig.discriminator_layers must be an int >= 0 (0 = no discriminator), got {n!r}")
        if n:
            if self.discriminator_width <= 0:
                raise ConfigError(f"VQConfig.discriminator_width must be positive, got {self.discriminator_width}")
            side = min(hw) // 2 ** n - 2
            if side < 1:
                best = max((k for k in range(1, n) if min(hw) // 2 ** k - 2 >= 1), default=0)
                raise ConfigError(f"VQConfig.discriminator_layers={n}: {hw[0]}x{hw[1]} images leave no patch "
                                  f"logits (size / 2^layers - 2 = {side}); use discriminator_layers <= {best}"
                                  + (" (the images are too small for a discriminator)" if not best else ""))
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

    @property
    def patch_grid(self) -> tuple[int, int]:
        """The discriminator's logit grid (h, w): each side / 2^layers - 2."""
        h, w = self.image_hw
        n = self.discriminator_layers
        return h // 2 ** n - 2, w // 2 ** n - 2


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


def decoder_output_layer(config: VQConfig) -> nn.Conv:
    """The decoder's last layer (conv 3x3 to `channels`, params decoder/conv_out): the layer at
    which VQGAN's adaptive weight compares gradient norms. Applied alone as
    `decoder_output_layer(c).apply({"params": params["decoder"]["conv_out"]}, out["decoder_hidden"])`
    it gives `out["reconstruction"]`."""
    return _conv(config.channels, 3, 1, config, "conv_out")


class Decoder(nn.Module):
    """(reconstruction [B, H, W, C], hidden [B, H, W, hidden_dim]: the last layer's input)."""

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
        return decoder_output_layer(c)(x), x


class BatchStatNorm(nn.Module):
    """Per-channel normalisation by the statistics of the batch it is given (mean and variance over
    batch and space), then a learnt scale and bias: taming's BatchNorm2d as it acts in training.
    No running averages: the discriminator is only used in training."""

    config: VQConfig
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        c = self.config
        pdt = jnp.dtype(c.param_dtype)
        ch = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(
            lambda rng, shape, dtype: 1.0 + 0.02 * jax.random.normal(rng, shape, dtype), ("norm",)), (ch,), pdt)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)), (ch,), pdt)
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(xf - mean), axis=(0, 1, 2))
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
        return y.astype(x.dtype)


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017) as VQGAN's `NLayerDiscriminator` (taming
    `modules/discriminator/model.py`): conv 4x4 stride 2 (`width`), LeakyReLU 0.2; then
    `layers - 1` convs 4x4 stride 2 to width * min(2^i, 8), each with a norm and LeakyReLU 0.2;
    a conv 4x4 stride 1 to width * min(2^layers, 8), norm, LeakyReLU; a conv 4x4 stride 1 to one
    channel: patch logits [B, H / 2^layers - 2, W / 2^layers - 2, 1]. Padding 1, N(0, 0.02)
    kernels, no conv bias before a norm, as taming. Params: conv_0, conv_i + norm_i, conv_out."""

    config: VQConfig

    @nn.compact
    def __call__(self, images):
        c = self.config
        n, ndf = c.discriminator_layers, c.discriminator_width
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)

        def conv(features, stride, bias, name):
            return nn.Conv(features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)), use_bias=bias,
                           dtype=dt, param_dtype=pdt, name=name, bias_init=_bias_init(),
                           kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                    (None, None, "embed", "mlp")))

        x = nn.leaky_relu(conv(ndf, 2, True, "conv_0")(images.astype(dt)), 0.2)
        for i in range(1, n + 1):
            x = conv(ndf * min(2 ** i, 8), 2 if i < n else 1, False, f"conv_{i}")(x)
            x = nn.leaky_relu(BatchStatNorm(c, name=f"norm_{i}")(x), 0.2)
        return conv(1, 1, True, "conv_out")(x)


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
        if self.config.discriminator_layers:
            self.discriminator = PatchDiscriminator(self.config)

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
        reconstruction, hidden = self.decoder(quantized)
        if self.config.discriminator_layers and self.is_initializing():
            self.discriminator(reconstruction)  # create its params (training reads them via `discriminate`)
        return {"reconstruction": reconstruction, "decoder_hidden": hidden, "z": z, "quantized": quantized,
                "ids": ids, "codebook_loss": terms["codebook_loss"], "commitment_loss": terms["commitment_loss"],
                "perplexity": vq_losses.codebook_perplexity(counts), "usage": vq_losses.codebook_usage(counts)}

    def discriminate(self, images: jax.Array) -> jax.Array:
        """PatchGAN logits [B, h', w', 1] of images [B, H, W, C] (`discriminator_layers` > 0)."""
        if not self.config.discriminator_layers:
            raise InputError("VQModel.discriminate: the model has no discriminator (VQConfig.discriminator_layers=0)")
        self._check_images(images)
        return self.discriminator(images)

    def encode(self, images: jax.Array) -> jax.Array:
        """Token ids [B, h, w] (int32)."""
        self._check_images(images)
        return self.quantizer(self.encoder(images))[0]

    def decode(self, quantized: jax.Array) -> jax.Array:
        """Images from (quantized) latents [B, h, w, codebook_dim]."""
        return self.decoder(quantized)[0]

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
        return self.decoder(self.quantizer.lookup(ids))[0]


def example_inputs(config: VQConfig) -> tuple:
    h, w = config.image_hw
    return (jnp.zeros((1, h, w, config.channels), jnp.float32),)


FAMILIES = (Family("vq", VQConfig, VQModel, example_inputs,
                   "VQ-VAE / VQGAN-style image tokenizer (conv encoder, codebook, conv decoder)",
                   tasks=("vq",)),)
