"""AIM autoregressive image pretraining (task "aim"): a prefix-causal ViT predicts each next patch's
normalised pixels; evaluate the frozen trunk with an attentive probe and a linear probe.

    ExperimentConfig(task="aim", model=AIMConfig(...), data=AIMDataConfig(...))

Per step: a batch of canvases and one prefix length K per image, uniform in
[`min_prefix`, `max_prefix`] (default [1, N-1], the paper's), drawn on the host from a generator
seeded by the batch's index (a resumed run sees the same K); the model runs with the
prefix-causal mask (`mmjax.models.aim`), position i predicts patch i + 1, and the loss is the
MSE (or L1, `data.loss`) against per-patch normalised pixels over the non-prefix patches only
(`mmjax.ops.aim_losses`).

Evaluation (`evaluate`), on the trunk run **bidirectionally** (no mask; see the model's
docstring): its final-normed tokens [N, dim] of `probe_per_class` labelled training canvases
per class and of every test canvas ->

* `attentive_probe_accuracy`: an attention-pooling probe (`mmjax.models.aim.AttentiveProbe` =
  mmjax's MAP head + Linear) trained on the frozen tokens (standardised per channel with the
  labelled set's statistics) with AdamW, full batch, `attentive_probe_steps` steps, fixed seed;
* `linear_probe_accuracy`: the L-BFGS logistic regression of `mmjax.eval.linear_probe` on the
  average-pooled tokens (I-JEPA's protocol);
* the same two probes on the same network at its random init (`random_init_attentive_probe_accuracy`,
  `random_init_linear_probe_accuracy`) and on raw pixels (`pixel_attentive_probe_accuracy` over
  the raw patches as tokens, `pixel_probe_accuracy` the linear probe on the flattened canvas),
  computed once; `val_loss`: the AIM loss on test canvases with fixed prefix lengths.
Every probe accuracy is the mean over `probe_draws` independent draws of the labelled canvases
(their spread as `*_std`), as in the I-JEPA task.

The final evaluation writes `predictions.png` in the workdir: test canvases, what the model
predicts for each non-prefix patch (un-normalised with the true patch's mean and std, as MAE's
pictures), and the prefix it started from.

Data (`AIMDataConfig`): "cluttered_digits" (`mmjax.data.digit_canvas`), the canvases and the
probe protocol of the I-JEPA task (`mmjax.tasks.ijepa`), so the two families' numbers compare.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import configs
from mmjax.errors import ConfigError
from mmjax.train.task import Task

DATASETS = ("cluttered_digits",)


@dataclasses.dataclass(frozen=True)
class AIMDataConfig:
    dataset: str = "cluttered_digits"
    canvas: int = 32
    copies: int = 4  # canvases per training digit
    digit_size: tuple[int, int] = (10, 18)
    clutter: int = 4
    batch_size: int = 64
    eval_batch_size: int = 256
    loss: str = "l2"  # "l2" (the paper's MSE) or "l1"
    min_prefix: int = 1  # prefix length K ~ uniform [min_prefix, max_prefix] per image
    max_prefix: int | None = None  # None: num_patches - 1
    probe_per_class: int = 20  # labelled training canvases per class for the probes
    probe_draws: int = 5  # independent draws of them; each probe accuracy is the mean (`*_std` beside it)
    probe_l2: float = 1e-3  # linear probe
    attentive_probe_steps: int = 300
    attentive_probe_lr: float = 1e-3
    attentive_probe_weight_decay: float = 1e-2
    picture_images: int = 6  # canvases in the final predictions.png
    seed: int = 0

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ConfigError(f"data.dataset {self.dataset!r}{configs.closest_name(self.dataset, DATASETS)}; "
                              f"known: {', '.join(DATASETS)}")
        object.__setattr__(self, "digit_size", tuple(self.digit_size))
        if self.loss not in ("l2", "l1"):
            raise ConfigError(f"data.loss must be 'l2' or 'l1', got {self.loss!r}")
        if self.min_prefix < 0:
            raise ConfigError(f"data.min_prefix must be >= 0 (0 = a causal trunk), got {self.min_prefix}")
        if self.max_prefix is not None and self.max_prefix < self.min_prefix:
            raise ConfigError(f"data.max_prefix={self.max_prefix} is below data.min_prefix={self.min_prefix}")
        for name in ("batch_size", "eval_batch_size", "probe_per_class", "probe_draws", "copies",
                     "attentive_probe_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"data.{name} must be positive, got {getattr(self, name)}")

    def prefix_range(self, num_patches: int) -> tuple[int, int]:
        """(low, high) inclusive bounds of the prefix length; ConfigError naming the setting."""
        high = num_patches - 1 if self.max_prefix is None else self.max_prefix
        if high > num_patches - 1:
            raise ConfigError(f"data.max_prefix={high} leaves no patch to predict: the trunk has "
                              f"{num_patches} patches, so the prefix length must be <= {num_patches - 1}")
        if self.min_prefix > high:
            raise ConfigError(f"data.min_prefix={self.min_prefix} exceeds the largest prefix {high} "
                              f"({num_patches} patches)")
        return self.min_prefix, high


@functools.partial(jax.jit, static_argnames=("probe", "steps", "lr", "weight_decay"))
def _train_probe(probe, params, z, y, steps: int, lr: float, weight_decay: float):
    import optax

    opt = optax.adamw(lr, weight_decay=weight_decay)

    def step(carry, _):
        p, s = carry
        g = jax.grad(lambda p_: optax.softmax_cross_entropy_with_integer_labels(
            probe.apply({"params": p_}, z), y).mean())(p)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    return params


@functools.partial(jax.jit, static_argnames=("probe",))
def _probe_init(probe, rng, z):
    return probe.init(rng, z)["params"]


@functools.partial(jax.jit, static_argnames=("probe",))
def _probe_predict(probe, params, tokens):
    return jnp.argmax(probe.apply({"params": params}, tokens), -1)


def fit_attentive_probe(train_tokens: np.ndarray, train_labels: np.ndarray, num_classes: int, *,
                        steps: int = 300, lr: float = 1e-3, weight_decay: float = 1e-2, num_heads: int = 4,
                        seed: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """Train `AttentiveProbe` on frozen tokens [n, N, D] (full batch AdamW, cross-entropy); tokens
    are standardised per channel with the training statistics. Returns predict(tokens) -> labels.
    The training program is compiled once per shape and setting (module-level jit)."""
    import flax.linen as nn

    from mmjax.models.aim import AttentiveProbe

    x = np.asarray(train_tokens, np.float32)
    mean = x.mean(axis=(0, 1))
    std = x.std(axis=(0, 1))
    std = np.where(std > 1e-6, std, 1.0).astype(np.float32)
    z = jnp.asarray((x - mean) / std)
    y = jnp.asarray(train_labels, jnp.int32)
    d = x.shape[-1]
    probe = AttentiveProbe(num_classes, num_heads=num_heads if d % num_heads == 0 else 1, mlp_dim=2 * d)
    params = nn.unbox(_probe_init(probe, jax.random.PRNGKey(seed), z[:1]))
    params = _train_probe(probe, params, z, y, int(steps), float(lr), float(weight_decay))

    def predict(tokens: np.ndarray) -> np.ndarray:
        t = (np.asarray(tokens, np.float32) - mean) / std
        return np.asarray(_probe_predict(probe, params, jnp.asarray(t)))

    return predict


class AIMTask(Task):
    unit = "images"
    data_config_class = AIMDataConfig

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        super().validate_config(cfg)
        t, d = cfg.model.trunk, cfg.data
        if t.image_hw != (d.canvas, d.canvas) or t.channels != 1:
            raise ConfigError(f"model.trunk must take {d.canvas}x{d.canvas} one-channel images (the canvases); "
                              f"it has image_size {t.image_hw}, channels {t.channels}")
        d.prefix_range(t.num_patches)

    def __init__(self, cfg: Any, workdir: str, log: Callable[[str], None] = print):
        from mmjax.data.digit_canvas import labelled_subset, load_cluttered_digits

        super().__init__(cfg, workdir, log)
        d = cfg.data
        self.data = load_cluttered_digits(canvas=d.canvas, copies=d.copies, digit_size=d.digit_size,
                                          clutter=d.clutter, seed=d.seed)
        self.model_config = cfg.model
        self.model = self.build_model(cfg.model)
        self.num_patches = cfg.model.trunk.num_patches
        self.prefix = d.prefix_range(self.num_patches)
        self.units_per_step = d.batch_size
        # draw k is seeded seed + k (draw 0 = the single draw of earlier versions); probe_rows = their union
        self.probe_draws = [labelled_subset(self.data.train.labels, d.probe_per_class, seed=d.seed + k)
                            for k in range(d.probe_draws)]
        self.probe_rows = np.unique(np.concatenate(self.probe_draws))
        self._features = jax.jit(lambda p, x: self.model.apply({"params": p}, x, method=type(self.model).features))
        n_eval = min(len(self.data.test), d.eval_batch_size)
        self._eval_batch = {"images": self.data.test.images[:n_eval],
                            "prefix_len": self._prefixes(n_eval, np.random.default_rng(d.seed + 7))}
        self._val_loss = jax.jit(lambda p, b: self.loss(p, b, None)[0])
        self._baselines: dict[str, float] | None = None

    def describe(self) -> str:
        c, d = self.model_config, self.cfg.data
        t = c.trunk
        return (f"AIM: trunk ViT {t.dim} x {t.num_layers} on a {t.grid[0]}x{t.grid[1]} grid, head "
                f"{c.head_width} x {c.head_blocks} blocks; {len(self.data.train)} canvases, prefix "
                f"~ U[{self.prefix[0]}, {self.prefix[1]}], {d.loss} loss, batch {d.batch_size}")

    # --- model and objective ----------------------------------------------------------------
    def init_params(self, rng):
        from mmjax.models.aim import example_inputs

        return self.model.init(rng, *example_inputs(self.model_config))["params"]

    def loss(self, params, batch, rng):
        from mmjax.ops.aim_losses import aim_loss, aim_targets

        images = batch["images"]
        out = self.model.apply({"params": params}, images, batch["prefix_len"])
        targets = aim_targets(images, self.model_config.trunk.patch_hw)
        loss = aim_loss(out["predictions"], targets, batch["prefix_len"], self.cfg.data.loss)
        return loss, jnp.float32(1.0), {"prefix_len": jnp.mean(batch["prefix_len"].astype(jnp.float32))}

    # --- data -------------------------------------------------------------------------------
    def _prefixes(self, n: int, rng: np.random.Generator) -> np.ndarray:
        lo, hi = self.prefix
        return rng.integers(lo, hi + 1, size=n).astype(np.int32)

    def train_iterator(self):
        import grain

        d = self.cfg.data
        count, index = jax.process_count(), jax.process_index()
        if d.batch_size % count:
            raise ConfigError(f"data.batch_size={d.batch_size} is not divisible by the {count} processes")
        images = self.data.train.images[index::count]
        local = d.batch_size // count
        ds = grain.MapDataset.range(len(images)).shuffle(seed=d.seed).repeat(None).batch(local, drop_remainder=True)
        # prefix lengths from a generator seeded by the batch index: the same ones after a resume
        ds = ds.map_with_index(lambda i, rows: {
            "images": images[np.asarray(rows)],
            "prefix_len": self._prefixes(len(rows), np.random.default_rng([d.seed, index, i]))})
        return iter(ds.to_iter_dataset())

    # --- evaluation -------------------------------------------------------------------------
    def tokens(self, params, images: np.ndarray) -> np.ndarray:
        """[n, N, dim] bidirectional trunk tokens, in padded fixed-size chunks (one compile)."""
        from mmjax.eval.batched import in_fixed_batches

        return in_fixed_batches(lambda x: self._features(params, x), images, self.cfg.data.eval_batch_size)

    def _probes(self, train_tokens: np.ndarray, test_tokens: np.ndarray, attentive: bool = True,
                pooled: bool = True) -> dict[str, tuple[float, float]]:
        """{"attentive": (mean, std), "linear": (mean, std)} over the label draws of the probe
        accuracies of token features [n, N, D] (`train_tokens`: the rows `self.probe_rows`);
        `pooled=False`: the linear probe reads the flattened tokens (raw pixels)."""
        from mmjax.eval.linear_probe import linear_probe_accuracy

        d = self.cfg.data
        y_te = self.data.test.labels
        accs: dict[str, list[float]] = {"attentive": [], "linear": []}
        flat = (lambda t: t.mean(1)) if pooled else (lambda t: t.reshape(len(t), -1))
        for rows in self.probe_draws:
            x, y = train_tokens[np.searchsorted(self.probe_rows, rows)], self.data.train.labels[rows]
            if attentive:
                predict = fit_attentive_probe(x, y, 10, steps=d.attentive_probe_steps, lr=d.attentive_probe_lr,
                                              weight_decay=d.attentive_probe_weight_decay, seed=d.seed)
                accs["attentive"].append(float(np.mean(predict(test_tokens) == y_te)))
            accs["linear"].append(linear_probe_accuracy(flat(x), y, flat(test_tokens), y_te, l2=d.probe_l2))
        return {k: (float(np.mean(v)), float(np.std(v))) for k, v in accs.items() if v}

    @staticmethod
    def _named(probes: dict[str, tuple[float, float]], names: dict[str, str]) -> dict[str, float]:
        out = {}
        for kind, name in names.items():
            out[name], out[f"{name}_std"] = probes[kind]
        return out

    def baselines(self) -> dict[str, float]:
        """Probe accuracies of the network at its random init and of raw pixels (computed once)."""
        if self._baselines is None:
            import flax.linen as nn

            from mmjax.ops.aim_losses import patchify

            init = jax.tree_util.tree_map(np.asarray, nn.unbox(
                jax.jit(self.init_params)(jax.random.split(jax.random.PRNGKey(self.cfg.seed))[0])))
            tr, te = self.data.train.images[self.probe_rows], self.data.test.images
            patch_hw = self.model_config.trunk.patch_hw
            self._baselines = {
                **self._named(self._probes(self.tokens(init, tr), self.tokens(init, te)),
                              {"attentive": "random_init_attentive_probe_accuracy",
                               "linear": "random_init_linear_probe_accuracy"}),
                **self._named(self._probes(np.asarray(patchify(tr, patch_hw)), np.asarray(patchify(te, patch_hw))),
                              {"attentive": "pixel_attentive_probe_accuracy"}),
                **self._named(self._probes(tr, te, attentive=False, pooled=False), {"linear": "pixel_probe_accuracy"})}
        return self._baselines

    def evaluate(self, params, mesh, *, final: bool = False) -> dict[str, float]:
        tr = self.tokens(params, self.data.train.images[self.probe_rows])
        te = self.tokens(params, self.data.test.images)
        out = {**self._named(self._probes(tr, te), {"attentive": "attentive_probe_accuracy",
                                                    "linear": "linear_probe_accuracy"}), **self.baselines()}
        batch = jax.tree_util.tree_map(jnp.asarray, self._eval_batch)
        out["val_loss"] = float(self._val_loss(params, batch))
        if final and jax.process_index() == 0:
            n = min(self.cfg.data.picture_images, len(self.data.test))
            self.save_predictions(params, self.data.test.images[:n], os.path.join(self.workdir, "predictions.png"))
        return out

    def predicted_canvases(self, params, images: np.ndarray, prefix_len: np.ndarray) -> np.ndarray:
        """[n, H, W, C] canvases whose non-prefix patches are the model's predictions (prefix-causal
        mask, teacher-forced), un-normalised with each true patch's mean and std."""
        from mmjax.ops.aim_losses import NORM_PIX_EPS, patchify

        t = self.model_config.trunk
        out = self.model.apply({"params": params}, jnp.asarray(images), jnp.asarray(prefix_len, jnp.int32))
        true = np.asarray(patchify(jnp.asarray(images), t.patch_hw), np.float64)
        mean = true.mean(-1, keepdims=True)
        std = np.sqrt(true.var(-1, ddof=1, keepdims=True) + NORM_PIX_EPS)
        pred = np.asarray(out["predictions"], np.float64)
        patches = true.copy()
        patches[:, 1:] = pred[:, :-1] * std[:, 1:] + mean[:, 1:]
        keep = np.arange(t.num_patches)[None, :] < np.asarray(prefix_len)[:, None]
        patches = np.where(keep[..., None], true, patches)
        (gh, gw), (ph, pw) = t.grid, t.patch_hw
        n, c = len(images), t.channels
        x = patches.reshape(n, gh, gw, ph, pw, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, gh * ph, gw * pw, c)
        return np.clip(x, -1.0, 1.0).astype(np.float32)

    def save_predictions(self, params, images: np.ndarray, path: str, prefix_len: np.ndarray | None = None) -> str:
        """Rows: true canvas / prefix only / prefix + predicted next patches (PNG)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        t = self.model_config.trunk
        n = len(images)
        if prefix_len is None:
            prefix_len = np.full((n,), t.num_patches // 4, np.int32)
        pred = self.predicted_canvases(params, images, prefix_len)
        gw, (ph, pw) = t.grid[1], t.patch_hw
        ys, xs = np.divmod(np.arange(t.num_patches), gw)
        prefix_only = np.full_like(images, -1.0)
        for i, k in enumerate(np.asarray(prefix_len)):
            for j in range(int(k)):
                sl = (i, slice(ys[j] * ph, ys[j] * ph + ph), slice(xs[j] * pw, xs[j] * pw + pw))
                prefix_only[sl] = images[sl]
        fig = Figure(figsize=(1.2 * n, 4.0), dpi=100)
        FigureCanvasAgg(fig)
        rows = (("true", images), (f"prefix (K={int(prefix_len[0])})", prefix_only), ("predicted", pred))
        for r, (label, imgs) in enumerate(rows):
            for i in range(n):
                ax = fig.add_subplot(3, n, r * n + i + 1)
                ax.imshow((imgs[i, ..., 0] + 1.0) / 2.0, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_ylabel(label, fontsize=7)
        fig.suptitle("AIM on held-out canvases: each patch after the prefix predicted from the patches before it",
                     fontsize=8)
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path)
        return path
