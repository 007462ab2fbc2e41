"""Image classification: a ViT on labelled images, cross-entropy, test accuracy.

    ExperimentConfig(task="classification", model=ViTConfig(...), data=ImageDataConfig(...),
                     init_from="workdirs/clip_digits", init_from_prefix="vision")  # fine-tune

The model's `num_classes` follows the dataset (0 in the config = fill in); `image_size` must
equal the data's. Loss: mean softmax cross-entropy. Evaluation: test loss and top-1 accuracy
over the whole test split. Samples: a few test images with their true and predicted
classes.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax.errors import ConfigError
from mmjax.tasks import image_data
from mmjax.tasks.image_data import ImageDataConfig
from mmjax.train.task import Task


class ImageClassificationTask(Task):
    """Softmax classification of images with a ViT."""

    unit = "images"
    data_config_class = ImageDataConfig

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        super().validate_config(cfg)
        size = cfg.data.image_size
        if cfg.model.image_hw != (size, size):
            raise ConfigError(f"model.image_size {cfg.model.image_hw} must equal data.image_size={size}")

    def __init__(self, cfg: Any, workdir: str, log: Callable[[str], None] = print):
        super().__init__(cfg, workdir, log)
        self.data = image_data.load(cfg.data)
        self.class_names = tuple(self.data.class_names)
        n = len(self.class_names)
        if cfg.model.num_classes not in (0, n):
            raise ConfigError(f"model.num_classes={cfg.model.num_classes} but the {cfg.data.dataset} "
                              f"dataset has {n} classes (0 = take the dataset's)")
        self.model_config = cfg.model.replace(num_classes=n)
        self.model = self.build_model(self.model_config)
        self.units_per_step = cfg.data.batch_size
        h, w = self.model_config.image_hw
        self._example = jnp.zeros((1, h, w, self.model_config.channels), jnp.float32)
        self._predict = jax.jit(lambda p, x: self.model.apply({"params": p}, x))

    def describe(self) -> str:
        c = self.model_config
        return (f"ViT dim={c.dim}, layers={c.num_layers}, heads={c.num_heads}, patch={c.patch_hw}, "
                f"pool={c.pool}; {len(self.data.train)} train / {len(self.data.test)} test images, "
                f"batch {self.cfg.data.batch_size}")

    def init_params(self, rng: jax.Array) -> Any:
        return self.model.init(rng, self._example)["params"]

    def loss(self, params, batch, rng):
        logits = self.model.apply({"params": params}, batch["images"])
        labels = batch["labels"].astype(jnp.int32)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        n = jnp.float32(labels.shape[0])
        return jnp.sum(nll), n, {"train_accuracy": jnp.sum(correct) / n}

    def train_iterator(self):
        return image_data.train_iterator(self.data, self.cfg.data, with_text=False)

    def predict(self, params: Any, images: np.ndarray) -> np.ndarray:
        """Class probabilities [N, classes] for normalised images [N, H, W, C]."""
        out = []
        for (x,), real in image_data.eval_batches(images, batch_size=self.cfg.data.eval_batch_size):
            out.append(np.asarray(jax.nn.softmax(self._predict(params, x), -1))[:real])
        return np.concatenate(out)

    def evaluate(self, params, mesh, *, final: bool = False) -> dict[str, float]:
        test = self.data.test
        probs = self.predict(params, test.images)
        labels = np.asarray(test.labels)
        nll = -np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-30))
        return {"val_loss": float(nll.mean()),
                "test_accuracy": float(np.mean(probs.argmax(-1) == labels)),
                "test_images": float(len(labels))}

    def sample(self, params, step):
        test = self.data.test
        probs = self.predict(params, test.images[:8])
        parts = [f"{self.class_names[t]}->{self.class_names[p.argmax()]} ({p.max():.2f})"
                 for t, p in zip(test.labels[:8], probs)]
        return "true->predicted: " + ", ".join(parts)
