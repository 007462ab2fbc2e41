"""Flamingo training: a frozen image tower and a frozen LM, the Perceiver Resampler and the
gated cross-attention blocks trained on interleaved image-text data, evaluated by few-shot
in-context classification.

    ExperimentConfig(task="flamingo", model=FlamingoConfig(...),
                     data=FlamingoDataConfig(seq_len=64, max_images=5, tokenizer="workdirs/llm_text"),
                     optimizer=OptimizerConfig(freeze=FROZEN),       # FROZEN: tower + LM
                     init_from=(InitSource("workdirs/clip_digits", "vision", "vision"),
                                InitSource("workdirs/llm_text", "", "language_model")))

Data: `mmjax.data.interleaved` (M3W-like interleaved digit documents mixed 1.0 : 0.2 with
image-text pairs of digits, scikit-image photos and LFW faces; up to `max_images` images per
`seq_len`-token window; resumable grain state). Loss: next-token cross-entropy on the
interleaved data's `loss_mask` (text, `<|endofchunk|>` and EOS targets; never `<image>`, never
padding). A batch whose loss mask is all zeros contributes nothing (count 0, the loop divides
by the total count): no NaN (open_flamingo#215).

Tokenizer: `data.tokenizer` names a sentencepiece model (a `.model` file or a workdir holding
one: the frozen LM's own); it must hold `<image>` and `<|endofchunk|>` as single pieces, and
its size must be the LM's vocabulary plus `model.additional_vocab_size`. None trains a small BPE
tokenizer on the data's text (tests, from-scratch runs). It is copied into the workdir.

Freezing: `optimizer.freeze` takes the regexes of what stays frozen; Flamingo's recipe is
`FROZEN` (the image tower and the whole LM, its embedding table included), so the resampler,
the gated blocks and any additional rows train (`mmjax.models.flamingo.TRAINABLE`). Unfreezing
the tower (and raising the resolution with `interpolate_pos_encoding`) is the fine-tuning option.

Evaluation (`mmjax.eval.few_shot`): `val_loss` / `val_ppl` (teacher-forced, held-out documents
of the test split); at the end of training (and at every evaluation when `data.eval_every_time`)
`few_shot_accuracy` {"0", "4", "8"} (random demos from the training split, prompts
`<image>Output:{name}<|endofchunk|>`), `few_shot_accuracy_rices` (demos chosen by the frozen
tower's [CLS]-feature cosine similarity to the query) and `episodic_accuracy` (classes renamed to
fresh nonsense words given only in the context: 0 shots is chance) on `data.eval_queries`
held-out digits, answers ranked over the class names.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from mmjax.data.interleaved import InterleavedDataConfig
from mmjax.errors import ConfigError
from mmjax.train.task import Task

FROZEN = (r"^vision/", r"^language_model/")


@dataclasses.dataclass(frozen=True)
class FlamingoDataConfig(InterleavedDataConfig):
    """The interleaved data (`InterleavedDataConfig`'s fields) plus the tokenizer and the
    evaluation.

    tokenizer: .model file or workdir; None: train a BPE tokenizer of `vocab_size` pieces.
    eval_batches: held-out batches of the test split for `val_loss`.
    eval_queries: held-out digits classified few-shot (per shot count and selection).
    eval_shots: the shot counts (Flamingo: 0, 4, 8; more than max_images is fine: the model
      reads any number of images, training windows just never held more).
    eval_rices, eval_episodic: also the RICES and the nonsense-word evaluations.
    eval_every_time: run the few-shot evaluations at every evaluation, not only the final one.
    """

    tokenizer: str | None = None
    vocab_size: int = 512
    eval_batches: int = 4
    eval_queries: int = 200
    eval_shots: tuple[int, ...] = (0, 4, 8)
    eval_rices: bool = True
    eval_episodic: bool = True
    eval_every_time: bool = False
    eval_batch_size: int = 32

    NAME = "flamingo data"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.eval_shots, list):
            object.__setattr__(self, "eval_shots", tuple(self.eval_shots))
        if not self.eval_shots or any(not isinstance(k, int) or k < 0 for k in self.eval_shots):
            raise ConfigError(f"data.eval_shots={self.eval_shots!r}: give shot counts >= 0, e.g. (0, 4, 8)")
        for name in ("vocab_size", "eval_queries", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"data.{name} must be positive, got {getattr(self, name)}")
        if self.eval_batches < 0:
            raise ConfigError(f"data.eval_batches must be >= 0, got {self.eval_batches}")


class FlamingoTask(Task):
    """Flamingo on interleaved data (see the module docstring)."""

    unit = "examples"
    data_config_class = FlamingoDataConfig

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        super().validate_config(cfg)
        m, d = cfg.model, cfg.data
        if d.seq_len > m.text.max_len:
            raise ConfigError(f"data.seq_len={d.seq_len} exceeds the language model's max_len="
                              f"{m.text.max_len}")
        if m.vision.image_hw != (d.image_size, d.image_size):
            raise ConfigError(f"data.image_size={d.image_size} but the image tower takes "
                              f"{m.vision.image_hw}: make them equal")

    def __init__(self, cfg: Any, workdir: str, log: Callable[[str], None] = print):
        super().__init__(cfg, workdir, log)
        from mmjax.data.interleaved import marker_ids

        d = cfg.data
        self.tokenizer = self._tokenizer(cfg, workdir, log)
        tok = self.tokenizer
        markers = marker_ids(tok)  # InputError naming a missing <image> / <|endofchunk|>
        extra = cfg.model.additional_vocab_size
        if tok.vocab_size <= extra:
            raise ConfigError(f"the tokenizer has {tok.vocab_size} pieces, not more than "
                              f"model.additional_vocab_size={extra}")
        text = cfg.model.text.replace(vocab_size=tok.vocab_size - extra, bos_token_id=tok.bos_id,
                                      eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        self.model_config = cfg.model.replace(text=text, image_token_index=markers.image,
                                              end_of_chunk_token_id=markers.end_of_chunk)
        self.model = self.build_model(self.model_config)
        self.units_per_step = d.batch_size
        self._eval_loss = None
        self._eval_rows = None
        self._embed = None
        model, config = self.model, self.model_config

        def init_params(rng):
            from mmjax.models import example_inputs

            return model.init(rng, *example_inputs(self.family, config))["params"]

        self.init_params = init_params
        self.loss = self._loss_fn()

    # --- data -------------------------------------------------------------------------------
    def _tokenizer(self, cfg, workdir: str, log):
        from mmjax.data.interleaved import filler_sentences
        from mmjax.data.tokenizer import Tokenizer

        from mmjax.tasks.text_data import workdir_tokenizer

        tok, target = workdir_tokenizer(workdir, cfg.data.tokenizer, log)
        if tok is not None:
            return tok
        from mmjax.data.digits import DIGIT_NAMES, TRAIN_TEMPLATES, caption

        texts = [caption(t, y) for t in TRAIN_TEMPLATES for y in range(10)]
        texts += [f"Output:{n}" for n in DIGIT_NAMES] + list(filler_sentences("train"))[:200]
        if jax.process_index() == 0:
            Tokenizer.train(["\n".join(texts)] * 2, target, cfg.data.vocab_size, model_type="bpe",
                            seed=cfg.data.seed)
        log(f"trained a bpe sentencepiece tokenizer (vocab {cfg.data.vocab_size}) -> {target}")
        return Tokenizer.load(target)

    def train_iterator(self):
        from mmjax.data.interleaved import make_interleaved_dataset

        d = self.cfg.data
        count = jax.process_count()
        if d.batch_size % count:
            raise ConfigError(f"data.batch_size={d.batch_size} is not divisible by the {count} "
                              "processes")
        cfg = d.replace(batch_size=d.batch_size // count)
        ds = make_interleaved_dataset(cfg, self.tokenizer, split="train", seed=d.seed,
                                      process_index=jax.process_index(), process_count=count)
        return iter(ds)

    # --- objective --------------------------------------------------------------------------
    def _loss_fn(self):
        model = self.model
        dropout = max(self.model_config.dropout, self.model_config.text.dropout)

        def loss_fn(params, batch, rng):
            kw = {}
            if rng is not None and dropout > 0:
                kw = {"deterministic": False, "rngs": {"dropout": rng}}
            logits = model.apply({"params": params}, batch["tokens"], batch["images"],
                                 image_valid=batch["image_valid"], input_mask=batch["input_mask"], **kw)
            weights = batch["loss_mask"].astype(jnp.float32)
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
            return jnp.sum(nll * weights), jnp.sum(weights), {}

        return loss_fn

    # --- evaluation -------------------------------------------------------------------------
    def _held_out_batches(self) -> list[dict[str, np.ndarray]]:
        from mmjax.data.interleaved import make_interleaved_dataset

        if self._eval_rows is None:
            d = self.cfg.data
            cfg = d.replace(batch_size=d.eval_batch_size, num_epochs=None)
            it = iter(make_interleaved_dataset(cfg, self.tokenizer, split="test", seed=d.seed + 1))
            self._eval_rows = [next(it) for _ in range(d.eval_batches)]
        return self._eval_rows

    def evaluate(self, params: Any, mesh: Mesh | None, *, final: bool = False) -> dict[str, float]:
        from mmjax.train.step import make_eval_step, shard_batch

        out: dict[str, float] = {}
        if self.cfg.data.eval_batches:
            if self._eval_loss is None:
                self._eval_loss = make_eval_step(self.loss, mesh=mesh)
            total = count = 0.0
            for batch in self._held_out_batches():
                s, c, _ = self._eval_loss(params, shard_batch(batch, mesh))
                total, count = total + float(s), count + float(c)
            if count:
                out["val_loss"] = total / count
                out["val_ppl"] = math.exp(min(out["val_loss"], 700.0))
        if final or self.cfg.data.eval_every_time:
            out.update(self.few_shot_metrics(params))
        return out

    def _pools(self):
        from mmjax.data.interleaved import image_pool

        d = self.cfg.data
        support = image_pool("digits", "train", d.image_size, d.test_fraction, d.split_seed)
        test = image_pool("digits", "test", d.image_size, d.test_fraction, d.split_seed)
        rng = np.random.default_rng(d.seed + 7)
        pick = rng.permutation(len(test))[:d.eval_queries]
        return support, test.images[pick], test.labels[pick]

    def image_embeddings(self, params: Any, images: np.ndarray, batch: int = 256) -> np.ndarray:
        """The frozen tower's pooled ([CLS], final-LayerNorm) features of `images` [N, H, W, C]:
        what RICES ranks demos by."""
        if self._embed is None:  # compiled once per task, not per evaluation
            self._embed = jax.jit(lambda p, x: self.model.apply({"params": p}, x,
                                                                method=lambda m, x: m.vision(x)))
        fn = self._embed
        return np.concatenate([np.asarray(fn(params, images[i:i + batch]))
                               for i in range(0, len(images), batch)])

    def few_shot_metrics(self, params: Any) -> dict[str, Any]:
        """`few_shot_accuracy`, `few_shot_accuracy_rices`, `episodic_accuracy` (module docstring)."""
        from mmjax.data.digits import DIGIT_NAMES
        from mmjax.eval import few_shot

        d = self.cfg.data
        support, q_images, q_labels = self._pools()
        common = dict(shots=d.eval_shots, seed=d.seed, batch_size=d.eval_batch_size)
        args = (self.model, params, self.tokenizer, support.images, support.labels, q_images, q_labels)
        out: dict[str, Any] = {"few_shot_accuracy": few_shot.few_shot_accuracy(
            *args, list(DIGIT_NAMES), selection="random", **common)}
        if d.eval_rices:
            emb = (self.image_embeddings(params, support.images), self.image_embeddings(params, q_images))
            out["few_shot_accuracy_rices"] = few_shot.few_shot_accuracy(
                *args, list(DIGIT_NAMES), selection="rices", embeddings=emb, **common)
        if d.eval_episodic:
            out["episodic_accuracy"] = few_shot.episodic_accuracy(*args, **common)
        return out

    def sample(self, params: Any, step: int) -> str | None:
        return None

    def describe(self) -> str:
        c, d = self.model_config, self.cfg.data
        per = c.tokens_per_image
        return (f"{self.family} ({c.layout}): ViT dim={c.vision.dim} x{c.vision.num_layers} -> "
                f"{'resampler ' + str(per) + ' latents' if c.use_resampler else str(per) + ' tokens'} "
                f"-> {c.num_cross_layers} gated blocks in {type(c.text).__name__} dim={c.text.dim} "
                f"x{c.text.num_layers} vocab={c.vocab_size}; interleaved data batch "
                f"{d.batch_size} x {d.seq_len}, <= {d.max_images} images")
