"""Vector quantisation: nearest codes, the VQ-VAE objective, EMA codebook updates, dead-code
restart, codebook statistics, and VQGAN's adversarial and perceptual terms, apart from the model
(`mmjax.models.vq`).

* `nearest_codes(z, codebook) -> ids`: argmin_k ||z - e_k||^2 over the last axis of `z`
  (computed as ||z||^2 - 2 z.e_k + ||e_k||^2; ties go to the lowest id, as numpy's argmin).
* `straight_through(z, z_q)`: z + sg[z_q - z]: the forward value is z_q, the gradient reaches
  z (the encoder) as if quantisation were the identity (the VQ-VAE paper's estimator).
* `vq_terms(z, z_q)`: the two codebook terms, each a mean over every element:
  codebook = ||z_q - sg[z]||^2 (moves the codes; zero gradient to the encoder) and
  commitment = ||sg[z_q] - z||^2 (moves the encoder; zero gradient to the codes).
* `vq_loss(z, z_q, beta=0.25, beta_on="commitment")`: codebook + beta * commitment.
* `reconstruction_loss(x, x_hat, "l2" | "l1")`: mean squared / absolute error.
* `vqvae_loss(...)`: reconstruction + `vq_loss`, the whole objective, with its parts.

**The beta weighting, and taming-transformers' `legacy` flag.** The VQ-VAE paper (van den Oord
et al. 2017, eq. 3) puts beta (0.25) on the *commitment* term:
``||sg[z_e] - e||^2 + beta ||z_e - sg[e]||^2``. taming-transformers' `VectorQuantizer2`
(`taming/modules/vqvae/quantize.py`) computes, read from its source:

    legacy=True  (its default, kept "for backwards compatibility" with a bug it documents):
        loss = mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2)   # beta on the CODEBOOK term
    legacy=False (the fix):
        loss = beta * mean((sg[z_q] - z)^2) + mean((z_q - sg[z])^2)   # beta on the COMMITMENT term

(so the released VQGAN checkpoints trained with beta on the codebook term; note that the issue
text we started from had the two cases the other way round -- the source is as above).
**mmjax uses the VQ-VAE paper's form** (`beta_on="commitment"`, = taming `legacy=False`);
`beta_on="codebook"` gives taming's default `legacy=True` weighting. With EMA codebook updates
the codebook term is not used at all (the codes move by the EMA, not by gradient):
`vq_loss(..., use_codebook_loss=False)` keeps beta * commitment only, as Sonnet's
`VectorQuantizerEMA`.

**EMA codebook** (VQ-VAE paper appendix A.1, VQ-VAE-2, Sonnet's `VectorQuantizerEMA`):
with per-batch counts n_k and sums s_k of the encoder outputs assigned to code k,

    N_k <- decay * N_k + (1 - decay) * n_k,   m_k <- decay * m_k + (1 - decay) * s_k
    N~_k = (N_k + eps) / (sum_j N_j + K eps) * sum_j N_j       (Laplace smoothing)
    e_k  = m_k / N~_k

decay 0.99, eps 1e-5, no zero-debiasing (Sonnet 1 / VQ-VAE-2). State starts at N_k = 1 and
m_k = e_k of the initial codebook, so the first codebook equals the initial one (taming's
`EmbeddingEMA` starts N at 0, which divides unused codes by ~eps and throws them far away).

**Dead-code restart** (`restart_dead_codes`, as in Jukebox / SoundStream / many VQGAN forks):
a code not chosen in `threshold` consecutive steps is re-initialised from a random encoder
output of the current batch (drawn without replacement among the batch's vectors); its
unused-step counter restarts at 0.

**Statistics**: `code_counts`, `codebook_usage` (fraction of the K codes used at least once),
`codebook_perplexity` (exp of the entropy of the code-use frequencies: K for uniform use, 1
for one code).

**Adversarial terms** (VQGAN, Esser et al. 2021; read from taming-transformers'
`taming/modules/losses/vqperceptual.py`), on PatchGAN logits of any shape:

* `discriminator_loss(real, fake, "hinge" | "vanilla")`: hinge
  0.5 (mean relu(1 - real) + mean relu(1 + fake)) (VQGAN's), vanilla
  0.5 (mean softplus(-real) + mean softplus(fake)).
* `generator_loss(fake) = -mean(fake)` (taming uses it with both discriminator losses).
* `adaptive_weight(rec_grads, gan_grads, disc_weight)`: disc_weight *
  sg(clip(||rec_grads|| / (||gan_grads|| + 1e-4), 0, 1e4)), the gradients of the reconstruction
  and generator losses at the decoder's last layer (taming `calculate_adaptive_weight`).
* `adopt_weight(step, start)`: 0 before `start`, 1 from it on (taming's `disc_start`).
* `vqgan_total(vq, gen, disc, weight, factor) = vq + factor * (weight * gen + disc)`: one
  objective for one optimizer; with `gen` computed from sg(discriminator params) and `disc`
  from sg(reconstructions), each player's gradient holds only its own terms (`mmjax.tasks.vq`).

**Perceptual distance** (`perceptual_distance(feats_x, feats_y, weights=None)`, LPIPS-style,
Zhang et al. 2018): per layer of a frozen feature network, features unit-normalised over
channels, squared difference summed over channels (or weighted per channel, LPIPS's learnt
`lin` layers), averaged over space, summed over layers -> [B]. It takes the features, not the
network: LPIPS proper is this over ImageNet VGG16 features with weights fitted to human
judgments, which cannot be downloaded here, so no task wires it yet (docs/ssl_vision.md).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mmjax.errors import ConfigError, InputError

BETA_ON = ("commitment", "codebook")
RECONSTRUCTION = ("l2", "l1")


def _check_codebook(z: jax.Array, codebook: jax.Array, what: str) -> None:
    if codebook.ndim != 2:
        raise InputError(f"{what}: codebook must be [K, D], got shape {tuple(codebook.shape)}")
    if z.shape[-1] != codebook.shape[1]:
        raise InputError(f"{what}: vectors have dim {z.shape[-1]}, the codebook {codebook.shape[1]}")


def squared_distances(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """[..., K] squared Euclidean distances of each vector of z [..., D] to every code [K, D]."""
    _check_codebook(z, codebook, "squared_distances")
    z = z.astype(jnp.float32)
    e = codebook.astype(jnp.float32)
    dots = jnp.einsum("...d,kd->...k", z, e, precision=jax.lax.Precision.HIGHEST)
    return jnp.sum(z * z, -1, keepdims=True) - 2.0 * dots + jnp.sum(e * e, -1)


def nearest_codes(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """int32 ids [...] of the nearest code to each vector of z [..., D]."""
    return jnp.argmin(squared_distances(z, codebook), axis=-1).astype(jnp.int32)


def straight_through(z: jax.Array, z_q: jax.Array) -> jax.Array:
    """Forward value z_q, gradient to z unchanged (d out / d z = identity)."""
    return z + jax.lax.stop_gradient(z_q - z)


def vq_terms(z: jax.Array, z_q: jax.Array) -> dict[str, jax.Array]:
    """{"codebook_loss": mean ||z_q - sg[z]||^2, "commitment_loss": mean ||sg[z_q] - z||^2}
    (means over every element, as taming and Sonnet)."""
    if z.shape != z_q.shape:
        raise InputError(f"vq_terms: z {tuple(z.shape)} and z_q {tuple(z_q.shape)} differ in shape")
    z, z_q = z.astype(jnp.float32), z_q.astype(jnp.float32)
    return {"codebook_loss": jnp.mean((z_q - jax.lax.stop_gradient(z)) ** 2),
            "commitment_loss": jnp.mean((jax.lax.stop_gradient(z_q) - z) ** 2)}


def check_beta_on(beta_on: str) -> None:
    if beta_on not in BETA_ON:
        raise ConfigError(f"beta_on must be 'commitment' (the VQ-VAE paper; taming legacy=False) or "
                          f"'codebook' (taming's default legacy=True), got {beta_on!r}")


def weighted_vq_loss(codebook_loss: jax.Array, commitment_loss: jax.Array, beta: float = 0.25,
                     beta_on: str = "commitment", use_codebook_loss: bool = True) -> jax.Array:
    """The two terms combined: beta on the commitment term (default) or on the codebook term;
    `use_codebook_loss=False` (EMA codebook) drops the codebook term."""
    check_beta_on(beta_on)
    if beta < 0:
        raise ConfigError(f"beta must be >= 0, got {beta}")
    cb = codebook_loss if beta_on == "commitment" else beta * codebook_loss
    cm = beta * commitment_loss if beta_on == "commitment" else commitment_loss
    return cm + cb if use_codebook_loss else cm


def vq_loss(z: jax.Array, z_q: jax.Array, beta: float = 0.25, beta_on: str = "commitment",
            use_codebook_loss: bool = True) -> jax.Array:
    """codebook + beta * commitment (`beta_on="commitment"`, the VQ-VAE paper) or
    beta * codebook + commitment (`"codebook"`, taming legacy=True); see the module docstring."""
    t = vq_terms(z, z_q)
    return weighted_vq_loss(t["codebook_loss"], t["commitment_loss"], beta, beta_on, use_codebook_loss)


def reconstruction_loss(x: jax.Array, x_hat: jax.Array, kind: str = "l2") -> jax.Array:
    """Mean squared ("l2") or absolute ("l1") error over every element."""
    if kind not in RECONSTRUCTION:
        raise ConfigError(f"reconstruction loss {kind!r}: known {', '.join(RECONSTRUCTION)}")
    if x.shape != x_hat.shape:
        raise InputError(f"reconstruction_loss: images {tuple(x.shape)} and reconstructions "
                         f"{tuple(x_hat.shape)} differ in shape")
    d = x_hat.astype(jnp.float32) - x.astype(jnp.float32)
    return jnp.mean(d * d) if kind == "l2" else jnp.mean(jnp.abs(d))


def vqvae_loss(images: jax.Array, out: dict[str, jax.Array], *, reconstruction: str = "l2",
               beta: float = 0.25, beta_on: str = "commitment", use_codebook_loss: bool = True
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(total, parts) from the model's named outputs (`VQModel.__call__`: reconstruction,
    codebook_loss, commitment_loss): reconstruction + `weighted_vq_loss`."""
    rec = reconstruction_loss(images, out["reconstruction"], reconstruction)
    vq = weighted_vq_loss(out["codebook_loss"], out["commitment_loss"], beta, beta_on, use_codebook_loss)
    return rec + vq, {"reconstruction_loss": rec, "vq_loss": vq, "codebook_loss": out["codebook_loss"],
                      "commitment_loss": out["commitment_loss"]}


# --- statistics ------------------------------------------------------------------------------
def code_counts(ids: jax.Array, codebook_size: int) -> jax.Array:
    """float32 [K]: how often each code occurs in `ids` (any shape)."""
    return jnp.zeros((codebook_size,), jnp.float32).at[ids.reshape(-1)].add(1.0)


def codebook_usage(counts: jax.Array) -> jax.Array:
    """Fraction of codes used at least once."""
    return jnp.mean((counts > 0).astype(jnp.float32))


def codebook_perplexity(counts: jax.Array) -> jax.Array:
    """exp(-sum p log p) of the code-use frequencies p = counts / sum(counts)."""
    p = counts / jnp.maximum(jnp.sum(counts), 1e-12)
    return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


def psnr(x: jax.Array, x_hat: jax.Array, peak: float = 1.0) -> jax.Array:
    """Per-image PSNR in dB, [B], for images [B, ...] on a scale whose peak-to-peak is `peak`."""
    mse = jnp.mean((x_hat.astype(jnp.float32) - x.astype(jnp.float32)) ** 2, axis=tuple(range(1, x.ndim)))
    return 10.0 * jnp.log10(peak ** 2 / jnp.maximum(mse, 1e-12))


# --- EMA codebook ----------------------------------------------------------------------------
def ema_init(codebook: jax.Array) -> dict[str, jax.Array]:
    """EMA statistics that reproduce `codebook`: cluster_size 1, embed_sum = the codes."""
    k = codebook.shape[0]
    return {"cluster_size": jnp.ones((k,), jnp.float32), "embed_sum": codebook.astype(jnp.float32)}


def ema_codebook_update(stats: dict[str, jax.Array], z: jax.Array, ids: jax.Array, decay: float = 0.99,
                        eps: float = 1e-5) -> tuple[dict[str, jax.Array], jax.Array]:
    """(new stats, new codebook [K, D]) after one batch: z [..., D] encoder outputs, ids [...]
    their codes (module docstring)."""
    if not 0.0 <= decay < 1.0:
        raise ConfigError(f"EMA decay must be in [0, 1), got {decay}")
    if eps <= 0:
        raise ConfigError(f"EMA eps must be > 0 (Laplace smoothing), got {eps}")
    k, d = stats["embed_sum"].shape
    flat = jax.lax.stop_gradient(z).reshape(-1, d).astype(jnp.float32)
    onehot = jax.nn.one_hot(ids.reshape(-1), k, dtype=jnp.float32)  # [M, K]
    counts = jnp.sum(onehot, 0)
    sums = jnp.einsum("mk,md->kd", onehot, flat, precision=jax.lax.Precision.HIGHEST)
    size = decay * stats["cluster_size"] + (1.0 - decay) * counts
    embed_sum = decay * stats["embed_sum"] + (1.0 - decay) * sums
    n = jnp.sum(size)
    smoothed = (size + eps) / (n + k * eps) * n
    return {"cluster_size": size, "embed_sum": embed_sum}, embed_sum / smoothed[:, None]


# --- dead-code restart -----------------------------------------------------------------------
def update_unused(unused: jax.Array, counts: jax.Array) -> jax.Array:
    """Steps since each code was last used: 0 where used in this batch, else + 1."""
    return jnp.where(counts > 0, 0, unused + 1).astype(jnp.int32)


def restart_dead_codes(codebook: jax.Array, unused: jax.Array, z: jax.Array, rng: jax.Array,
                       threshold: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(codebook, unused, dead): codes with `unused >= threshold` replaced by encoder outputs of
    this batch (z [..., D], rows drawn without replacement when the batch has enough, else with),
    their counters reset to 0; `dead` is the bool mask [K] of the replaced codes."""
    if threshold < 1:
        raise ConfigError(f"dead-code restart threshold must be >= 1 step, got {threshold}")
    _check_codebook(z, codebook, "restart_dead_codes")
    k, d = codebook.shape
    flat = jax.lax.stop_gradient(z).reshape(-1, d).astype(codebook.dtype)
    m = flat.shape[0]
    if m >= k:
        rows = jax.random.permutation(rng, m)[:k]
    else:
        rows = jax.random.randint(rng, (k,), 0, m)
    dead = unused >= threshold
    new = jnp.where(dead[:, None], flat[rows], codebook)
    return new, jnp.where(dead, 0, unused).astype(jnp.int32), dead


def restart_ema_stats(stats: dict[str, Any], codebook: jax.Array, dead: jax.Array) -> dict[str, jax.Array]:
    """EMA statistics of restarted codes reset so the EMA reproduces them (N 1, m = the code)."""
    return {"cluster_size": jnp.where(dead, 1.0, stats["cluster_size"]),
            "embed_sum": jnp.where(dead[:, None], codebook.astype(jnp.float32), stats["embed_sum"])}


# --- adversarial (VQGAN) -----------------------------------------------------------------------
DISC_LOSSES = ("hinge", "vanilla")


def check_disc_loss(kind: str) -> None:
    if kind not in DISC_LOSSES:
        raise ConfigError(f"discriminator loss {kind!r}: known 'hinge' (VQGAN's) or 'vanilla' (softplus, "
                          f"the original GAN's)")


def discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array, kind: str = "hinge") -> jax.Array:
    """The discriminator's loss on patch logits (any shapes; means over every element), as
    taming's `hinge_d_loss` / `vanilla_d_loss`:
    hinge 0.5 (mean relu(1 - real) + mean relu(1 + fake)),
    vanilla 0.5 (mean softplus(-real) + mean softplus(fake))."""
    check_disc_loss(kind)
    real, fake = logits_real.astype(jnp.float32), logits_fake.astype(jnp.float32)
    if kind == "hinge":
        return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake)))
    return 0.5 * (jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake)))


def generator_loss(logits_fake: jax.Array) -> jax.Array:
    """-mean(logits of the reconstructions): VQGAN's generator term (for both discriminator losses)."""
    return -jnp.mean(logits_fake.astype(jnp.float32))


def global_norm(tree: Any) -> jax.Array:
    """sqrt of the sum of squares of every leaf (float32)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree)))


def adaptive_weight(rec_grads: Any, gan_grads: Any, disc_weight: float = 1.0, eps: float = 1e-4,
                    max_weight: float = 1e4) -> jax.Array:
    """VQGAN's weight of the generator term (taming `calculate_adaptive_weight`):
    disc_weight * sg(clip(||grad L_rec|| / (||grad L_gan|| + eps), 0, max_weight)), the two
    gradients taken with respect to the decoder's last layer (`rec_grads`, `gan_grads`: arrays
    or trees of the same params)."""
    ratio = global_norm(rec_grads) / (global_norm(gan_grads) + eps)
    return disc_weight * jax.lax.stop_gradient(jnp.clip(ratio, 0.0, max_weight))


def adopt_weight(step: jax.Array, start: int) -> jax.Array:
    """1.0 from step `start` on, 0.0 before (taming's `adopt_weight`: the adversarial terms are off
    for the first `start` steps)."""
    return (jnp.asarray(step) >= start).astype(jnp.float32)


def vqgan_total(vq_total: jax.Array, gen_loss: jax.Array, disc_loss: jax.Array, weight: jax.Array,
                factor: jax.Array) -> jax.Array:
    """The one-step objective L_vq + factor * (weight * L_gen + L_disc). With L_gen computed from
    sg(discriminator params) and L_disc from sg(reconstructions), the gradient with respect to the
    generator holds only L_vq + factor * weight * L_gen and the one with respect to the
    discriminator only factor * L_disc: one optimizer trains both, as taming's two."""
    return vq_total + factor * (weight * gen_loss + disc_loss)


# --- perceptual (LPIPS-style) ------------------------------------------------------------------
def normalize_channels(f: jax.Array, eps: float = 1e-10) -> jax.Array:
    """Features [..., C] divided by their L2 norm over channels (LPIPS's `normalize_tensor`)."""
    f = f.astype(jnp.float32)
    return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + eps)


def perceptual_distance(feats_x: Any, feats_y: Any, weights: Any = None) -> jax.Array:
    """[B] LPIPS-style distance between two images' features from a frozen network: for each
    layer l (feats_* are sequences of [B, H_l, W_l, C_l] arrays, layer by layer),
    the channel-unit-normalised features' squared difference, summed over channels (or weighted
    per channel by `weights[l]` [C_l], LPIPS's learnt `lin` layers), averaged over space,
    summed over layers. Without learnt weights this is LPIPS's `lin=False` baseline."""
    feats_x, feats_y = list(feats_x), list(feats_y)
    if len(feats_x) != len(feats_y) or not feats_x:
        raise InputError(f"perceptual_distance: {len(feats_x)} and {len(feats_y)} feature layers (need the "
                         f"same number, >= 1)")
    if weights is not None and len(list(weights)) != len(feats_x):
        raise InputError(f"perceptual_distance: {len(list(weights))} weight vectors for {len(feats_x)} layers")
    total = 0.0
    for i, (a, b) in enumerate(zip(feats_x, feats_y)):
        if a.shape != b.shape or a.ndim != 4:
            raise InputError(f"perceptual_distance: layer {i} features {tuple(a.shape)} and {tuple(b.shape)} "
                             f"(need equal [B, H, W, C])")
        d = (normalize_channels(a) - normalize_channels(b)) ** 2
        d = jnp.sum(d, -1) if weights is None else jnp.einsum("bhwc,c->bhw", d, jnp.asarray(list(weights)[i]))
        total = total + jnp.mean(d, axis=(1, 2))
    return total
