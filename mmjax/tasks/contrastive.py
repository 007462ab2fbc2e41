"""Contrastive image-text training (CLIP's ITC loss, or SigLIP's sigmoid loss), evaluated by
zero-shot classification, retrieval and a linear probe.

    ExperimentConfig(task="contrastive", model=CLIPConfig(...), data=ImageDataConfig(...))

The text tower's vocabulary, context and special ids follow the dataset's caption tokenizer
(0 / None in the config = fill in); the image tower's size must equal the data's. The loss is
`mmjax.ops.losses.clip_loss` (symmetric cross-entropy against arange(n)), or `siglip_loss` when
the model has a learned logit bias (`CLIPConfig.logit_bias_init`). With the batch sharded over
the mesh's data axes the loss is computed under jit on the global batch, so every device's
features take part (the value equals the single-device loss).

Evaluation on the held-out split (`mmjax.eval`):
  zero_shot_accuracy   top-1 with template ensembling over the zero-shot prompts (which are
                       phrased differently from the training captions), and zero_shot_top5
  i2t_r@K, t2i_r@K     retrieval recall@1/5/10 between test images and one training-style
                       caption per image; a hit is an item of the query's class (the digits
                       have 10 classes, so identical captions are equally correct)
  linear_probe_accuracy  logistic regression on the frozen image tower's pooled features
                       (before the projection, as the CLIP paper probes ViTs), fit on train
  val_loss             the contrastive loss on test batches of the training batch size
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.errors import ConfigError
from mmjax.eval.linear_probe import linear_probe_accuracy
from mmjax.eval.retrieval import retrieval_recall
from mmjax.eval.zero_shot import class_embeddings, zero_shot_accuracy
from mmjax.ops.losses import clip_loss, siglip_loss
from mmjax.tasks import image_data
from mmjax.tasks.image_data import ImageDataConfig
from mmjax.train.task import Task


class ContrastiveTask(Task):
    """CLIP / SigLIP on an image-caption dataset."""

    unit = "images"
    data_config_class = ImageDataConfig

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        super().validate_config(cfg)
        size = cfg.data.image_size
        if cfg.model.vision.image_hw != (size, size):
            raise ConfigError(f"model.vision.image_size {cfg.model.vision.image_hw} must equal "
                              f"data.image_size={size}")
        if cfg.model.text.max_len < cfg.data.max_text_len:
            raise ConfigError(f"model.text.max_len={cfg.model.text.max_len} is shorter than "
                              f"data.max_text_len={cfg.data.max_text_len}")

    def __init__(self, cfg: Any, workdir: str, log: Callable[[str], None] = print):
        super().__init__(cfg, workdir, log)
        self.data = image_data.load(cfg.data)
        tok = self.data.tokenizer
        text = cfg.model.text.replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                      eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        self.model_config = cfg.model.replace(text=text)
        self.model = self.build_model(self.model_config)
        self.objective = "siglip" if self.model_config.logit_bias_init is not None else "clip"
        self.units_per_step = cfg.data.batch_size
        h, w = self.model_config.vision.image_hw
        example_tokens, _ = tok.encode([self.data.class_names[0]], cfg.data.max_text_len)
        self._example = (jnp.zeros((1, h, w, self.model_config.vision.channels), jnp.float32),
                         jnp.asarray(example_tokens))
        m = self.model
        self._encode_image = jax.jit(lambda p, x: m.apply({"params": p}, x, method="encode_image"))
        self._image_features = jax.jit(lambda p, x: m.apply(
            {"params": p}, x, return_intermediates=True, method="encode_image")[1]["pooled"])
        self._encode_text = jax.jit(lambda p, t, msk: m.apply(
            {"params": p}, t, input_mask=msk, method="encode_text"))
        self._eval_loss = jax.jit(lambda p, b: self.loss(p, b, None)[0])

    def describe(self) -> str:
        v, t = self.model_config.vision, self.model_config.text
        return (f"CLIP ({self.objective} loss): image ViT dim={v.dim} x{v.num_layers} patch={v.patch_hw}, "
                f"text dim={t.dim} x{t.num_layers} vocab={t.vocab_size}, projection "
                f"{self.model_config.projection_dim}; {len(self.data.train)} train / "
                f"{len(self.data.test)} test images, batch {self.cfg.data.batch_size}")

    def init_params(self, rng: jax.Array) -> Any:
        return self.model.init(rng, *self._example)["params"]

    def loss(self, params, batch, rng):
        out = self.model.apply({"params": params}, batch["images"], batch["tokens"],
                               input_mask=batch["input_mask"])
        img, txt, scale = out["image_embeds"], out["text_embeds"], out["logit_scale"]
        if self.objective == "siglip":
            loss = siglip_loss(img, txt, scale, out["logit_bias"])
        else:
            loss = clip_loss(img, txt, scale)
        # within-batch image->text top-1 (pairs of the same class count as misses: a lower bound)
        hits = jnp.argmax(out["logits_per_image"], -1) == jnp.arange(img.shape[0])
        return loss, jnp.float32(1.0), {"logit_scale": scale,
                                        "batch_i2t_acc": jnp.mean(hits.astype(jnp.float32))}

    def train_iterator(self):
        return image_data.train_iterator(self.data, self.cfg.data, with_text=True)

    # --- evaluation -------------------------------------------------------------------------
    def _images(self, fn, params, images) -> np.ndarray:
        out = []
        for (x,), real in image_data.eval_batches(images, batch_size=self.cfg.data.eval_batch_size):
            out.append(np.asarray(fn(params, x))[:real])
        return np.concatenate(out)

    def _texts(self, params, texts: list[str]) -> np.ndarray:
        tokens, mask = self.data.tokenizer.encode(texts, self.cfg.data.max_text_len)
        out = []
        for (t, m), real in image_data.eval_batches(tokens, mask, batch_size=self.cfg.data.eval_batch_size):
            out.append(np.asarray(self._encode_text(params, t, m))[:real])
        return np.concatenate(out)

    def class_embeddings(self, params) -> np.ndarray:
        """One unit-norm text embedding per class, ensembled over the zero-shot templates."""
        from mmjax.data.digits import class_prompts

        prompts = class_prompts(self.data.zero_shot_templates)
        return class_embeddings(lambda texts: self._texts(params, texts), prompts)

    def test_captions(self) -> tuple[list[str], np.ndarray]:
        """One training-style caption per test image (template i mod T), and their labels."""
        from mmjax.data.digits import caption

        labels = np.asarray(self.data.test.labels)
        templates = self.data.train_templates
        return [caption(templates[i % len(templates)], int(c)) for i, c in enumerate(labels)], labels

    def evaluate(self, params, mesh, *, final: bool = False) -> dict[str, float]:
        test, train = self.data.test, self.data.train
        img = self._images(self._encode_image, params, test.images)
        labels = np.asarray(test.labels)
        zs = zero_shot_accuracy(img, labels, self.class_embeddings(params), topk=(1, 5))
        texts, text_labels = self.test_captions()
        out = {"zero_shot_accuracy": zs["top1"], "zero_shot_top5": zs["top5"]}
        out.update(retrieval_recall(img, self._texts(params, texts), image_labels=labels,
                                    text_labels=text_labels))
        if final or self.cfg.eval_every:
            feats_train = self._images(self._image_features, params, train.images)
            feats_test = self._images(self._image_features, params, test.images)
            out["linear_probe_accuracy"] = linear_probe_accuracy(
                feats_train, np.asarray(train.labels), feats_test, labels)
        out["val_loss"] = self._test_loss(params, texts)
        return out

    def _test_loss(self, params, texts: list[str]) -> float:
        """The contrastive loss averaged over test batches of the training batch size."""
        b = self.cfg.data.batch_size
        tokens, mask = self.data.tokenizer.encode(texts, self.cfg.data.max_text_len)
        images = self.data.test.images
        losses = [float(self._eval_loss(params, {"images": images[i:i + b], "tokens": tokens[i:i + b],
                                                 "input_mask": mask[i:i + b]}))
                  for i in range(0, len(images) - b + 1, b)]
        return float(np.mean(losses)) if losses else float("nan")

    def predict(self, params, images: np.ndarray) -> np.ndarray:
        """Zero-shot class probabilities [N, classes] (softmax of the scaled cosines)."""
        img = self._images(self._encode_image, params, images)
        cls = self.class_embeddings(params)
        scale = float(np.exp(min(float(params["logit_scale"]), np.log(self.model_config.logit_scale_max or 1e9))))
        logits = scale * img @ cls.T
        logits -= logits.max(-1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(-1, keepdims=True)

    def sample(self, params, step):
        names = self.data.class_names
        probs = self.predict(params, self.data.test.images[:6])
        parts = []
        for t, p in zip(self.data.test.labels[:6], probs):
            top = np.argsort(-p)[:3]
            parts.append(f"[{names[t]}] " + " ".join(f"{names[i]}:{p[i]:.2f}" for i in top))
        return "zero-shot top-3 of test images: " + "; ".join(parts)
