"""BLIP-2 stage 1: the Q-Former learns to read a frozen image encoder with ITC + ITM (hard
negatives) + ITG, before any LLM is attached.

    ExperimentConfig(task="blip2", model=Blip2Config(text=None, retrieval_heads=True,
                                                     qformer=QFormerConfig(text_input=True, lm_head=True)),
                     data=Blip2DataConfig(), optimizer=OptimizerConfig(freeze=(r"^vision/",)),
                     init_from=(InitSource("workdirs/clip_digits", "vision", "vision"),))

Stage 2 (the query outputs as a soft prompt of a frozen LLM; only the Q-Former and the
projection train) is the `visual_sft` task on the same `Blip2` family with an LLM in the config
and `init_from` this task's workdir: it is LLaVA's visual instruction tuning with another
connector, so it is not written twice.

Objectives (`mmjax.ops.blip2_losses`, `mmjax.ops.blip_losses`), one shared image forward per
step -- the image encoder is frozen in BLIP-2, so its output is a constant here
(`stop_gradient`; freeze `^vision/` too, so the optimizer state holds no moments for it):
  * ITC: sim [B, B] = max over the Q query outputs of cos(query, text [CLS]) (unimodal mask:
    queries and text do not see each other), symmetric InfoNCE at a learned temperature
    (`itc_temp`, init `data.temperature_init`, used clipped to [0.001, 0.5]).
  * ITM: the bidirectional mask; for each image a hard-negative text and for each text a
    hard-negative image drawn ∝ softmax(sim / temperature), never a caption of the same digit
    (not a negative); the ITM head averaged over the query outputs; 2-way CE on B positives
    and 2B negatives.
  * ITG: the causal mask (queries see queries, text sees all queries and earlier text); the
    caption with its first token replaced by [DEC], the Q-Former's LM head, CE with
    `label_smoothing`.
The step's loss is their sum.

Tokens: the digits' word-level caption tokenizer ([BOS] words [EOS], padding 0) plus [DEC] =
its vocab_size, so the Q-Former's vocabulary is the tokenizer's + 1 (set by the task).

Data: scikit-learn's real digits (`mmjax.data.digits`, stratified train / held-out split); each
training image gets a caption template drawn anew per epoch (seeded; resumable).

Evaluation (held-out images -- all, or the first `data.eval_limit` --, one clean caption each): `retrieval_recall_at_1` (= `i2t_r@1`,
class-level image->text ITC retrieval; `t2i_r@K` beside it), `itm_accuracy` (each image with its
caption and a caption of another digit, p(match) > 0.5), `itg_caption_accuracy` (the Q-Former's
own greedy caption names the digit), `val_loss`.

The workdir holds plain `Blip2` params (the temperature is the model's `itc_temp`), so
`mmjax export` / `load_for_inference` read it, and stage 2 takes `vision`, `query_tokens` and
`qformer` from it (`InitSource(workdir, "", "")`: what matches by path and shape).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.data.digits import caption_label
from mmjax.errors import ConfigError
from mmjax.eval.retrieval import similarity_recall
from mmjax.ops.blip2_losses import itc_similarity_loss, max_query_similarity
from mmjax.ops.blip_losses import itm_loss, lm_loss, sample_hard_negatives
from mmjax.tasks import image_data
from mmjax.tasks.image_data import ImageDataConfig
from mmjax.train.task import Task

TEMP_RANGE = (0.001, 0.5)


@dataclasses.dataclass(frozen=True)
class Blip2DataConfig(ImageDataConfig):
    """Image-caption pairs (the digits) and BLIP-2 stage 1's objective settings."""

    label_smoothing: float = 0.1  # ITG
    temperature_init: float = 0.07  # ITC, learned
    eval_limit: int = 0  # evaluate on the first N held-out images (0 = all of them)

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"data.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not TEMP_RANGE[0] <= self.temperature_init <= TEMP_RANGE[1]:
            raise ConfigError(f"data.temperature_init must be in {list(TEMP_RANGE)}, got {self.temperature_init}")
        if self.eval_limit < 0 or self.eval_limit == 1:
            raise ConfigError(f"data.eval_limit must be 0 (all) or >= 2, got {self.eval_limit}")


class _CaptionIterator:
    """Endless shuffled batches; each image's caption template drawn per (seed, epoch);
    `get_state` / `set_state` resume exactly."""

    def __init__(self, images, labels, tokens, mask, batch_size: int, seed: int):
        self.images, self.labels = images, labels
        self.tokens, self.mask = tokens, mask  # [templates, 10, L] per template and digit
        self.batch, self.seed = batch_size, seed
        self.epoch, self.pos = 0, 0
        self._draw()

    def _draw(self):
        rng = np.random.default_rng((self.seed, self.epoch))
        self._order = rng.permutation(len(self.labels))
        self._template = rng.integers(self.tokens.shape[0], size=len(self.labels))

    def __iter__(self):
        return self

    def __next__(self):
        if self.pos + self.batch > len(self._order):
            self.epoch, self.pos = self.epoch + 1, 0
            self._draw()
        idx = self._order[self.pos:self.pos + self.batch]
        self.pos += self.batch
        lab, tpl = self.labels[idx], self._template[idx]
        return {"images": self.images[idx], "tokens": self.tokens[tpl, lab], "input_mask": self.mask[tpl, lab],
                "text_class": lab.astype(np.int32)}

    def get_state(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def set_state(self, state):
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._draw()


class Blip2Stage1Task(Task):
    """ITC + ITM + ITG on the Q-Former (see the module docstring)."""

    unit = "images"
    data_config_class = Blip2DataConfig

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        super().validate_config(cfg)
        m = cfg.model
        if m.text is not None:
            raise ConfigError("task 'blip2' is BLIP-2 stage 1 (the Q-Former alone): set model.text=None; "
                              "stage 2 (with an LLM) is task 'visual_sft'")
        if not m.retrieval_heads or not m.qformer.lm_head:
            raise ConfigError("task 'blip2' trains ITC, ITM and ITG: set model.retrieval_heads=True and "
                              "model.qformer.lm_head=True")
        size = cfg.data.image_size
        if m.vision.image_hw != (size, size):
            raise ConfigError(f"model.vision.image_size {m.vision.image_hw} must equal data.image_size={size}")
        if m.qformer.max_len < cfg.data.max_text_len:
            raise ConfigError(f"model.qformer.max_len={m.qformer.max_len} is shorter than "
                              f"data.max_text_len={cfg.data.max_text_len}")

    def __init__(self, cfg: Any, workdir: str, log: Callable[[str], None] = print):
        super().__init__(cfg, workdir, log)
        from mmjax.data.digits import caption

        d = cfg.data
        self.data = image_data.load(d)
        tok = self.data.tokenizer
        self.dec_id = tok.vocab_size
        q = cfg.model.qformer.replace(vocab_size=tok.vocab_size + 1, bos_token_id=self.dec_id, pad_token_id=tok.pad_id)
        self.model_config = cfg.model.replace(qformer=q)
        self.model = self.build_model(self.model_config)
        self.units_per_step = d.batch_size
        templates = self.data.train_templates
        texts = [caption(t, y) for t in templates for y in range(10)]
        tokens, mask = tok.encode(texts, d.max_text_len)
        self._tokens = tokens.reshape(len(templates), 10, -1)
        self._mask = mask.reshape(len(templates), 10, -1)
        from mmjax.models import example_inputs

        self._example = example_inputs("blip2", self.model_config)
        self._jit_loss = jax.jit(lambda p, b: self.loss(p, b, None))
        self._jit_feats = jax.jit(self._itc_feats)
        self._jit_match = jax.jit(self._match_prob)
        self._jit_caption = jax.jit(self._greedy)

    def train_iterator(self):
        if jax.process_count() > 1:
            raise ConfigError("task 'blip2' runs in one process (its pairs are not sharded over hosts)")
        train = self.data.train
        return _CaptionIterator(train.images, np.asarray(train.labels), self._tokens, self._mask,
                                self.cfg.data.batch_size, self.cfg.data.seed)

    def describe(self) -> str:
        c = self.model_config
        v, q = c.vision, c.qformer
        return (f"BLIP-2 stage 1 (ITC + ITM + ITG): frozen ViT dim={v.dim} x{v.num_layers}, Q-Former dim={q.dim} "
                f"x{q.num_layers} (cross-attention every {q.cross_attention_frequency}), {c.num_query_tokens} "
                f"queries, vocab {q.vocab_size}; {len(self.data.train)} train / {len(self.data.test)} test images, "
                f"batch {self.cfg.data.batch_size}")

    # --- params -----------------------------------------------------------------------------
    def init_params(self, rng: jax.Array) -> Any:
        params = dict(self.model.init(rng, *self._example)["params"])
        params["itc_temp"] = nn.Partitioned(jnp.asarray(self.cfg.data.temperature_init, jnp.float32), names=())
        return params

    def temperature(self, params) -> jax.Array:
        return jnp.clip(params["itc_temp"], *TEMP_RANGE)

    def _apply(self, params, method, *args):
        return self.model.apply({"params": params}, *args, method=method)

    # --- objective --------------------------------------------------------------------------
    def loss(self, params, batch, rng):
        tokens, mask = batch["tokens"], batch["input_mask"]
        b = tokens.shape[0]
        embeds = jax.lax.stop_gradient(self._apply(params, "encode_images", batch["images"]))
        temp = self.temperature(params)
        itc = self._apply(params, lambda m, e, t, k: m.itc(None, t, k, image_embeds=e), embeds, tokens, mask)
        sim = itc["sim"]
        l_itc = itc_similarity_loss(sim, temp)
        cls = batch["text_class"]
        same = (cls[:, None] == cls[None, :]) & (cls[:, None] >= 0)
        key = jax.random.PRNGKey(0) if rng is None else rng
        neg_text, neg_image = sample_hard_negatives(key, sim, temp, same)
        itm = self._apply(params, lambda m, e, t, k: m.itm_logits(None, t, k, image_embeds=e),
                          jnp.concatenate([embeds, embeds, embeds[neg_image]]),
                          jnp.concatenate([tokens, tokens[neg_text], tokens]),
                          jnp.concatenate([mask, mask[neg_text], mask]))
        labels = jnp.concatenate([jnp.ones(b, jnp.int32), jnp.zeros(2 * b, jnp.int32)])
        l_itm = itm_loss(itm, labels)
        dec = tokens.at[:, 0].set(self.dec_id)
        itg = self._apply(params, lambda m, e, t, k: m.itg_logits(None, t, k, image_embeds=e), embeds, dec, mask)
        l_itg = lm_loss(itg, dec, mask, self.cfg.data.label_smoothing)
        acc = jnp.mean((jnp.argmax(itm, -1) == labels).astype(jnp.float32))
        return l_itc + l_itm + l_itg, jnp.float32(1.0), {
            "itc_loss": l_itc, "itm_loss": l_itm, "itg_loss": l_itg, "temperature": temp, "batch_itm_acc": acc}

    # --- evaluation -------------------------------------------------------------------------
    def _itc_feats(self, params, images, tokens, mask):
        out = self._apply(params, "itc", images, tokens, mask)
        return out["image_feats"], out["text_feat"]

    def _match_prob(self, params, images, tokens, mask):
        return jax.nn.softmax(self._apply(params, "itm_logits", images, tokens, mask), -1)[:, 1]

    def _greedy(self, params, images):
        """The Q-Former's own greedy captions [B, max_text_len] ([DEC] first, padding after [EOS])."""
        tok, length = self.data.tokenizer, self.cfg.data.max_text_len
        embeds = self._apply(params, "encode_images", images)
        vocab = self.model_config.qformer.vocab_size
        banned = jnp.zeros(vocab, bool).at[jnp.asarray([tok.pad_id, tok.bos_id, self.dec_id])].set(True)
        b = images.shape[0]
        tokens = jnp.zeros((b, length), jnp.int32).at[:, 0].set(self.dec_id)

        def step(t, carry):
            tokens, done = carry
            mask = jnp.broadcast_to(jnp.arange(length) <= t, (b, length))
            logits = self._apply(params, lambda m, e, x, k: m.itg_logits(None, x, k, image_embeds=e), embeds,
                                 tokens, mask)[:, t]
            nxt = jnp.argmax(jnp.where(banned, -jnp.inf, logits), -1).astype(jnp.int32)
            nxt = jnp.where(done, tok.pad_id, jnp.where(t == length - 2, tok.eos_id, nxt))
            return tokens.at[:, t + 1].set(nxt), done | (nxt == tok.eos_id)

        tokens, _ = jax.lax.fori_loop(0, length - 1, step, (tokens, jnp.zeros(b, bool)))
        return tokens

    def _batched(self, fn, *arrays):
        out = []
        for chunk, real in image_data.eval_batches(*arrays, batch_size=self.cfg.data.eval_batch_size):
            out.append(jax.tree_util.tree_map(lambda x: np.asarray(x)[:real], fn(*chunk)))
        return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *out)

    def captions(self, params, images: np.ndarray) -> list[str]:
        """The Q-Former's greedy ITG captions of `images`."""
        tok = self.data.tokenizer
        rows = self._batched(lambda x: self._jit_caption(params, x), images)
        out = []
        for row in rows:
            ids = []
            for i in row[1:]:
                if i in (tok.eos_id, tok.pad_id):
                    break
                ids.append(int(i))
            out.append(" ".join(tok.words[i - 2] for i in ids if 2 <= i < tok.eos_id))
        return out

    def test_captions(self) -> list[str]:
        from mmjax.data.digits import caption

        templates = self.data.train_templates
        return [caption(templates[i % len(templates)], int(c)) for i, c in enumerate(self.data.test.labels)]

    def evaluate(self, params, mesh, *, final: bool = False) -> dict[str, float]:
        d = self.cfg.data
        n = d.eval_limit or len(self.data.test)
        images, labels = self.data.test.images[:n], np.asarray(self.data.test.labels)[:n]
        texts = self.test_captions()[:n]
        tokens, mask = self.data.tokenizer.encode(texts, d.max_text_len)
        img, txt = self._batched(lambda x, t, m: self._jit_feats(params, x, t, m), images, tokens, mask)
        sim = np.asarray(max_query_similarity(jnp.asarray(img), jnp.asarray(txt)))
        out = similarity_recall(sim, labels, labels)
        out["retrieval_recall_at_1"] = out["i2t_r@1"]
        other = np.asarray([next(j for k in range(1, len(labels)) if labels[j := (i + k) % len(labels)] != labels[i])
                            for i in range(len(labels))])
        pos = self._batched(lambda x, t, m: self._jit_match(params, x, t, m), images, tokens, mask)
        neg = self._batched(lambda x, t, m: self._jit_match(params, x, t, m), images, tokens[other], mask[other])
        out["itm_accuracy"] = float(np.mean(np.concatenate([pos > 0.5, neg <= 0.5])))
        caps = self.captions(params, images)
        out["itg_caption_accuracy"] = float(np.mean([caption_label(c) == y for c, y in zip(caps, labels)]))
        b = d.batch_size
        losses = [float(self._jit_loss(params, {"images": images[i:i + b], "tokens": tokens[i:i + b],
                                                "input_mask": mask[i:i + b],
                                                "text_class": labels[i:i + b].astype(np.int32)})[0])
                  for i in range(0, len(labels) - b + 1, b)]
        out["val_loss"] = float(np.mean(losses)) if losses else float("nan")
        return out

    def sample(self, params, step):
        caps = self.captions(params, self.data.test.images[:4])
        return "Q-Former (ITG) captions of test images: " + "; ".join(
            f"[{int(y)}] {c!r}" for y, c in zip(self.data.test.labels[:4], caps))
