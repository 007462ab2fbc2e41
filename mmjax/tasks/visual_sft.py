"""Visual instruction tuning: a vision-language model (LLaVA) trained on image + conversation
examples with the loss on the assistant's tokens only, evaluated by answering held-out visual
questions.

    ExperimentConfig(task="visual_sft", model=LlavaConfig(...),
                     data=VisualSFTDataConfig(dataset="digits_vqa", template="vicuna_v1"),
                     optimizer=OptimizerConfig(freeze=(r"^vision/",)),          # LLaVA stage 2
                     init_from=(InitSource("workdirs/clip_digits", "vision", "vision"),
                                InitSource("workdirs/llm_text", "", "language_model")))

Datasets (`mmjax.data.digits_vqa`, real scikit-learn digits): "digits_captions" (LLaVA stage 1:
an image and its caption, template "plain") and "digits_vqa" (stage 2: questions of the types
`QUESTION_TYPES` with short answers). Conversations are rendered by `mmjax.data.chat` (each
`<image>` expanded to the model's `image_seq_length` image tokens; labels only on the
assistant's reply and its end-of-turn token) and padded to `seq_len`; a longer one is an error.

Tokenizer: `data.tokenizer` names a sentencepiece model (a `.model` file or a training workdir
holding one: the language model's own, e.g. `workdirs/llm_text`); it must have the `<image>`
piece, and its vocabulary size must be the language model's. None trains a small BPE tokenizer
on the dataset's conversations (tests, from-scratch runs). The tokenizer is copied into the
workdir, so `mmjax generate` and resumed runs use the same one.

Stages are freeze regexes of the optimizer (`mmjax.train.optimizer`): stage 1 freezes
`^vision/` and `^language_model/` (only the projector trains), stage 2 `^vision/`.

Evaluation: `val_loss` / `val_ppl` (teacher-forced, assistant tokens of held-out examples of the
training dataset: captions of test images, or the held-out questions);
`vqa_accuracy` (exact match of the greedy answer, `normalize_answer`, generation stopped at the
template's end-of-turn token) with `vqa_accuracy_<type>` per question type, and
`stopped_fraction` (answers that ended with the end-of-turn token). The training loop reports
the step-0 evaluation beside the final one as `start_<key>`: with `init_from` a stage-1 workdir,
`start_vqa_accuracy` is the stage-1-only model's accuracy.
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

from mmjax import configs
from mmjax.errors import ConfigError, InputError
from mmjax.train.task import Task

DATASETS = ("digits_captions", "digits_vqa")
IGNORE = -100


@dataclasses.dataclass(frozen=True)
class VisualSFTDataConfig:
    """Image + conversation data and how it is rendered, batched and evaluated."""

    dataset: str = "digits_vqa"
    template: str = "vicuna_v1"  # mmjax.data.chat template
    system_prompt: str | None = None  # None: the template's default; "": no system turn
    image_size: int = 32
    seq_len: int = 64  # rendered conversation tokens (image tokens included), padded
    batch_size: int = 32
    eval_per_type: int = 50  # held-out questions per question type
    eval_batch_size: int = 64
    max_new_tokens: int = 6  # answer length limit in the VQA evaluation
    eval_captions: int = 200  # digits_captions: held-out images captioned (BLEU-4, CIDEr); 0 = none
    caption_max_new_tokens: int = 12  # caption length limit
    tokenizer: str | None = None  # .model file or workdir; None: train one (vocab_size)
    vocab_size: int = 512  # only for a trained tokenizer
    seed: int = 0

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ConfigError(f"data.dataset {self.dataset!r}"
                              f"{configs.closest_name(self.dataset, DATASETS)}; known: "
                              f"{', '.join(DATASETS)}")
        for name in ("image_size", "seq_len", "batch_size", "eval_per_type", "eval_batch_size",
                     "max_new_tokens", "vocab_size", "caption_max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"data.{name} must be positive, got {getattr(self, name)}")
        if self.eval_captions < 0:
            raise ConfigError(f"data.eval_captions must be >= 0, got {self.eval_captions}")


def chat_template_has_system(template: str) -> bool:
    from mmjax.data import chat

    return bool(chat.get_template(template).system)


class VisualSFTTask(Task):
    """LLaVA-style visual instruction tuning (see the module docstring)."""

    unit = "examples"
    data_config_class = VisualSFTDataConfig

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        super().validate_config(cfg)
        from mmjax.data import chat

        chat.get_template(cfg.data.template)  # ConfigError naming the known templates
        if cfg.data.seq_len > cfg.model.text.max_len:
            raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the language model's "
                              f"max_len={cfg.model.text.max_len}")
        if cfg.model.vision.image_hw != (cfg.data.image_size, cfg.data.image_size):
            raise ConfigError(f"data.image_size={cfg.data.image_size} but the image tower takes "
                              f"{cfg.model.vision.image_hw}: make them equal")

    def __init__(self, cfg: Any, workdir: str, log: Callable[[str], None] = print):
        super().__init__(cfg, workdir, log)
        from mmjax.data import chat, digits_vqa

        d = cfg.data
        self.vqa = digits_vqa.load_digits_vqa(d.image_size, seed=d.seed)
        self.tokenizer = self._tokenizer(cfg, workdir, log)
        tok = self.tokenizer
        image_id = tok.piece_to_id(digits_vqa.IMAGE)
        if image_id == tok.unk_id:
            raise InputError(f"the tokenizer has no {digits_vqa.IMAGE!r} piece: train it with that "
                             "user-defined symbol (mmjax's default) or use another tokenizer")
        text = cfg.model.text.replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                      eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        self.model_config = cfg.model.replace(text=text, image_token_index=image_id)
        self.model = self.build_model(self.model_config)
        self.template = d.template
        self.stop_ids = tuple(chat.stop_ids(d.template, tok))
        self.image_seq_length = self.model_config.image_seq_length
        self.units_per_step = d.batch_size
        self.eval_set = digits_vqa.eval_examples(self.vqa.test, d.eval_per_type, d.seed + 1,
                                                 d.image_size)
        if d.dataset == "digits_captions":  # held-out captions score the loss
            rng = np.random.default_rng(d.seed + 2)
            held_out = [digits_vqa.caption_example(self.vqa.test, i % len(self.vqa.test), rng,
                                                   d.image_size)
                        for i in range(len(self.eval_set))]
        else:
            held_out = self.eval_set
        self.eval_rows = [self._row(ex) for ex in held_out]
        self.caption_set = []
        if d.dataset == "digits_captions" and d.eval_captions:
            rng = np.random.default_rng(d.seed + 3)
            n = min(d.eval_captions, len(self.vqa.test))
            self.caption_set = [dict(digits_vqa.caption_example(self.vqa.test, i, rng, d.image_size),
                                     label=int(self.vqa.test.labels[i])) for i in range(n)]
        self._eval_loss = None

        model = self.model

        def init_params(rng):
            from mmjax.models import example_inputs

            return model.init(rng, *example_inputs(self.family, self.model_config))["params"]

        self.init_params = init_params
        self.loss = self._loss_fn()

    # --- data -------------------------------------------------------------------------------
    def _tokenizer(self, cfg, workdir: str, log):
        from mmjax.data import digits_vqa
        from mmjax.data.tokenizer import Tokenizer

        from mmjax.tasks.text_data import workdir_tokenizer

        tok, target = workdir_tokenizer(workdir, cfg.data.tokenizer, log)
        if tok is not None:
            return tok
        texts = []
        rng = np.random.default_rng(cfg.data.seed)
        for qtype in digits_vqa.QUESTION_TYPES:
            for q in digits_vqa.QUESTIONS[qtype]:
                texts.append(q)
        for i in range(200):
            texts.append(digits_vqa.caption_example(self.vqa.train, i, rng, 8 * 4)["answer"])
        from mmjax.data import chat
        from mmjax.data.tokenizer import DEFAULT_USER_SYMBOLS

        t = chat.get_template(cfg.data.template)
        texts += [t.default_system, "USER: ASSISTANT:", "###Human: ###Assistant:"]
        texts += [str(k) for k in range(11)] + ["even", "odd"]
        symbols = tuple(DEFAULT_USER_SYMBOLS) + tuple(
            s for s in t.user_symbols if s not in DEFAULT_USER_SYMBOLS)
        if jax.process_index() == 0:
            Tokenizer.train(["\n".join(texts)] * 4, target, cfg.data.vocab_size, model_type="bpe",
                            user_defined_symbols=symbols, seed=cfg.data.seed)
        log(f"trained a bpe sentencepiece tokenizer (vocab {cfg.data.vocab_size}) -> {target}")
        return Tokenizer.load(target)

    def _example(self, index: int, rng: np.random.Generator) -> dict:
        from mmjax.data import digits_vqa

        split, size = self.vqa.train, self.cfg.data.image_size
        if self.cfg.data.dataset == "digits_captions":
            return digits_vqa.caption_example(split, index % len(split), rng, size)
        qtype = digits_vqa.QUESTION_TYPES[index % len(digits_vqa.QUESTION_TYPES)]
        return digits_vqa.instruction_example(split, (index // 4) % len(split), qtype, rng, size)

    def _with_system(self, conversation: list[dict]) -> list[dict]:
        system = self.cfg.data.system_prompt
        if system is None or not chat_template_has_system(self.template):
            return conversation
        return [{"role": "system", "content": system}] + list(conversation)

    def _row(self, ex: dict) -> dict[str, np.ndarray]:
        """A rendered, padded training row: tokens, labels (IGNORE where no loss), input_mask,
        image."""
        from mmjax.data import chat

        r = chat.render(self._with_system(ex["conversation"]), self.tokenizer, self.template,
                        image_seq_length=self.image_seq_length, train=True)
        n, seq = len(r.tokens), self.cfg.data.seq_len
        if n > seq:
            raise InputError(f"a rendered conversation has {n} tokens, more than data.seq_len="
                             f"{seq}: raise data.seq_len")
        tokens = np.full(seq, self.tokenizer.pad_id, np.int32)
        labels = np.full(seq, IGNORE, np.int32)
        tokens[:n], labels[:n] = r.tokens, r.labels
        mask = np.zeros(seq, bool)
        mask[:n] = True
        return {"tokens": tokens, "labels": labels, "input_mask": mask,
                "images": ex["image"].astype(np.float32)}

    def train_iterator(self):
        import grain

        from mmjax.tasks.image_data import process_shard  # noqa: F401 (same sharding rule)

        d = self.cfg.data
        count, index = jax.process_count(), jax.process_index()
        if d.batch_size % count:
            raise ConfigError(f"data.batch_size={d.batch_size} is not divisible by the {count} "
                              "processes")
        n = len(self.vqa.train) * (1 if d.dataset == "digits_captions" else 4)

        def make(i, rng):
            return self._row(self._example(int(i), rng))

        ds = (grain.MapDataset.range(n)[index::count].shuffle(seed=d.seed).repeat(None)
              .random_map(make, seed=d.seed + 1).batch(d.batch_size // count, drop_remainder=True))
        return iter(ds.to_iter_dataset())

    # --- objective --------------------------------------------------------------------------
    def _loss_fn(self):
        model = self.model
        dropout = self.model_config.text.dropout

        def loss_fn(params, batch, rng):
            kw = {}
            if rng is not None and dropout > 0:
                kw = {"deterministic": False, "rngs": {"dropout": rng}}
            logits = model.apply({"params": params}, batch["tokens"], batch["images"],
                                 input_mask=batch["input_mask"], **kw)
            targets = batch["labels"][:, 1:]
            weights = (targets != IGNORE).astype(jnp.float32)
            nll = optax.softmax_cross_entropy_with_integer_labels(
                logits[:, :-1], jnp.where(targets == IGNORE, 0, targets))
            return jnp.sum(nll * weights), jnp.sum(weights), {}

        return loss_fn

    # --- evaluation -------------------------------------------------------------------------
    def evaluate(self, params: Any, mesh: Mesh | None, *, final: bool = False) -> dict[str, float]:
        from mmjax.data import digits_vqa
        from mmjax.train.step import make_eval_step, shard_batch

        if self._eval_loss is None:
            self._eval_loss = make_eval_step(self.loss, mesh=mesh)
        bs = self.cfg.data.eval_batch_size
        total = count = 0.0
        for start in range(0, len(self.eval_rows), bs):
            batch = self._stack(self.eval_rows[start:start + bs], bs)
            s, c, _ = self._eval_loss(params, shard_batch(batch, mesh))
            total, count = total + float(s), count + float(c)
        out: dict[str, float] = {}
        if count:
            out["val_loss"] = total / count
            out["val_ppl"] = math.exp(min(out["val_loss"], 700.0))
        answers, stopped = self.answer(params, self.eval_set)
        by_type: dict[str, list[bool]] = {}
        for ex, got in zip(self.eval_set, answers):
            ok = digits_vqa.normalize_answer(got) == digits_vqa.normalize_answer(ex["answer"])
            by_type.setdefault(ex["qtype"], []).append(ok)
        for qtype, oks in by_type.items():
            out[f"vqa_accuracy_{qtype}"] = float(np.mean(oks))
        out["vqa_accuracy"] = float(np.mean([ok for oks in by_type.values() for ok in oks]))
        out["stopped_fraction"] = float(np.mean(stopped))
        if self.caption_set:
            out.update(self.caption_metrics(params))
        return out

    def caption_metrics(self, params: Any) -> dict[str, float]:
        """Greedy captions of held-out images scored against every training template's caption
        of the image's digit (8 references each): `caption_bleu4`, `caption_cider` (CIDEr-D,
        `mmjax.eval.captioning`) and `caption_accuracy` (the caption names the digit)."""
        from mmjax.data.digits import TRAIN_TEMPLATES, caption, caption_label
        from mmjax.eval.captioning import bleu, cider

        got, _ = self.answer(params, self.caption_set, self.cfg.data.caption_max_new_tokens)
        labels = [ex["label"] for ex in self.caption_set]
        refs = [[caption(t, y) for t in TRAIN_TEMPLATES] for y in labels]
        correct = [caption_label(text) == y for text, y in zip(got, labels)]
        return {"caption_bleu4": bleu(got, refs)["bleu4"], "caption_cider": cider(got, refs),
                "caption_accuracy": float(np.mean(correct))}

    @staticmethod
    def _stack(rows: list[dict], size: int) -> dict[str, np.ndarray]:
        """Rows stacked into one fixed-size batch; missing rows are all-padding copies (no
        loss), so every batch has one shape (one compiled program)."""
        pad = dict(rows[0])
        pad = {**pad, "labels": np.full_like(pad["labels"], IGNORE)}
        rows = list(rows) + [pad] * (size - len(rows))
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def prompt(self, ex: dict) -> list[int]:
        """The token ids of `ex`'s conversation up to the assistant's reply (generation prompt)."""
        from mmjax.data import chat

        r = chat.render(self._with_system(ex["conversation"][:-1]), self.tokenizer, self.template,
                        image_seq_length=self.image_seq_length, train=False,
                        add_generation_prompt=True)
        return [int(t) for t in r.tokens]

    def answer(self, params: Any, examples: list[dict], max_new_tokens: int | None = None
               ) -> tuple[list[str], list[bool]]:
        """Greedy answers to `examples` (their last turn is the reference, not shown) and whether
        each stopped at the end-of-turn token."""
        from mmjax.generate import GenerationConfig, generate

        n_new = max_new_tokens or self.cfg.data.max_new_tokens
        bs = self.cfg.data.eval_batch_size
        prompts = [self.prompt(ex) for ex in examples]
        longest = max(len(p) for p in prompts)
        bucket = 1 << max(4, (longest - 1).bit_length())  # one program for every batch
        gen = GenerationConfig(max_new_tokens=n_new, eos_token_id=self.stop_ids,
                               pad_token_id=self.tokenizer.pad_id, prompt_bucket=bucket)
        texts, stopped = [], []
        for start in range(0, len(examples), bs):
            chunk = prompts[start:start + bs]
            images = np.stack([ex["image"] for ex in examples[start:start + bs]])
            k = len(chunk)
            if k < bs:  # fixed batch shape: repeat the last example
                chunk = chunk + [chunk[-1]] * (bs - k)
                images = np.concatenate([images, np.repeat(images[-1:], bs - k, axis=0)])
            out = generate(self.model, params, chunk, gen, prefill_inputs={"images": images})
            for row in range(k):
                new = [int(t) for t in out.tokens[row][: int(out.lengths[row])]]
                ended = bool(new) and new[-1] in self.stop_ids
                stopped.append(ended)
                if ended:
                    new = new[:-1]
                texts.append(self.tokenizer.decode(new))
        return texts, stopped

    def sample(self, params: Any, step: int) -> str | None:
        from mmjax.data import digits_vqa

        picks = self.eval_set[:: max(1, len(self.eval_set) // 8)][:8]
        answers, _ = self.answer(params, picks)
        lines = []
        for ex, got in zip(picks, answers):
            question = ex["conversation"][0]["content"].replace(digits_vqa.IMAGE, "").strip()
            lines.append(f"[{ex['qtype']}] {question} -> {got!r} (want {ex['answer']!r})")
        return "\n".join(lines)

    def describe(self) -> str:
        c = self.model_config
        connector = getattr(c, "connector", "Q-Former")
        return (f"{self.family}: ViT dim={c.vision.dim} x{c.vision.num_layers} -> {connector} -> "
                f"{type(c.text).__name__} dim={c.text.dim} x{c.text.num_layers} vocab={c.text.vocab_size}, "
                f"{c.image_seq_length} image tokens; {self.cfg.data.dataset} / {self.template}, "
                f"batch {self.cfg.data.batch_size} x {self.cfg.data.seq_len}")
