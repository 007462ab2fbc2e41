"""I-JEPA self-supervised pretraining (task "ijepa"): predict the target encoder's representations
of masked blocks from one context block; evaluate the encoder with linear probes.

    ExperimentConfig(task="ijepa", model=IJepaConfig(...), data=IJepaDataConfig(...))

Per step: a batch of images with multi-block masks (`mmjax.data.multiblock`: 4 target blocks,
1 context block disjoint from them; block sizes drawn once per batch, positions per image, from a
generator seeded by the batch's index, so a resumed run sees the same masks); the context
encoder encodes the context patches, the predictor predicts each target block, the target
encoder (an EMA copy of the context encoder kept as the loop's task state, `init_task_state`)
encodes the full image; loss = smooth L1 (or L2) between predictions and the layer-normed
targets (`mmjax.ops.jepa_losses`). The EMA momentum rises linearly 0.996 -> 1.0 over
`cfg.steps` (its step counter lives in the task state); the EMA update reads the params the
step starts from (as BLIP's momentum encoder here), one step behind the reference, which
updates after the optimizer step.

Anti-collapse option (`data.variance_weight`, `data.covariance_weight`; 0 / 0 = the paper's
objective): C-JEPA's VICReg variance and covariance terms (`variance_covariance_loss`) on the
context encoder's per-image mean token over the batch. At the sizes a CPU trains, plain I-JEPA
lets the features of different images collapse together (effective rank and per-dimension std
fall while the loss goes to ~0); the terms keep them apart (docs/ijepa.md has both runs).

Evaluation (`evaluate`): the EMA target encoder's average-pooled features of the full image
(what the paper evaluates) -> a linear probe (`mmjax.eval.linear_probe`, L-BFGS logistic regression) fitted on
`probe_per_class` labelled training images per class, accuracy on every test image, averaged over
`probe_draws` independent draws of those labelled images (`linear_probe_accuracy`, its spread
over the draws as `linear_probe_accuracy_std`); the same probes of the online context encoder
(`online_linear_probe_accuracy`), of the same network at its random
init (`random_init_probe_accuracy`, computed once) and of raw pixels (`pixel_probe_accuracy`,
once); collapse statistics of the online encoder's features (mean per-dimension std, effective rank = exp of the
entropy of the normalised singular values); `val_loss` = the training objective on test images
with fixed masks, the online encoder standing in for the target one (the loop evaluates params
only; with momentum -> 1 the two converge). The reference's weight-decay schedule 0.04 -> 0.4 is
`optimizer.weight_decay_end` (cosine from `optimizer.weight_decay`). Not done (say so): several
context blocks per image.

Data (`IJepaDataConfig`): "cluttered_digits" (`mmjax.data.digit_canvas`): real digit scans at
random places and sizes among fragments of other digits on a 32x32 canvas, where a pixel probe
is near chance.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import configs
from mmjax.errors import ConfigError
from mmjax.train.task import Task

DATASETS = ("cluttered_digits",)


@dataclasses.dataclass(frozen=True)
class IJepaDataConfig:
    dataset: str = "cluttered_digits"
    canvas: int = 32
    copies: int = 4  # canvases per training digit
    digit_size: tuple[int, int] = (10, 18)
    clutter: int = 4
    batch_size: int = 64
    eval_batch_size: int = 256
    # multi-block masks (the released models' values, min_keep lowered for small grids)
    num_targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    context_scale: tuple[float, float] = (0.85, 1.0)
    min_keep: int = 4
    loss: str = "smooth_l1"  # or "l2"
    # C-JEPA's anti-collapse terms (VICReg variance / covariance, `mmjax.ops.jepa_losses`) on the
    # context encoder's per-image mean token over the batch; 0 / 0 = I-JEPA as published
    variance_weight: float = 0.0
    covariance_weight: float = 0.0
    ema: tuple[float, float] = (0.996, 1.0)
    probe_per_class: int = 20  # labelled training images per class for the linear probes
    # independent draws of those labelled images: every probe accuracy is the mean over the
    # draws (`*_std` beside it): one draw of 200 labels swings a probe by ~2 points
    probe_draws: int = 5
    probe_l2: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ConfigError(f"data.dataset {self.dataset!r}{configs.closest_name(self.dataset, DATASETS)}; "
                              f"known: {', '.join(DATASETS)}")
        for name in ("digit_size", "target_scale", "target_aspect", "context_scale", "ema"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.loss not in ("smooth_l1", "l2"):
            raise ConfigError(f"data.loss must be 'smooth_l1' or 'l2', got {self.loss!r}")
        if self.variance_weight < 0 or self.covariance_weight < 0:
            raise ConfigError(f"data.variance_weight / data.covariance_weight must be >= 0, got "
                              f"{self.variance_weight} / {self.covariance_weight}")
        lo, hi = self.ema
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(f"data.ema must be (start, end) with 0 <= start <= end <= 1, got {self.ema}")
        for name in ("batch_size", "eval_batch_size", "probe_per_class", "probe_draws", "copies"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"data.{name} must be positive, got {getattr(self, name)}")


class IJepaTask(Task):
    unit = "images"
    data_config_class = IJepaDataConfig

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        super().validate_config(cfg)
        e, d = cfg.model.encoder, cfg.data
        if e.image_hw != (d.canvas, d.canvas) or e.channels != 1:
            raise ConfigError(f"model.encoder must take {d.canvas}x{d.canvas} one-channel images (the canvases); "
                              f"it has image_size {e.image_hw}, channels {e.channels}")
        if cfg.optimizer.grad_accum_steps != 1:
            raise ConfigError("task 'ijepa' keeps an EMA target encoder per step: optimizer.grad_accum_steps "
                              "must be 1")

    def __init__(self, cfg: Any, workdir: str, log: Callable[[str], None] = print):
        from mmjax.data.digit_canvas import labelled_subset, load_cluttered_digits
        from mmjax.data.multiblock import MultiBlockConfig

        super().__init__(cfg, workdir, log)
        d = cfg.data
        self.data = load_cluttered_digits(canvas=d.canvas, copies=d.copies, digit_size=d.digit_size,
                                          clutter=d.clutter, seed=d.seed)
        self.model_config = cfg.model
        self.model = self.build_model(cfg.model)
        self.masks = MultiBlockConfig(grid=cfg.model.encoder.grid, num_targets=d.num_targets,
                                      target_scale=d.target_scale, target_aspect=d.target_aspect,
                                      context_scale=d.context_scale, min_keep=d.min_keep)
        self.units_per_step = d.batch_size
        # draw k is seeded seed + k: draw 0 is the single draw of earlier versions
        self.probe_draws = [labelled_subset(self.data.train.labels, d.probe_per_class, seed=d.seed + k)
                            for k in range(d.probe_draws)]
        self.probe_rows = np.unique(np.concatenate(self.probe_draws))  # every labelled image of any draw
        self._features = jax.jit(lambda p, x: self.model.apply({"params": p}, x, method=type(self.model).features))
        self._eval_batch = self._masked_batch(self.data.test.images[: d.batch_size], np.random.default_rng(d.seed + 7))
        self._baselines: dict[str, float] | None = None
        self._init_test_features: np.ndarray | None = None  # set by baselines()
        self._val_loss = jax.jit(lambda p, b: self._objective(p, p["encoder"], b)[0])

    def describe(self) -> str:
        c, d = self.model_config, self.cfg.data
        e = c.encoder
        return (f"I-JEPA: encoder ViT {e.dim} x {e.num_layers} on a {e.grid[0]}x{e.grid[1]} grid, predictor "
                f"{c.predictor_dim} x {c.predictor_layers}; {len(self.data.train)} canvases, {d.num_targets} "
                f"targets/image, batch {d.batch_size}")

    # --- model and objective ----------------------------------------------------------------
    def init_params(self, rng):
        from mmjax.models.ijepa import example_inputs

        return self.model.init(rng, *example_inputs(self.model_config))["params"]

    def init_task_state(self, params) -> Any:
        """The target encoder (an EMA copy of the context encoder) and the step counter of its
        momentum schedule."""
        return {"target": jax.tree_util.tree_map(jnp.copy, params["encoder"]), "step": jnp.zeros((), jnp.int32)}

    def _objective(self, params, target_params, batch):
        from mmjax.models.ijepa import IJepa
        from mmjax.ops.jepa_losses import ijepa_loss

        target_idx = jnp.swapaxes(batch["target_idx"], 0, 1)  # [B, T, K] -> [T, B, K]
        target_ok = jnp.swapaxes(batch["target_valid"], 0, 1)
        out = self.model.apply({"params": params}, batch["images"], batch["context_idx"], target_idx,
                               batch["context_valid"], target_ok)
        targets = self.model.apply({"params": {**params, "encoder": target_params}}, batch["images"],
                                   target_idx, method=IJepa.targets)
        d = self.cfg.data
        loss = ijepa_loss(out["predictions"], targets, d.loss, mask=target_ok)
        aux = {"context_patches": jnp.mean(jnp.sum(batch["context_valid"], -1).astype(jnp.float32)),
               "target_patches": jnp.mean(jnp.sum(target_ok, -1).astype(jnp.float32))}
        if d.variance_weight or d.covariance_weight:
            from mmjax.ops.jepa_losses import variance_covariance_loss

            w = batch["context_valid"].astype(jnp.float32)[..., None]  # per-image mean of the valid context tokens
            pooled = jnp.sum(out["context"].astype(jnp.float32) * w, 1) / jnp.maximum(jnp.sum(w, 1), 1.0)
            var, cov = variance_covariance_loss(pooled)
            aux.update(jepa_loss=loss, variance_loss=var, covariance_loss=cov)
            loss = loss + d.variance_weight * var + d.covariance_weight * cov
        return loss, aux

    def loss(self, params, batch, rng):
        loss, aux = self._objective(params, params["encoder"], batch)
        return loss, jnp.float32(1.0), aux

    def state_loss(self, params, task_state, batch, rng):
        from mmjax.ops.jepa_losses import ema_momentum, ema_update

        loss, aux = self._objective(params, jax.lax.stop_gradient(task_state["target"]), batch)
        m = ema_momentum(task_state["step"], self.cfg.steps, *self.cfg.data.ema)
        target = ema_update(task_state["target"], jax.lax.stop_gradient(params["encoder"]), m)
        aux["ema_momentum"] = m
        return loss, jnp.float32(1.0), aux, {"target": target, "step": task_state["step"] + 1}

    # --- data -------------------------------------------------------------------------------
    def _masked_batch(self, images: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        from mmjax.data.multiblock import sample_multiblock

        # fixed shapes (padded lists + validity masks): one compiled step; the reference's cut to the
        # batch's shortest would change Kc / Kt, and so recompile, every batch
        ctx, ctx_ok, tgt, tgt_ok = sample_multiblock(self.masks, len(images), rng, pad=True)
        return {"images": images, "context_idx": ctx[0], "context_valid": ctx_ok[0],
                "target_idx": np.swapaxes(tgt, 0, 1).copy(), "target_valid": np.swapaxes(tgt_ok, 0, 1).copy()}

    def train_iterator(self):
        import grain

        d = self.cfg.data
        count, index = jax.process_count(), jax.process_index()
        if d.batch_size % count:
            raise ConfigError(f"data.batch_size={d.batch_size} is not divisible by the {count} processes")
        images = self.data.train.images[index::count]
        local = d.batch_size // count
        ds = grain.MapDataset.range(len(images)).shuffle(seed=d.seed).repeat(None).batch(local, drop_remainder=True)
        # masks from a generator seeded by the batch index: the same masks after a resume
        ds = ds.map_with_index(lambda i, rows: self._masked_batch(
            images[np.asarray(rows)], np.random.default_rng([d.seed, index, i])))
        return iter(ds.to_iter_dataset())

    # --- evaluation -------------------------------------------------------------------------
    def features(self, params, images: np.ndarray) -> np.ndarray:
        from mmjax.eval.batched import in_fixed_batches

        return in_fixed_batches(lambda x: self._features(params, x), images, self.cfg.data.eval_batch_size)

    def _probe(self, train_x: np.ndarray, test_x: np.ndarray) -> tuple[float, float]:
        """(mean, std) over the label draws of the test accuracy; `train_x` holds the features of
        `self.probe_rows` (every draw's labelled images), in that order."""
        from mmjax.eval.linear_probe import linear_probe_accuracy

        accs = []
        for rows in self.probe_draws:
            at = np.searchsorted(self.probe_rows, rows)
            accs.append(linear_probe_accuracy(train_x[at], self.data.train.labels[rows], test_x,
                                              self.data.test.labels, l2=self.cfg.data.probe_l2))
        return float(np.mean(accs)), float(np.std(accs))

    def _probe_metrics(self, name: str, train_x: np.ndarray, test_x: np.ndarray) -> dict[str, float]:
        mean, std = self._probe(train_x, test_x)
        return {name: mean, f"{name}_std": std}

    def _train_test_features(self, params) -> tuple[np.ndarray, np.ndarray]:
        """Features of the labelled training images (`self.probe_rows`) and of every test image."""
        return self.features(params, self.data.train.images[self.probe_rows]), self.features(params, self.data.test.images)

    def baselines(self) -> dict[str, float]:
        """Probe accuracies of the network at its random init and of raw pixels (computed once)."""
        if self._baselines is None:
            import flax.linen as nn

            init = jax.tree_util.tree_map(np.asarray, nn.unbox(
                jax.jit(self.init_params)(jax.random.split(jax.random.PRNGKey(self.cfg.seed))[0])))
            tr, te = self._train_test_features(init)
            self._init_test_features = te  # kept for the final picture
            pixels = self.data.train.images[self.probe_rows], self.data.test.images
            self._baselines = {
                **self._probe_metrics("random_init_probe_accuracy", tr, te),
                **self._probe_metrics("pixel_probe_accuracy", *(x.reshape(len(x), -1) for x in pixels))}
        return self._baselines

    evaluates_task_state = True  # the loop passes the EMA target encoder to `evaluate`

    def evaluate(self, params, mesh, *, final: bool = False, task_state: Any = None) -> dict[str, float]:
        """`linear_probe_accuracy`: the probe of the EMA target encoder (given the task state;
        what the issue and the paper evaluate and `mmjax export` writes by default);
        `online_linear_probe_accuracy`: the online context encoder's; the baselines; collapse
        statistics of the online encoder's features."""
        online = self._train_test_features(params)
        target = online if task_state is None else self._train_test_features({**params, "encoder": task_state["target"]})
        out = {**self._probe_metrics("linear_probe_accuracy", *target),
               **self._probe_metrics("online_linear_probe_accuracy", *online), **self.baselines()}
        te = online[1]
        centred = te - te.mean(0)
        s = np.linalg.svd(centred, compute_uv=False)
        p = s / max(s.sum(), 1e-12)
        out["feature_std"] = float(te.std(0).mean())
        out["effective_rank"] = float(np.exp(-np.sum(p * np.log(np.maximum(p, 1e-12)))))
        batch = jax.tree_util.tree_map(jnp.asarray, self._eval_batch)
        out["val_loss"] = float(self._val_loss(params, batch))
        if final and jax.process_index() == 0:
            import os

            name = "trained (EMA target)" if task_state is not None else "trained (online)"
            feats = {name: target[1], "random init": self._init_test_features,
                     "pixels": self.data.test.images.reshape(len(self.data.test), -1)}
            acc = [out["linear_probe_accuracy"], out["random_init_probe_accuracy"], out["pixel_probe_accuracy"]]
            save_feature_pca(feats, self.data.test.labels, os.path.join(self.workdir, "features.png"),
                             [f"linear probe {a:.3f}" for a in acc])
        return out


def save_feature_pca(features: dict[str, np.ndarray], labels: np.ndarray, path: str,
                     notes: list[str] | None = None) -> str:
    """One panel per feature set: the test images on their features' top two principal
    components, coloured by digit (PNG)."""
    import os

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.6 * len(features) + 0.8, 3.9), dpi=100)
    FigureCanvasAgg(fig)
    for i, (name, f) in enumerate(features.items()):
        ax = fig.add_subplot(1, len(features), i + 1)
        centred = np.asarray(f, np.float64) - np.mean(f, 0)
        _, sv, vt = np.linalg.svd(centred, full_matrices=False)
        xy = centred @ vt[:2].T
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10", s=7, vmin=-0.5, vmax=9.5)
        share = float((sv[:2] ** 2).sum() / max((sv ** 2).sum(), 1e-12))
        note = f"\n{notes[i]}" if notes else ""
        ax.set_title(f"{name}\ntop-2 PCs: {share:.0%} of the variance{note}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.subplots_adjust(top=0.78, bottom=0.04, left=0.02, right=0.9, wspace=0.08)
    fig.colorbar(sc, cax=fig.add_axes([0.92, 0.08, 0.012, 0.66]), label="digit", ticks=range(10))
    fig.suptitle(f"{len(labels)} held-out canvases, mean-pooled features", fontsize=9, y=0.99)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    return path
