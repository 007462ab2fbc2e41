"""BLIP pretraining (ITC + ITM with hard negatives + LM) on image-caption pairs, and the pieces
CapFilt needs (ITM match scores of pairs, greedy synthetic captions).

    ExperimentConfig(task="blip", model=BlipConfig(...), data=BlipDataConfig(noise_fraction=0.3))

Design. The paper's MED is one model: a ViT, and a BERT used three ways -- unimodal text
encoder (ITC), image-grounded encoder (ITM, cross-attention on) and image-grounded decoder (LM),
the encoder and decoder sharing every parameter except their self-attention layers. mmjax's
`Blip` module is one `task` per instance, so this task holds TWO `Blip` modules built from the
config -- a "retrieval" one (ITC + ITM heads, bidirectional encoder) and a "caption" one
(causal decoder + LM head) -- over ONE param tree in which the sharing is explicit:

    vision/...                 the ViT, shared by both (one image forward per step feeds all
                               three losses, as in the paper)
    text_encoder/...           the BERT trunk: embeddings, cross-attention, FFN, norms
    decoder/layers_i/{attn, attn_norm}   the decoder's own self-attention (share_text=True, the
                               paper's sharing); share_text=False: decoder/ is a whole BERT
    vision_proj, text_proj, itm_head, lm_transform, lm_norm, lm_bias   the heads
    itc_temp                   the learned ITC temperature (init 0.07, used clipped to [0.001, 0.5])

`_split` assembles each module's own tree from it (the caption module's `text_decoder` = the
shared trunk with the decoder's self-attention swapped in), so the gradients of all three
losses meet in the shared params. Why not two separately trained models: the paper's point is
that the filter and the captioner are fine-tuned from the same pretrained MED, and sharing
costs nothing here. The module's private `_itc`, `_itm` and `_lm_logits` + `text_decoder` are
applied on the shared image embeddings (the public methods re-encode the images); that is the
workaround for `Blip` offering no "from embeddings" entry points.

Tokens: the word-level caption tokenizer (`mmjax.data.digits.CaptionTokenizer`: [BOS]=1 words
[EOS], padding 0) plus two ids: [ENC] = vocab and [DEC] = vocab + 1. ITC reads the caption as tokenized ([BOS] as BLIP's
[CLS]), ITM replaces the first token by [ENC], LM by [DEC] and stops at [EOS] (BLIP's [SEP]).

Losses (`mmjax.ops.blip_losses`): itc_loss on the cosines / temperature; ITM on the B positive
pairs and 2B negatives (per image a text, per text an image; `itm_negatives="hard"` draws them
∝ softmax(sim / temperature) as BLIP does, "uniform" uniformly; pairs whose captions name the
same class are never drawn: they are not negatives -- read from the caption text, as BLIP
excludes captions of the same image); LM with `label_smoothing`. The step's loss is
itc_weight * ITC + itm_weight * ITM + lm_weight * LM (BLIP: 1, 1, 1); a zero weight skips that
objective's forward, which is how the CapFilt fine-tunes train the filter (ITC + ITM) and the
captioner (LM) apart, as the paper does. `data.start_from` (a "blip" workdir) starts a fresh run
from its latest params (the loop's `init_from` reads a model's own tree, not this composite one).

Momentum distillation (ALBEF/BLIP, off by default: `data.momentum=0`). With `data.momentum=m`
(BLIP: 0.995) the task keeps a train state of its own (`init_task_state`, carried through the
jitted step, sharded like the params and checkpointed by the loop; `mmjax.train.state`):
momentum copies of the image encoder, the text encoder and the two ITC projections
(`_MOMENTUM`), updated m * momentum + (1 - m) * online at the start of every step before they
encode the batch (ALBEF's order), and with `data.queue_size=Q > 0` ring buffers of the last Q
momentum image / text features and their caption classes. ITC then scores the online image
features against the momentum text features of the batch + the text queue (and the texts the
other way round), with targets alpha * softmax(momentum similarities / temperature) + (1 -
alpha) * hard (`data.alpha`, BLIP 0.4; hard = one-hot, or with `data.class_positives` every
entry of the same caption class: BLIP's idx-aware targets, which fit class-level captions).
The queues start as random unit vectors of class -1 (ALBEF starts them random) and fill
after Q / batch steps. Evaluation (`val_loss`) uses the plain in-batch ITC. As in BLIP only
ITC is distilled; not done: ALBEF's alpha warm-up over the first epoch.

Why ITM needs its own fine-tune at this size (measured, see experiments/blip_capfilt.py): at
init the [CLS] features of every image and every caption are almost the same (post-LN BERT,
0.02 init), so ITC sits at exactly ln(batch) for the first ~100-300 steps and the hard
negatives are random; trained jointly with LM, whose gradients dominate the shared trunk, the
ITM head stays at the 1:2 prior (loss 0.636 = H(1/3), every p(match) ~ 1/3 < 0.5), i.e.
text-blind: held-out `itm_accuracy` is then exactly 0.5 whatever the threshold. ITC + ITM
without LM learn (held-out ITM accuracy 0.81 after 600 steps on the noisy digits).

Data (`BlipDataConfig`, `mmjax.data.photo_captions`): the digits, and with `photos=True`
scikit-image's bundled photos and LFW faces as classes 10..19. Every training image gets ONE
fixed caption (a template drawn once per image, as a web alt-text is fixed); `clean_fraction` of
each class's images (seeded) are the known-clean subset; `noise_fraction` of the other (web)
images (seeded, exact) get another class's caption instead, the injected noise CapFilt must
find. `train_on` picks the pairs that train ("all", "clean": the fine-tune set, "web").
`pairs_file` (JSON {"image": [train-split rows], "text": [captions]}, optional "noisy" and
"clean" flags) replaces the generated pairs: a CapFilt-cleaned set, several captions per image
allowed.

Evaluation (held-out images -- all, or the first `data.eval_limit` --, one clean caption each): `i2t_r@K` / `t2i_r@K` class-level ITC
retrieval, `itm_accuracy` (positives vs captions of another class, p(match) > 0.5),
`itm_pair_accuracy` (how often an image's own caption outscores the other one: threshold-free,
0.5 for a text-blind head), `caption_accuracy` (the greedy caption names the image's class),
`val_loss` (the step's loss).
Inference: the workdir's params are this composite tree; `mmjax generate` /
`load_for_inference` load it as the captioner, one `Blip` with task="caption"
(`mmjax.train.inference.blip_caption_params`), with the caption vocabulary the task writes to
`caption_vocab.json`. Limits: one process (the pairs are not sharded over hosts).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.data.digits import caption_label
from mmjax.data.photo_captions import held_out_captions, load_caption_set, make_pairs
from mmjax.errors import ConfigError, InputError
from mmjax.eval.retrieval import retrieval_recall
from mmjax.ops.blip_losses import (
    class_targets,
    itc_loss,
    itc_momentum_loss,
    itm_loss,
    lm_loss,
    momentum_update,
    queue_push,
    sample_hard_negatives,
)
from mmjax.tasks import image_data
from mmjax.tasks.image_data import ImageDataConfig
from mmjax.train.inference import BLIP_VOCAB_FILE, blip_caption_params
from mmjax.train.task import Task

TEMP_RANGE = (0.001, 0.5)
_HEADS = ("vision_proj", "text_proj", "itm_head")
_LM_HEADS = ("lm_transform", "lm_norm", "lm_bias")
_MOMENTUM = ("vision", "text_encoder", "vision_proj", "text_proj")  # what the momentum encoder copies


TRAIN_ON = ("all", "clean", "web")


@dataclasses.dataclass(frozen=True)
class BlipDataConfig(ImageDataConfig):
    """Image-caption pairs (the digits, optionally beside scikit-image's photos) and BLIP's
    objective settings."""

    photos: bool = False  # add the bundled photos (mmjax.data.photo_captions) as classes 10..19
    noise_fraction: float = 0.0  # web images whose caption is replaced by another class's
    clean_fraction: float = 0.0  # training images held out as known-clean (never noisy)
    train_on: str = "all"  # which generated pairs train: "all", "clean" (the fine-tune set), "web"
    pairs_file: str = ""  # JSON {"image": [...], "text": [...]} replacing the generated pairs
    start_from: str = ""  # a "blip" workdir whose latest params start a fresh run (a fine-tune)
    label_smoothing: float = 0.1  # LM (BLIP's value)
    temperature_init: float = 0.07  # ITC, learned
    share_text: bool = True  # decoder shares all but self-attention with the text encoder
    itm_negatives: str = "hard"  # "hard": drawn by ITC similarity (BLIP); "uniform": any other class
    # the step's loss: itc_weight * ITC + itm_weight * ITM + lm_weight * LM (BLIP: 1, 1, 1); a
    # zero weight skips that objective (the filter fine-tune: LM 0; the captioner's: ITC, ITM 0)
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    lm_weight: float = 1.0
    # momentum distillation (ALBEF/BLIP; see the module docstring): 0 = off; BLIP 0.995
    momentum: float = 0.0
    queue_size: int = 0  # momentum features queued as extra ITC negatives (0 = batch only)
    alpha: float = 0.4  # weight of the momentum similarities in the ITC targets
    class_positives: bool = False  # ITC targets: every pair of the same caption class is positive
    eval_limit: int = 0  # evaluate on the first N held-out images (0 = all of them)

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.noise_fraction < 1.0:
            raise ConfigError(f"data.noise_fraction must be in [0, 1), got {self.noise_fraction}")
        if not 0.0 <= self.clean_fraction < 1.0:
            raise ConfigError(f"data.clean_fraction must be in [0, 1), got {self.clean_fraction}")
        if self.train_on not in TRAIN_ON:
            raise ConfigError(f"data.train_on must be one of {TRAIN_ON}, got {self.train_on!r}")
        if self.train_on == "clean" and not self.clean_fraction:
            raise ConfigError("data.train_on='clean' needs a clean subset (data.clean_fraction > 0)")
        if self.itm_negatives not in ("hard", "uniform"):
            raise ConfigError(f"data.itm_negatives must be 'hard' or 'uniform', got {self.itm_negatives!r}")
        weights = {k: getattr(self, k) for k in ("itc_weight", "itm_weight", "lm_weight")}
        if min(weights.values()) < 0 or not any(weights.values()):
            raise ConfigError(f"data.itc_weight / itm_weight / lm_weight must be >= 0, not all 0; got {weights}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"data.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not TEMP_RANGE[0] <= self.temperature_init <= TEMP_RANGE[1]:
            raise ConfigError(f"data.temperature_init must be in {list(TEMP_RANGE)}, got {self.temperature_init}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"data.momentum must be in [0, 1) (0 = no momentum encoder; BLIP 0.995), "
                              f"got {self.momentum}")
        if self.momentum and not self.itc_weight:
            raise ConfigError("data.momentum distils ITC, which is off (data.itc_weight=0); set "
                              "data.momentum=0 or data.itc_weight > 0")
        if self.queue_size < 0:
            raise ConfigError(f"data.queue_size must be >= 0, got {self.queue_size}")
        if self.queue_size and not self.momentum:
            raise ConfigError(f"data.queue_size={self.queue_size} queues momentum features: it needs "
                              "data.momentum > 0 (e.g. 0.995)")
        if self.queue_size and self.queue_size < self.batch_size:
            raise ConfigError(f"data.queue_size={self.queue_size} must hold at least one batch "
                              f"(data.batch_size={self.batch_size})")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"data.alpha must be in [0, 1], got {self.alpha}")
        if self.eval_limit < 0 or self.eval_limit == 1:
            raise ConfigError(f"data.eval_limit must be 0 (all) or >= 2, got {self.eval_limit}")


caption_digit = caption_label  # the digit a caption names, -1 for none (mmjax.data.digits)


class _PairIterator:
    """Endless shuffled batches of (image, caption) pairs; get_state / set_state for resume."""

    def __init__(self, images, tokens, mask, text_class, batch_size, seed):
        self.images, self.tokens, self.mask, self.text_class = images, tokens, mask, text_class
        self.batch, self.seed = batch_size, seed
        self.epoch, self.pos = 0, 0
        self._order = self._perm()

    def _perm(self):
        return np.random.default_rng((self.seed, self.epoch)).permutation(len(self.tokens))

    def __iter__(self):
        return self

    def __next__(self):
        if self.pos + self.batch > len(self._order):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._perm()
        idx = self._order[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return {"images": self.images[idx], "tokens": self.tokens[idx], "input_mask": self.mask[idx],
                "text_class": self.text_class[idx]}

    def get_state(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def set_state(self, state):
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._perm()


class BlipTask(Task):
    """BLIP's three objectives over one shared param tree (see the module docstring)."""

    unit = "images"
    data_config_class = BlipDataConfig

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        super().validate_config(cfg)  # the family's record lists "blip"; data=BlipDataConfig
        size = cfg.data.image_size
        if cfg.model.vision.image_hw != (size, size):
            raise ConfigError(f"model.vision.image_size {cfg.model.vision.image_hw} must equal data.image_size={size}")
        if cfg.model.text.max_len < cfg.data.max_text_len:
            raise ConfigError(f"model.text.max_len={cfg.model.text.max_len} is shorter than "
                              f"data.max_text_len={cfg.data.max_text_len}")

    def __init__(self, cfg: Any, workdir: str, log: Callable[[str], None] = print):
        super().__init__(cfg, workdir, log)
        d = cfg.data
        self.data = load_caption_set(d.image_size, d.test_fraction, d.seed, photos=d.photos)
        tok = self.data.tokenizer
        self.enc_id, self.dec_id = tok.vocab_size, tok.vocab_size + 1
        text = cfg.model.text.replace(vocab_size=tok.vocab_size + 2, causal=False)
        base = cfg.model.replace(text=text, task="retrieval", bos_token_id=self.dec_id,
                                 sep_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        self.caption_config = base.replace(task="caption", text=text.replace(causal=True))
        self.model_config = base
        self.captioner = self.build_model(self.caption_config)
        self.model = self.build_model(base)
        self.units_per_step = d.batch_size
        self._load_pairs()
        h, w = base.vision.image_hw
        self._example = (jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, h, w, base.vision.channels), jnp.float32))
        self._jit_loss = jax.jit(lambda p, b: self.loss(p, b, None))
        self._jit_itc = jax.jit(self._itc_feats)
        self._jit_itm = jax.jit(self._match_prob)
        self._jit_caption = jax.jit(self._greedy)
        self._start_params = jax.device_get(load_params(self, d.start_from)) if d.start_from else None
        if os.path.isdir(workdir) and jax.process_index() == 0:  # for mmjax generate (load_for_inference)
            with open(os.path.join(workdir, BLIP_VOCAB_FILE), "w") as f:
                json.dump({"words": list(tok.words), "enc_id": self.enc_id, "dec_id": self.dec_id}, f)

    # --- data -------------------------------------------------------------------------------
    def _load_pairs(self) -> None:
        """self.pair_rows / pair_texts / pair_noisy / pair_clean: every generated pair (or the
        pairs_file's); self.train_pairs: the indices into them that train (data.train_on)."""
        d, tok = self.cfg.data, self.data.tokenizer
        if d.pairs_file:
            with open(d.pairs_file) as f:
                spec = json.load(f)
            rows, texts = np.asarray(spec["image"], np.int64), list(spec["text"])
            if len(rows) != len(texts) or not len(rows) or rows.min() < 0 or rows.max() >= len(self.data.train):
                raise InputError(f"data.pairs_file {d.pairs_file}: 'image' and 'text' must be equally long, "
                                 f"non-empty, with rows in [0, {len(self.data.train)})")
            noisy = np.asarray(spec.get("noisy", np.zeros(len(rows), bool)), bool)
            clean = np.asarray(spec.get("clean", np.zeros(len(rows), bool)), bool)
        else:
            pairs = make_pairs(self.data, d.noise_fraction, d.clean_fraction, d.seed)
            rows, texts, noisy, clean = pairs.rows, pairs.texts, pairs.noisy, pairs.clean
        self.pair_rows, self.pair_texts, self.pair_noisy, self.pair_clean = rows, texts, noisy, clean
        self.pair_tokens, self.pair_mask = tok.encode(texts, d.max_text_len)
        self.pair_class = np.asarray([self.data.caption_class(t) for t in texts], np.int32)
        pick = {"all": np.ones(len(rows), bool), "clean": clean, "web": ~clean}[d.train_on]
        self.train_pairs = np.flatnonzero(pick)
        if len(self.train_pairs) < d.batch_size:
            raise ConfigError(f"data.train_on={d.train_on!r} leaves {len(self.train_pairs)} training pairs, fewer "
                              f"than data.batch_size={d.batch_size}")

    def train_iterator(self):
        if jax.process_count() > 1:
            raise ConfigError("task 'blip' runs in one process (its pairs are not sharded over hosts)")
        i = self.train_pairs
        return _PairIterator(self.data.train.images[self.pair_rows[i]], self.pair_tokens[i], self.pair_mask[i],
                             self.pair_class[i], self.cfg.data.batch_size, self.cfg.data.seed)

    def describe(self) -> str:
        v, t = self.model_config.vision, self.model_config.text
        return (f"BLIP (ITC + ITM + LM, share_text={self.cfg.data.share_text}): ViT dim={v.dim} x{v.num_layers} "
                f"patch={v.patch_hw}, BERT dim={t.dim} x{t.num_layers} vocab={t.vocab_size}; "
                f"{len(self.pair_rows)} pairs ({int(self.pair_noisy.sum())} noisy, {int(self.pair_clean.sum())} "
                f"clean), {len(self.train_pairs)} train ({self.cfg.data.train_on}), "
                f"{len(self.data.test)} test images, batch {self.cfg.data.batch_size}")

    # --- params -----------------------------------------------------------------------------
    def init_params(self, rng: jax.Array) -> Any:
        """The fresh shared tree (boxed), or with data.start_from that workdir's latest params in
        it (the loop's `init_from` reads a model's own tree, not this composite one)."""
        fresh = self._fresh_params(rng)
        if not self.cfg.data.start_from:
            return fresh
        loaded = self._start_params  # read once in __init__ (init_params runs under eval_shape / jit)
        boxed = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
        return jax.tree_util.tree_map(lambda f, v: f.replace_boxed(jnp.asarray(v)) if boxed(f) else jnp.asarray(v),
                                      fresh, loaded, is_leaf=boxed)

    def _fresh_params(self, rng: jax.Array) -> Any:
        k1, k2 = jax.random.split(rng)
        r = self.model.init(k1, *self._example)["params"]
        c = self.captioner.init(k2, *self._example)["params"]
        out = {"vision": r["vision"], "text_encoder": r["text_encoder"], **{k: r[k] for k in _HEADS},
               **{k: c[k] for k in _LM_HEADS}}
        dec = c["text_decoder"]
        if self.cfg.data.share_text:
            dec = {k: {"attn": v["attn"], "attn_norm": v["attn_norm"]} for k, v in dec.items()
                   if k.startswith("layers_")}
        out["decoder"] = dec
        out["itc_temp"] = nn.Partitioned(jnp.asarray(self.cfg.data.temperature_init, jnp.float32), names=())
        return out

    def _split(self, params) -> tuple[dict, dict]:
        """(the retrieval module's params, the caption module's params) from the shared tree."""
        retrieval = {"vision": params["vision"], "text_encoder": params["text_encoder"],
                     **{k: params[k] for k in _HEADS}}
        return retrieval, blip_caption_params(params, self.cfg.data.share_text)

    def temperature(self, params) -> jax.Array:
        return jnp.clip(params["itc_temp"], *TEMP_RANGE)

    # --- model pieces on shared image embeddings ----------------------------------------------
    def _embeds(self, rp, images):
        return self.model.apply({"params": rp}, images, method="encode_image")

    def _itc_on(self, rp, embeds, tokens, mask):
        return self.model.apply({"params": rp}, embeds, tokens, mask,
                                method=lambda m, e, t, k: m._itc(e, t, k)[:3])

    def _itm_on(self, rp, embeds, tokens, mask):
        tokens = tokens.at[:, 0].set(self.enc_id)
        return self.model.apply({"params": rp}, embeds, tokens, mask,
                                method=lambda m, e, t, k: m._itm(e, t, k)[0])

    def _lm_on(self, cp, embeds, tokens, mask):
        return self.captioner.apply({"params": cp}, embeds, tokens, mask,
                                    method=lambda m, e, t, k: m._lm_logits(m.text_decoder(t, None, k, e, None)))

    # --- objective --------------------------------------------------------------------------
    def init_task_state(self, params) -> Any:
        """The momentum encoder (copies of `_MOMENTUM`) and, with data.queue_size, the feature
        queues; None when data.momentum is 0 (the loop then keeps no task state)."""
        d = self.cfg.data
        if not d.momentum:
            return None
        # jnp.copy: own buffers (the step donates the state; params and copies must not alias)
        state = {"params": jax.tree_util.tree_map(jnp.copy, {k: params[k] for k in _MOMENTUM})}
        if d.queue_size:
            dim = self.model_config.embed_dim
            k1, k2 = jax.random.split(jax.random.PRNGKey(d.seed))

            def unit(key):  # random unit vectors, ALBEF's initial queue
                x = jax.random.normal(key, (d.queue_size, dim), jnp.float32)
                return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

            state.update(image_queue=unit(k1), text_queue=unit(k2),
                         class_queue=jnp.full((d.queue_size,), -1, jnp.int32), ptr=jnp.zeros((), jnp.int32))
        return state

    def loss(self, params, batch, rng):
        return self.state_loss(params, None, batch, rng)[:3]

    def state_loss(self, params, task_state, batch, rng):
        """The step's loss and the next task state (None stays None); see the module docstring."""
        d = self.cfg.data
        rp, cp = self._split(params)
        tokens, mask = batch["tokens"], batch["input_mask"]
        b = tokens.shape[0]
        embeds = self._embeds(rp, batch["images"])  # one image forward for all three losses
        temp = self.temperature(params)
        zero = jnp.float32(0.0)
        total, aux = zero, {"temperature": temp}
        new_state = None
        if d.itc_weight or d.itm_weight:
            image_feat, text_feat, sim = self._itc_on(rp, embeds, tokens, mask)
            if task_state is None:
                l_itc = itc_loss(image_feat, text_feat, temp)
            else:
                l_itc, new_state = self._itc_momentum(params, task_state, batch, image_feat, text_feat, temp)
            total, aux["itc_loss"] = total + d.itc_weight * l_itc, l_itc
        if d.itm_weight:
            cls = batch["text_class"]
            same = (cls[:, None] == cls[None, :]) & (cls[:, None] >= 0)
            key = jax.random.PRNGKey(0) if rng is None else rng
            neg_sim = sim if d.itm_negatives == "hard" else jnp.zeros_like(sim)
            neg_text, neg_image = sample_hard_negatives(key, neg_sim, temp, same)
            itm_embeds = jnp.concatenate([embeds, embeds, embeds[neg_image]])
            itm_tokens = jnp.concatenate([tokens, tokens[neg_text], tokens])
            itm_mask = jnp.concatenate([mask, mask[neg_text], mask])
            logits = self._itm_on(rp, itm_embeds, itm_tokens, itm_mask)
            labels = jnp.concatenate([jnp.ones(b, jnp.int32), jnp.zeros(2 * b, jnp.int32)])
            l_itm = itm_loss(logits, labels)
            total, aux["itm_loss"] = total + d.itm_weight * l_itm, l_itm
            aux["batch_itm_acc"] = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
        if d.lm_weight:
            lm_logits = self._lm_on(cp, embeds, tokens.at[:, 0].set(self.dec_id), mask)
            l_lm = lm_loss(lm_logits, tokens, mask, d.label_smoothing)
            total, aux["lm_loss"] = total + d.lm_weight * l_lm, l_lm
        return total, jnp.float32(1.0), aux, new_state

    def _itc_momentum(self, params, task_state, batch, image_feat, text_feat, temp):
        """(ITC with momentum distillation, the next task state): EMA first, then the momentum
        features of the batch, the loss against batch + queue, then the batch enqueued."""
        d = self.cfg.data
        online = jax.lax.stop_gradient({k: params[k] for k in _MOMENTUM})
        mom = momentum_update(task_state["params"], online, d.momentum)
        m_img, m_txt, _ = self._itc_on(mom, self._embeds(mom, batch["images"]), batch["tokens"], batch["input_mask"])
        m_img, m_txt = jax.lax.stop_gradient(m_img), jax.lax.stop_gradient(m_txt)
        cls = batch["text_class"].astype(jnp.int32)
        if d.queue_size:
            iq, tq, cq = task_state["image_queue"], task_state["text_queue"], task_state["class_queue"]
        else:
            iq = tq = jnp.zeros((0, m_img.shape[1]), jnp.float32)
            cq = jnp.zeros((0,), jnp.int32)
        hard = class_targets(cls, cq) if d.class_positives else None
        loss = itc_momentum_loss(image_feat, text_feat, m_img, m_txt, iq, tq, temp, d.alpha, hard)
        new = {"params": mom}
        if d.queue_size:
            ptr = task_state["ptr"]
            new["image_queue"], _ = queue_push(iq, m_img, ptr)
            new["text_queue"], _ = queue_push(tq, m_txt, ptr)
            new["class_queue"] = cq.at[(ptr + jnp.arange(cls.shape[0])) % d.queue_size].set(cls)
            new["ptr"] = (ptr + cls.shape[0]) % d.queue_size
        return loss, new

    # --- inference helpers (evaluation, CapFilt) -----------------------------------------------
    def _itc_feats(self, params, images, tokens, mask):
        rp, _ = self._split(params)
        image_feat, text_feat, _ = self._itc_on(rp, self._embeds(rp, images), tokens, mask)
        return image_feat, text_feat

    def _match_prob(self, params, images, tokens, mask):
        rp, _ = self._split(params)
        return jax.nn.softmax(self._itm_on(rp, self._embeds(rp, images), tokens, mask), -1)[:, 1]

    def _greedy(self, params, images):
        """Greedy captions [B, max_text_len]: [DEC] then argmax tokens, padding after [EOS]."""
        _, cp = self._split(params)
        embeds = self.captioner.apply({"params": cp}, images, method="encode_image")
        length, tok = self.cfg.data.max_text_len, self.data.tokenizer
        banned = jnp.zeros(self.caption_config.vocab_size, bool).at[
            jnp.asarray([tok.pad_id, tok.bos_id, self.enc_id, self.dec_id])].set(True)
        b = images.shape[0]
        tokens = jnp.zeros((b, length), jnp.int32).at[:, 0].set(self.dec_id)

        def step(t, carry):
            tokens, done = carry
            mask = jnp.broadcast_to(jnp.arange(length) <= t, (b, length))
            logits = self._lm_on(cp, embeds, tokens, mask)[:, t]
            nxt = jnp.argmax(jnp.where(banned, -jnp.inf, logits), -1).astype(jnp.int32)
            nxt = jnp.where(done, tok.pad_id, nxt)
            if_last = t == length - 2  # the context is full: end the caption
            nxt = jnp.where(~done & if_last, tok.eos_id, nxt)
            return tokens.at[:, t + 1].set(nxt), done | (nxt == tok.eos_id)

        tokens, _ = jax.lax.fori_loop(0, length - 1, step, (tokens, jnp.zeros(b, bool)))
        return tokens

    def _batched(self, fn, *arrays):
        out = []
        for chunk, real in image_data.eval_batches(*arrays, batch_size=self.cfg.data.eval_batch_size):
            res = fn(*chunk)
            out.append(jax.tree_util.tree_map(lambda x: np.asarray(x)[:real], res))
        return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *out)

    def match_scores(self, params, images: np.ndarray, texts: list[str]) -> np.ndarray:
        """ITM p(match) [N] of image i with text i."""
        tokens, mask = self.data.tokenizer.encode(texts, self.cfg.data.max_text_len)
        return self._batched(lambda x, t, m: self._jit_itm(params, x, t, m), images, tokens, mask)

    def captions(self, params, images: np.ndarray) -> list[str]:
        """Greedy captions of images (the captioner's synthetic captions)."""
        tokens = self._batched(lambda x: self._jit_caption(params, x), images)
        words, tok = self.data.tokenizer.words, self.data.tokenizer
        out = []
        for row in tokens:
            ids = []
            for i in row[1:]:
                if i == tok.eos_id or i == tok.pad_id:
                    break
                ids.append(int(i))
            out.append(" ".join(words[i - 2] for i in ids if 2 <= i < tok.eos_id))
        return out

    def test_captions(self) -> list[str]:
        return held_out_captions(self.data)

    def evaluate(self, params, mesh, *, final: bool = False) -> dict[str, float]:
        test, d = self.data.test, self.cfg.data
        n = d.eval_limit or len(test)  # data.eval_limit: the first N held-out images
        labels = np.asarray(test.labels)[:n]
        texts = self.test_captions()[:n]
        images = test.images[:n]
        tokens, mask = self.data.tokenizer.encode(texts, d.max_text_len)
        img, txt = self._batched(lambda x, t, m: self._jit_itc(params, x, t, m), images, tokens, mask)
        out = retrieval_recall(img, txt, image_labels=labels, text_labels=labels)
        # ITM: each image with its caption and with the caption of the next image of another digit
        other = np.asarray([next(j for k in range(1, len(labels)) if labels[j := (i + k) % len(labels)] != labels[i])
                            for i in range(len(labels))])
        pos = self.match_scores(params, images, texts)
        neg = self.match_scores(params, images, [texts[j] for j in other])
        out["itm_accuracy"] = float(np.mean(np.concatenate([pos > 0.5, neg <= 0.5])))
        # threshold-free: how often the image's own caption outscores the other one. A text-blind
        # head (p(match) a function of the image alone) gives exactly 0.5 here AND above
        out["itm_pair_accuracy"] = float(np.mean(pos > neg) + 0.5 * np.mean(pos == neg))
        caps = self.captions(params, images)
        out["caption_accuracy"] = float(np.mean([self.data.caption_class(c) == y for c, y in zip(caps, labels)]))
        b = d.batch_size
        cls = np.asarray([self.data.caption_class(t) for t in texts], np.int32)
        losses = [float(self._jit_loss(params, {"images": images[i:i + b], "tokens": tokens[i:i + b],
                                                "input_mask": mask[i:i + b], "text_class": cls[i:i + b]})[0])
                  for i in range(0, len(labels) - b + 1, b)]
        out["val_loss"] = float(np.mean(losses)) if losses else float("nan")
        return out

    def sample(self, params, step):
        caps = self.captions(params, self.data.test.images[:4])
        return "captions of test images: " + "; ".join(
            f"[{int(y)}] {c!r}" for y, c in zip(self.data.test.labels[:4], caps))


def load_params(task: BlipTask, workdir: str) -> Any:
    """The shared param tree (unboxed) of a `blip` training workdir's latest checkpoint."""

    import orbax.checkpoint as ocp

    from mmjax.checkpoint import WORKDIR_CHECKPOINT_DIR

    ckpt_dir = os.path.abspath(os.path.join(workdir, WORKDIR_CHECKPOINT_DIR))
    if not os.path.isdir(ckpt_dir):
        raise InputError(f"{workdir!r} holds no checkpoint ({ckpt_dir} missing)")
    abstract = jax.eval_shape(lambda: nn.unbox(task._fresh_params(jax.random.PRNGKey(0))))
    manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(create=False),
                                    item_handlers={"params": ocp.StandardCheckpointHandler()})
    try:
        step = manager.latest_step()
        if step is None:
            raise InputError(f"{workdir!r} holds no checkpoint yet")
        return manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))["params"]
    finally:
        manager.close()
