"""VQ image tokenizer training (task "vq"): reconstruct images through a discrete bottleneck.

    ExperimentConfig(task="vq", model=VQConfig(...), data=VQDataConfig(...))

Per step: a batch of images; the model (`mmjax.models.vq`) encodes, quantises (straight-through)
and decodes; loss = reconstruction ("l2" or "l1") + codebook + beta * commitment with beta 0.25
(`mmjax.ops.vq_losses.vqvae_loss`; `beta_on="codebook"` gives taming-transformers' default
`legacy=True` weighting instead, see that module).

Codebook updates (`data.codebook_update`):

* "loss": the codes are params learnt by the codebook loss, through the optimizer.
* "ema": the codes move by exponential moving averages of the encoder outputs assigned to them
  (decay `ema_decay` 0.99, Laplace-smoothed counts, eps 1e-5; VQ-VAE-2 / Sonnet's
  `VectorQuantizerEMA`); the codebook term is left out of the loss (beta * commitment stays).
  The EMA statistics are the loop's task state (`init_task_state`, checkpointed and restored as
  I-JEPA's target encoder is), and the task's `params_from_state` writes the EMA codebook into
  the params after each optimizer step, so evaluation, checkpoints and inference read it.

Dead-code restart (`data.restart_after` = N > 0): a code not chosen in N consecutive training
steps is re-initialised from a random encoder output of the current batch (its EMA statistics
reset to it). Under "loss" only the restarted rows are written (their Adam moments are kept).

Adversarial loss (VQGAN, Esser et al. 2021; off by default): `data.adversarial_weight` > 0 with
a PatchGAN discriminator in the model (`model.discriminator_layers` > 0, its params under
params["discriminator"]). Generator and discriminator train in ONE step with the ONE optimizer:

    total = L_vq(G) + f * (w * L_gen(G, sg[D]) + L_disc(sg[G(x)], D))
    L_gen = -mean D(x_hat);  L_disc = hinge (or vanilla) on D(x), D(sg[x_hat])
    w = adversarial_weight * sg(clip(||dL_rec/dW|| / (||dL_gen/dW|| + 1e-4), 0, 1e4)),
        W = the decoder's last conv kernel (VQGAN's adaptive weight)
    f = 1 from step data.disc_start on, 0 before (both adversarial terms off until then)

The stop-gradients route each term to one player: the generator's gradient holds L_vq and
f w L_gen only, the discriminator's f L_disc only (tested). The step counter for `disc_start` is
task state (checkpointed and restored like the EMA statistics; it restarts at 0 where the loop
rebuilds the task state, i.e. after loading pretrained params). What is shared, unlike taming's
two optimizers: the learning rate schedule, Adam's betas and the global-norm gradient clip
(`optimizer.grad_clip` scales both players' gradients by one factor). `val_loss` stays the
VQ objective (no adversarial terms). Checkpoints hold the discriminator's params with the
tokenizer's (the model config names its size, so `mmjax.train.load_for_inference` rebuilds the
same tree); `encode` / `decode_ids` never run it.

Evaluation (`evaluate`) on the held-out split: `reconstruction_psnr` (dB, mean over images of
10 log10(1 / MSE) on the [0, 1] pixel scale, reconstructions clipped to [0, 1]),
`codebook_usage` (fraction of the codes used by the held-out images' tokens),
`codebook_perplexity` (exp of the entropy of those tokens' code frequencies), `val_loss` (the
training objective's mean over the held-out images), `val_reconstruction_mse`. The final
evaluation writes `reconstructions.png` (originals above, reconstructions below) in the workdir.

Data (`VQDataConfig.dataset`): "digits": scikit-learn's 1,797 real 8x8 digit scans (0..16),
stratified 80/20 split (`mmjax.data.digits.stratified_split`), scaled to [0, 1], upsampled
bilinearly to `image_size`, fed to the model in [-1, 1].
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import configs
from mmjax.errors import ConfigError
from mmjax.train.task import Task

DATASETS = ("digits",)
CODEBOOK_UPDATES = ("loss", "ema")
DISC_LOSSES = ("hinge", "vanilla")


@dataclasses.dataclass(frozen=True)
class VQDataConfig:
    dataset: str = "digits"
    image_size: int = 16
    test_fraction: float = 0.2
    batch_size: int = 64
    eval_batch_size: int = 256
    reconstruction: str = "l2"  # or "l1"
    beta: float = 0.25
    beta_on: str = "commitment"  # the VQ-VAE paper (taming legacy=False); "codebook" = taming legacy=True
    codebook_update: str = "loss"  # or "ema"
    ema_decay: float = 0.99
    ema_eps: float = 1e-5
    restart_after: int = 0  # steps a code may go unused before it is restarted; 0 = never
    # VQGAN adversarial loss: the adaptive weight's multiplier (taming's disc_weight, 0.8 in its
    # configs); 0 = off. Needs model.discriminator_layers > 0 (the PatchGAN's size is the model's).
    adversarial_weight: float = 0.0
    disc_start: int = 0  # the adversarial terms are zero before this step (taming's disc_start)
    disc_loss: str = "hinge"  # or "vanilla" (softplus)
    picture_images: int = 10  # originals / reconstructions in the final reconstructions.png
    seed: int = 0

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ConfigError(f"data.dataset {self.dataset!r}{configs.closest_name(self.dataset, DATASETS)}; "
                              f"known: {', '.join(DATASETS)}")
        if self.reconstruction not in ("l2", "l1"):
            raise ConfigError(f"data.reconstruction must be 'l2' or 'l1', got {self.reconstruction!r}")
        if self.beta_on not in ("commitment", "codebook"):
            raise ConfigError(f"data.beta_on must be 'commitment' (VQ-VAE paper, taming legacy=False) or "
                              f"'codebook' (taming legacy=True), got {self.beta_on!r}")
        if self.codebook_update not in CODEBOOK_UPDATES:
            raise ConfigError(f"data.codebook_update must be 'loss' or 'ema', got {self.codebook_update!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"data.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.ema_eps <= 0:
            raise ConfigError(f"data.ema_eps must be > 0, got {self.ema_eps}")
        if self.beta < 0:
            raise ConfigError(f"data.beta must be >= 0, got {self.beta}")
        if not self.adversarial_weight >= 0.0:
            raise ConfigError(f"data.adversarial_weight must be >= 0 (0 = no adversarial loss), "
                              f"got {self.adversarial_weight}")
        if not isinstance(self.disc_start, int) or self.disc_start < 0:
            raise ConfigError(f"data.disc_start must be an int >= 0 (the step the adversarial loss starts), "
                              f"got {self.disc_start!r}")
        if self.disc_loss not in DISC_LOSSES:
            raise ConfigError(f"data.disc_loss must be 'hinge' (VQGAN's) or 'vanilla' (softplus), "
                              f"got {self.disc_loss!r}")
        if self.restart_after < 0:
            raise ConfigError(f"data.restart_after must be >= 0 (0 = no dead-code restart), got {self.restart_after}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"data.test_fraction must be in (0, 1), got {self.test_fraction}")
        for name in ("batch_size", "eval_batch_size", "image_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"data.{name} must be positive, got {getattr(self, name)}")


def load_digit_images(image_size: int, test_fraction: float = 0.2, seed: int = 0
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) float32 [N, S, S, 1] in [0, 1]: the sklearn digits upsampled bilinearly."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError("the digits dataset needs scikit-learn (pip install scikit-learn; it is in "
                          "mmjax's 'test' extra)") from None
    from mmjax.data.digits import stratified_split

    if image_size < 8:
        raise ConfigError(f"data.image_size must be >= 8 (the digits are 8x8), got {image_size}")
    digits = load_digits()
    raw = (digits.images.astype(np.float32) / 16.0)[..., None]
    images = np.asarray(jax.image.resize(jnp.asarray(raw), (len(raw), image_size, image_size, 1), "linear"))
    images = np.clip(images, 0.0, 1.0).astype(np.float32)
    train_idx, test_idx = stratified_split(digits.target, test_fraction, seed)
    return images[train_idx], images[test_idx]


class VQTask(Task):
    unit = "images"
    data_config_class = VQDataConfig

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        super().validate_config(cfg)
        m, d = cfg.model, cfg.data
        if m.image_hw != (d.image_size, d.image_size) or m.channels != 1:
            raise ConfigError(f"model must take {d.image_size}x{d.image_size} one-channel images (data.image_size); "
                              f"it has image_size {m.image_hw}, channels {m.channels}")
        if (d.codebook_update == "ema" or d.restart_after) and cfg.optimizer.grad_accum_steps != 1:
            raise ConfigError("task 'vq' with data.codebook_update='ema' or data.restart_after > 0 updates the "
                              "codebook once per step: optimizer.grad_accum_steps must be 1")
        layers = getattr(m, "discriminator_layers", 0)
        if d.adversarial_weight > 0:
            if not layers:
                raise ConfigError(f"data.adversarial_weight={d.adversarial_weight} needs a discriminator: set "
                                  f"model.discriminator_layers (1 or 2 for 16x16 images; VQGAN uses 3 at 256x256)")
            if cfg.optimizer.grad_accum_steps != 1:
                raise ConfigError("task 'vq' with data.adversarial_weight > 0 counts steps for data.disc_start "
                                  "in its task state: optimizer.grad_accum_steps must be 1")
            if d.disc_start >= cfg.steps:
                raise ConfigError(f"data.disc_start={d.disc_start} >= steps={cfg.steps}: the adversarial loss "
                                  f"would never switch on")
        elif layers:
            raise ConfigError(f"model.discriminator_layers={layers} with data.adversarial_weight=0: nothing would "
                              f"train the discriminator; set data.adversarial_weight > 0 (VQGAN: 0.8) or "
                              f"model.discriminator_layers=0")

    def __init__(self, cfg: Any, workdir: str, log: Callable[[str], None] = print):
        super().__init__(cfg, workdir, log)
        d = cfg.data
        self.train_images, self.test_images = load_digit_images(d.image_size, d.test_fraction, d.seed)
        self.model_config = cfg.model
        self.model = self.build_model(cfg.model)
        self.units_per_step = d.batch_size
        self.ema = d.codebook_update == "ema"
        self.adversarial = d.adversarial_weight > 0
        self._eval_fn = jax.jit(self._eval_outputs)

    def describe(self) -> str:
        c, d = self.model_config, self.cfg.data
        h, w = c.grid
        return (f"VQ tokenizer: {c.image_hw[0]}x{c.image_hw[1]} -> {h}x{w} tokens of {c.codebook_size} codes "
                f"(dim {c.codebook_dim}), codebook by {d.codebook_update}"
                + (f", dead codes restarted after {d.restart_after} steps" if d.restart_after else "")
                + (f", PatchGAN ({c.discriminator_layers} layers, width {c.discriminator_width}, {d.disc_loss}) "
                   f"weight {d.adversarial_weight} from step {d.disc_start}" if self.adversarial else "")
                + f"; {len(self.train_images)} training images, batch {d.batch_size}")

    # --- model and objective ----------------------------------------------------------------
    def init_params(self, rng):
        from mmjax.models.vq import example_inputs

        return self.model.init(rng, *example_inputs(self.model_config))["params"]

    def _objective(self, params, images, use_codebook_loss: bool):
        from mmjax.ops.vq_losses import vqvae_loss

        d = self.cfg.data
        x = images * 2.0 - 1.0
        out = self.model.apply({"params": params}, x)
        total, parts = vqvae_loss(x, out, reconstruction=d.reconstruction, beta=d.beta, beta_on=d.beta_on,
                                  use_codebook_loss=use_codebook_loss)
        aux = {**parts, "batch_perplexity": out["perplexity"], "batch_usage": out["usage"]}
        return total, aux, out

    def loss(self, params, batch, rng):
        total, aux, _ = self._objective(params, batch["images"], not self.ema)
        return total, jnp.float32(1.0), aux

    def adversarial_terms(self, params, x, out, factor) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(f * (w * L_gen + L_disc), metrics) for images x [B, H, W, C] on the model's scale and the
        model's outputs `out` on them; `factor` f (0 or 1: `disc_start`). See the module docstring:
        L_gen reads sg(discriminator params), L_disc sg(reconstructions)."""
        from mmjax.models.vq import VQModel, decoder_output_layer
        from mmjax.ops import vq_losses as V

        d = self.cfg.data
        sg = jax.lax.stop_gradient

        def disc(p, images):
            return self.model.apply({"params": p}, images, method=VQModel.discriminate)

        recon = out["reconstruction"]
        frozen_d = {**params, "discriminator": sg(params["discriminator"])}
        gen = V.generator_loss(disc(frozen_d, recon))  # gradient to the generator only
        logits_real, logits_fake = disc(params, x), disc(params, sg(recon))  # to the discriminator only
        disc_loss = V.discriminator_loss(logits_real, logits_fake, d.disc_loss)
        # VQGAN's adaptive weight: both terms' gradients at the decoder's last conv kernel, from its
        # (stopped) input: exactly the full gradients there, the layer being the last one
        last, hidden, frozen = decoder_output_layer(self.model_config), sg(out["decoder_hidden"]), sg(params)
        conv = frozen["decoder"]["conv_out"]

        def recon_from(kernel):
            return last.apply({"params": {**conv, "kernel": kernel}}, hidden)

        g_rec = jax.grad(lambda k: V.reconstruction_loss(x, recon_from(k), d.reconstruction))(conv["kernel"])
        g_gen = jax.grad(lambda k: V.generator_loss(disc(frozen, recon_from(k))))(conv["kernel"])
        weight = V.adaptive_weight(g_rec, g_gen, d.adversarial_weight)
        total = V.vqgan_total(jnp.float32(0.0), gen, disc_loss, weight, factor)
        return total, {"gen_loss": gen, "disc_loss": disc_loss, "adaptive_weight": weight, "disc_factor": factor,
                       "logits_real": jnp.mean(logits_real.astype(jnp.float32)),
                       "logits_fake": jnp.mean(logits_fake.astype(jnp.float32))}

    def init_task_state(self, params) -> Any:
        """None without EMA, restart and adversarial loss; else the codebook rows to write after the
        step (`codebook`, `replace` mask), the unused-step counters, the EMA statistics, and the
        step counter `step` for `disc_start`."""
        from mmjax.ops.vq_losses import ema_init

        d = self.cfg.data
        if not self.ema and not d.restart_after and not self.adversarial:
            return None
        state = {}
        if self.ema or d.restart_after:
            codebook = params["quantizer"]["codebook"]
            k = codebook.shape[0]
            state = {"codebook": jnp.asarray(codebook, jnp.float32), "replace": jnp.zeros((k,), bool),
                     "unused": jnp.zeros((k,), jnp.int32)}
            if self.ema:
                state["ema"] = ema_init(codebook)
        if self.adversarial:
            state["step"] = jnp.zeros((), jnp.int32)
        return state

    def state_loss(self, params, task_state, batch, rng):
        from mmjax.ops import vq_losses as V

        d = self.cfg.data
        total, aux, out = self._objective(params, batch["images"], not self.ema)
        new = dict(task_state)
        if self.adversarial:
            factor = V.adopt_weight(task_state["step"], d.disc_start)
            adv, adv_aux = self.adversarial_terms(params, batch["images"] * 2.0 - 1.0, out, factor)
            total = total + adv
            aux.update(adv_aux)
            new["step"] = task_state["step"] + 1
        if "codebook" not in task_state:  # adversarial only: no codebook writes
            return total, jnp.float32(1.0), aux, new
        z, ids = jax.lax.stop_gradient(out["z"]), out["ids"]
        k = self.model_config.codebook_size
        counts = V.code_counts(ids, k)
        codebook = jax.lax.stop_gradient(params["quantizer"]["codebook"]).astype(jnp.float32)
        if self.ema:
            new["ema"], codebook = V.ema_codebook_update(task_state["ema"], z, ids, d.ema_decay, d.ema_eps)
        unused = V.update_unused(task_state["unused"], counts)
        dead = jnp.zeros((k,), bool)
        if d.restart_after:
            rng = rng if rng is not None else jax.random.PRNGKey(0)
            codebook, unused, dead = V.restart_dead_codes(codebook, unused, z, rng, d.restart_after)
            if self.ema:
                new["ema"] = V.restart_ema_stats(new["ema"], codebook, dead)
        new["codebook"] = codebook
        new["replace"] = jnp.ones((k,), bool) if self.ema else dead
        new["unused"] = unused
        aux["restarted_codes"] = jnp.sum(dead.astype(jnp.float32))
        return total, jnp.float32(1.0), aux, new

    def params_from_state(self, params, task_state):
        """The codebook rows the step does not learn by gradient (all of them under EMA, the
        restarted ones otherwise) written from the task state; nothing without EMA and restart."""
        if "replace" not in task_state:
            return params
        q = params["quantizer"]
        cb = q["codebook"]
        new_cb = jnp.where(task_state["replace"][:, None], task_state["codebook"].astype(cb.dtype), cb)
        return {**params, "quantizer": {**q, "codebook": new_cb}}

    # --- data -------------------------------------------------------------------------------
    def train_iterator(self):
        import grain

        d = self.cfg.data
        count, index = jax.process_count(), jax.process_index()
        if d.batch_size % count:
            raise ConfigError(f"data.batch_size={d.batch_size} is not divisible by the {count} processes")
        images = self.train_images[index::count]
        local = d.batch_size // count
        if local > len(images):
            raise ConfigError(f"data.batch_size={d.batch_size} is larger than the {len(images)} training images")
        ds = grain.MapDataset.range(len(images)).shuffle(seed=d.seed).repeat(None).batch(local, drop_remainder=True)
        ds = ds.map(lambda rows: {"images": images[np.asarray(rows)]})
        return iter(ds.to_iter_dataset())

    # --- evaluation -------------------------------------------------------------------------
    def _eval_outputs(self, params, images):
        out = self.model.apply({"params": params}, images * 2.0 - 1.0)
        d = out["z"] - jax.lax.stop_gradient(out["quantized"])  # the codebook = commitment term's value
        return out["reconstruction"], out["ids"], jnp.mean(d * d, axis=(1, 2, 3))

    def reconstruct(self, params, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(reconstructions on the model's [-1, 1] scale, ids, per-image ||z - z_q||^2 means) of
        `images` [N, S, S, 1] in [0, 1], in fixed-size batches (one compiled shape)."""
        from mmjax.eval.batched import in_fixed_batches

        return in_fixed_batches(lambda x: self._eval_fn(params, x), images, self.cfg.data.eval_batch_size)

    def evaluate(self, params, mesh, *, final: bool = False) -> dict[str, float]:
        k = self.model_config.codebook_size
        x = self.test_images
        d = self.cfg.data
        raw, ids, dist = self.reconstruct(params, x)
        err = raw.astype(np.float64) - (2.0 * x - 1.0)
        rec = np.mean(err ** 2 if d.reconstruction == "l2" else np.abs(err), axis=(1, 2, 3))
        # the objective per image: both VQ terms have the value ||z - z_q||^2 (they differ in gradient)
        weight = (1.0 + d.beta) if not self.ema else d.beta if d.beta_on == "commitment" else 1.0
        val_loss = float(np.mean(rec + weight * dist))
        recon = np.clip((raw + 1.0) / 2.0, 0.0, 1.0)
        mse = np.mean((recon.astype(np.float64) - x) ** 2, axis=(1, 2, 3))
        counts = np.bincount(ids.reshape(-1), minlength=k).astype(np.float64)
        p = counts / counts.sum()
        nz = p[p > 0]
        out = {"reconstruction_psnr": float(np.mean(10.0 * np.log10(1.0 / np.maximum(mse, 1e-12)))),
               "val_reconstruction_mse": float(mse.mean()),
               "codebook_usage": float(np.mean(counts > 0)),
               "codebook_perplexity": float(np.exp(-np.sum(nz * np.log(nz)))),
               "val_loss": val_loss}
        if final and jax.process_index() == 0:
            n = min(d.picture_images, len(x))
            save_reconstructions(x[:n], recon[:n], os.path.join(self.workdir, "reconstructions.png"),
                                 f"held-out digits (top) and VQ reconstructions (bottom): "
                                 f"PSNR {out['reconstruction_psnr']:.1f} dB, {k} codes")
        return out


def save_reconstructions(originals: np.ndarray, recons: np.ndarray, path: str, title: str = "") -> str:
    """Originals in the top row, reconstructions below, one column per image (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(originals)
    fig = Figure(figsize=(1.1 * n, 2.6), dpi=100)
    FigureCanvasAgg(fig)
    for row, imgs in enumerate((originals, recons)):
        for i in range(n):
            ax = fig.add_subplot(2, n, row * n + i + 1)
            ax.imshow(imgs[i, ..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    return path
