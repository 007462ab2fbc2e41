"""Supervised fine-tuning of an LM on conversations: loss on the assistant's tokens only.

    ExperimentConfig(task="sft", model=LlamaConfig(...), data=SFTDataConfig(template="vicuna_v1"),
                     init_from="workdirs/llm_text")

Data: an instruction dataset (`mmjax.data.instructions`, "pydoc_instructions") as conversations,
rendered with a chat template (`mmjax.data.chat`) and packed first-fit into rows
(`mmjax.data.sft`) with the batch keys of `mmjax.tasks.lm` (inputs, targets, loss_mask,
segment_ids, positions), so the LM loss applies unchanged: `loss_mask` is 1 only where the
target is an assistant token or the end-of-turn token closing an answer.

Tokenizer: with `init_from` (the pretrained LM's training workdir), its `tokenizer.model` is the
one the model was trained with, so it is reused and copied into this run's workdir (where
`mmjax generate` and a resumed run find it); a source without one is an error, and so is a
tokenizer lacking a token the template needs. Without `init_from` a new tokenizer is trained
on the instruction texts and the pydoc corpus, with the template's special pieces.

Evaluation: `val_loss` / `val_ppl` over the held-out conversations' trained tokens (every one
once), and a generation check: greedy answers to the first `sample.num_questions` held-out
questions, stopped at the template's stop ids (`mmjax.data.chat.stop_ids`). `stopped_fraction`
is the fraction of answers that ended with the end-of-turn token within
`sample.max_new_tokens`; `sample()` shows a few questions, generated and reference answers.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh

from mmjax.checkpoint import WORKDIR_TOKENIZER_FILE as TOKENIZER_FILE
from mmjax.errors import ConfigError
from mmjax.ops.attention import decoding_implementation
from mmjax.tasks.lm import lm_init_fn, lm_loss_fn
from mmjax.train.errors import DataError
from mmjax.train.step import make_eval_step, shard_batch
from mmjax.train.task import Task


@dataclasses.dataclass(frozen=True)
class SFTDataConfig:
    """Conversations, their template, packing and batching."""

    dataset: str = "pydoc_instructions"  # mmjax.data.instructions.DATASETS
    template: str = "vicuna_v1"  # mmjax.data.chat.TEMPLATES
    system_prompt: str | None = None  # None: the template's default; "": no system turn
    seq_len: int = 256
    batch_size: int = 8
    seed: int = 0
    packing_bins: int = 0  # rows open at once for first-fit packing (0 = batch_size)
    max_answer_chars: int = 240  # answer length of the pydoc instructions
    vocab_size: int = 2048  # only for a new tokenizer (no init_from)

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "max_answer_chars", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"data.{name} must be positive, got {getattr(self, name)}")
        if self.packing_bins < 0:
            raise ConfigError(f"data.packing_bins must be >= 0, got {self.packing_bins}")


@dataclasses.dataclass(frozen=True)
class SFTSampleConfig:
    """The generation check on held-out questions (greedy)."""

    num_questions: int = 16  # held-out questions answered at each evaluation
    max_new_tokens: int = 96
    show: int = 3  # question / answer pairs shown by sample()

    def __post_init__(self):
        if self.num_questions < 0 or self.max_new_tokens <= 0 or self.show < 0:
            raise ConfigError("sample.num_questions and sample.show must be >= 0, "
                              "sample.max_new_tokens positive")


class SFTTask(Task):
    """Instruction tuning of any LM family (`trains = "lm"`) with loss on assistant tokens."""

    unit = "tokens"
    trains = "lm"
    data_config_class = SFTDataConfig
    sample_config_class = SFTSampleConfig

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        super().validate_config(cfg)
        from mmjax.data import chat, instructions

        chat.get_template(cfg.data.template)  # ConfigError listing the known templates
        if cfg.data.dataset not in instructions.DATASETS:
            raise ConfigError(f"data.dataset={cfg.data.dataset!r}; known: "
                              f"{', '.join(instructions.DATASETS)}")
        if cfg.data.seq_len > cfg.model.max_len:
            raise ConfigError(
                f"data.seq_len={cfg.data.seq_len} exceeds model.max_len={cfg.model.max_len}")

    def __init__(self, cfg: Any, workdir: str, log: Callable[[str], None] = print):
        super().__init__(cfg, workdir, log)
        from mmjax.data import chat, instructions
        from mmjax.data.sft import make_sft_eval_rows

        d = cfg.data
        self.template = chat.get_template(d.template)
        self.tokenizer = self._tokenizer()
        self.stop_ids = chat.stop_ids(self.template, self.tokenizer)  # ConfigError if missing
        train, held_out = instructions.load_instructions(d.dataset,
                                                         max_answer_chars=d.max_answer_chars)
        self.train_conversations = [self._with_system(c) for c in train]
        self.held_out = [self._with_system(c) for c in held_out]
        if not self.train_conversations or not self.held_out:
            raise DataError(f"data.dataset={d.dataset!r}: {len(train)} training and "
                            f"{len(held_out)} held-out conversations; both splits need some")
        lengths = self._check_lengths()
        self.eval_rows = make_sft_eval_rows(self.held_out, self.tokenizer, self.template,
                                            d.seq_len)
        tok = self.tokenizer
        self.model_config = cfg.model.replace(
            vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=self.stop_ids[0],
            pad_token_id=tok.pad_id)
        self.model = self.build_model(self.model_config)
        impl = decoding_implementation(self.model_config.implementation)
        self.decode_model = (self.model if impl == self.model_config.implementation
                             else self.build_model(self.model_config.replace(implementation=impl)))
        self.units_per_step = d.batch_size * d.seq_len
        self.init_params = lm_init_fn(self.decode_model, d.seq_len)
        self.loss = lm_loss_fn(self.model)
        self._eval_steps: dict[Any, Callable] = {}
        # (id of the params they were generated with, answers) of the latest generation check
        self._answers: tuple[int, list[tuple[str, str, str, bool]]] | None = None
        log(f"sft: {len(self.train_conversations)} training / {len(self.held_out)} held-out "
            f"conversations ({d.dataset}), template {self.template.name}, stop ids "
            f"{self.stop_ids}; {np.mean(lengths):.0f} tokens per training conversation "
            f"(longest {max(lengths)}); {self.eval_rows.num_targets} held-out trained tokens")

    # ------------------------------------------------------------------------------- data

    def _with_system(self, conversation: list[dict]) -> list[dict]:
        prompt = self.cfg.data.system_prompt
        if prompt is None:
            return conversation
        return [{"role": "system", "content": prompt}] + list(conversation)

    def _check_lengths(self) -> list[int]:
        """Render every conversation once: tokenization mismatches and conversations longer
        than data.seq_len fail here, before training, all counted in one message."""
        from mmjax.data import chat

        seq = self.cfg.data.seq_len
        lengths = [len(chat.render(c, self.tokenizer, self.template))
                   for c in self.train_conversations + self.held_out]
        long = [n for n in lengths if n - 1 > seq]
        if long:
            raise DataError(f"{len(long)} of {len(lengths)} conversations need more than "
                            f"data.seq_len={seq} positions (longest: {max(long)} tokens); raise "
                            "data.seq_len or lower data.max_answer_chars")
        return lengths

    def _source_tokenizer(self) -> str | None:
        """The tokenizer file of the init_from source that fills the whole model, if any."""
        from mmjax.train.pretrained import init_sources

        whole = [s for s in init_sources(self.cfg.init_from, self.cfg.init_from_prefix)
                 if not s.into]
        if not whole:
            return None
        path = os.path.join(whole[0].path, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise DataError(f"init_from={whole[0].path!r} has no {TOKENIZER_FILE}: SFT must "
                            "reuse the tokenizer the pretrained model was trained with (train "
                            "it with `mmjax train` first, or copy its tokenizer.model there)")
        return path

    def _tokenizer(self):
        from mmjax.data.tokenizer import Tokenizer

        target = os.path.join(self.workdir, TOKENIZER_FILE)
        source = self._source_tokenizer()
        if os.path.isfile(target):
            tok = Tokenizer.load(target)
            if source and (Tokenizer.load(source).serialized_model_proto()
                           != tok.serialized_model_proto()):
                raise DataError(f"{target} differs from the tokenizer of init_from ({source}); "
                                "use another --workdir or delete it")
            return tok
        if jax.process_index() == 0:
            if source:
                os.makedirs(self.workdir, exist_ok=True)
                shutil.copyfile(source, target)
                self.log(f"tokenizer: {source} (the pretrained model's) -> {target}")
            else:
                self._train_tokenizer(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("sft tokenizer")
        return Tokenizer.load(target)

    def _train_tokenizer(self, target: str) -> None:
        from mmjax.data import instructions
        from mmjax.data.corpora import load_corpus
        from mmjax.data.tokenizer import DEFAULT_USER_SYMBOLS, Tokenizer

        d = self.cfg.data
        train, _ = instructions.load_instructions(d.dataset, max_answer_chars=d.max_answer_chars)
        texts = [t["content"] for conv in train for t in conv]
        texts += [self.template.default_system, self.template.user, self.template.assistant]
        symbols = tuple(DEFAULT_USER_SYMBOLS) + tuple(
            s for s in self.template.user_symbols if s not in DEFAULT_USER_SYMBOLS)
        Tokenizer.train([load_corpus("pydoc")[0], "\n".join(texts)], target, d.vocab_size,
                        user_defined_symbols=symbols, seed=d.seed)
        self.log(f"trained a bpe sentencepiece tokenizer (vocab {d.vocab_size}) -> {target}")

    def describe(self) -> str:
        c = self.model_config
        return (f"LLaMA dim={c.dim}, layers={c.num_layers}, heads={c.num_heads}/{c.kv_heads}, "
                f"vocab={c.vocab_size}; SFT batch {self.cfg.data.batch_size} x "
                f"{self.cfg.data.seq_len} tokens, template {self.template.name}")

    def train_iterator(self):
        from mmjax.data.sft import SFTPipelineConfig, make_sft_dataset

        d = self.cfg.data
        config = SFTPipelineConfig(seq_len=d.seq_len, batch_size=d.batch_size, seed=d.seed,
                                   packing_bins=d.packing_bins)
        return iter(make_sft_dataset(self.train_conversations, self.tokenizer, self.template,
                                     config))

    # ------------------------------------------------------------------------- evaluation

    def evaluate(self, params: Any, mesh: Mesh | None, *, final: bool = False) -> dict[str, float]:
        """Held-out loss over trained tokens, perplexity, and the generation check."""
        key = id(mesh)
        if key not in self._eval_steps:
            self._eval_steps[key] = make_eval_step(self.loss, mesh=mesh)
        eval_step = self._eval_steps[key]
        total, count = 0.0, 0.0
        for i, batch in enumerate(self.eval_rows.batches(
                self.cfg.data.batch_size, process_index=jax.process_index(),
                process_count=jax.process_count())):
            if self.cfg.max_eval_batches is not None and i >= self.cfg.max_eval_batches:
                break
            s, c, _ = eval_step(params, shard_batch(batch, mesh))
            total += float(s)
            count += float(c)
        out: dict[str, float] = {}
        if count:
            loss = total / count
            out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_tokens": count}
        if self.cfg.sample.num_questions:
            answers = self.answer(params, self.held_out[: self.cfg.sample.num_questions])
            self._answers = (id(params), answers)
            out["stopped_fraction"] = float(np.mean([a[3] for a in answers]))
        return out

    def prompt_ids(self, conversation: list[dict]) -> list[int]:
        """Token ids of `conversation` without its last (assistant) turn, up to and including
        the assistant header: what generation continues."""
        from mmjax.data import chat

        r = chat.render(conversation[:-1], self.tokenizer, self.template, train=False,
                        add_generation_prompt=True)
        return [int(t) for t in r.tokens]

    def answer(self, params: Any, conversations: list[list[dict]]
               ) -> list[tuple[str, str, str, bool]]:
        """(question, generated answer, reference answer, stopped at the end-of-turn token)
        per conversation; greedy, `sample.max_new_tokens` at most."""
        from mmjax.generate import GenerationConfig, generate

        prompts = [self.prompt_ids(c) for c in conversations]
        longest = max(len(p) for p in prompts)
        n_new = min(self.cfg.sample.max_new_tokens, self.model_config.max_len - longest)
        if n_new <= 0:
            return []
        gen = GenerationConfig(max_new_tokens=n_new, temperature=0.0, eos_token_id=self.stop_ids,
                               pad_token_id=self.tokenizer.pad_id,
                               prompt_bucket=-(-longest // 16) * 16)
        out = generate(self.decode_model, params, prompts, gen)
        rows = []
        stops = set(self.stop_ids)
        for conv, toks, n in zip(conversations, np.asarray(out.tokens), np.asarray(out.lengths)):
            new = [int(t) for t in toks[: int(n)]]
            stopped = bool(new) and new[-1] in stops
            text = self.tokenizer.decode(new[:-1] if stopped else new)
            rows.append((conv[-2]["content"], text, conv[-1]["content"], stopped))
        return rows

    def sample(self, params: Any, step: int) -> str | None:
        """The latest generation check's first `sample.show` answers (fresh ones if none)."""
        show = self.cfg.sample.show
        if not show:
            return None
        if self._answers is not None and self._answers[0] == id(params):
            answers = self._answers[1][:show]
        else:
            answers = self.answer(params, self.held_out[:show])
        lines = []
        for q, a, ref, stopped in answers:
            lines.append(f"Q: {q}\nA: {a}{'' if stopped else ' [no end-of-turn]'}\n"
                         f"reference: {ref}")
        return "\n\n".join(lines)
