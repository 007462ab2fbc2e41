"""Text data of an LM training run: the workdir's tokenizer, the packed grain train stream, the
validation split as eval rows (with its UTF-8 byte count).

    data = build(cfg.data, workdir)
    it = data.train_iterator()          # next(it) -> batch dict; it.get_state()/set_state()
    for batch in data.eval_batches(): ...
    bpb = data.eval_rows.bits_per_byte(total_nll)

The corpus (`mmjax.data.corpora`) is split by characters, first 90% train and last 10%
validation. The tokenizer (`mmjax.data.tokenizer.Tokenizer`, trained on the train split the
first time and stored as `workdir/tokenizer.model`) travels with the checkpoint. Training rows
come from `mmjax.data.text.make_text_dataset`: documents (paragraphs merged up to
`data.doc_min_chars` characters) are shuffled per epoch, tokenized with BOS, packed into rows of
`seq_len` with segment ids (no attention across documents), window-shuffled and batched; every
process reads its own shard of the documents. Validation is `[BOS] + the whole split` cut into
consecutive rows, so every validation token is predicted exactly once.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterator

import jax
import numpy as np

from mmjax.data.corpora import documents, load_corpus
from mmjax.data.text import EvalRows, TextPipelineConfig, make_eval_rows, make_text_dataset
from mmjax.data.tokenizer import Tokenizer
from mmjax import configs
from mmjax.checkpoint import WORKDIR_TOKENIZER_FILE as TOKENIZER_FILE  # one workdir layout
from mmjax.errors import ConfigError, InputError
from mmjax.train.errors import DataError


@dataclasses.dataclass(frozen=True)
class TextDataConfig:
    """Text data: corpus, tokenizer training, packing and batching."""

    # pydoc | shakespeare | vim | a path to a text file; several joined by "+" form a mixture
    corpus: str = "pydoc"
    mixture_weights: tuple[float, ...] | None = None  # sampling weight per corpus; None = equal
    vocab_size: int = 2048  # sentencepiece vocabulary (the model's vocab_size follows it)
    tokenizer_type: str = "bpe"  # bpe | unigram
    seq_len: int = 128
    batch_size: int = 32
    seed: int = 0
    doc_min_chars: int = 2000  # paragraphs merged into documents of at least this many chars
    shuffle_window: int = 256  # packed rows shuffled together
    tokenizer_sentences: int = 0  # train the tokenizer on a seeded sample of N lines (0 = all)

    def __post_init__(self):
        for name in ("vocab_size", "seq_len", "batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"data.{name} must be positive, got {getattr(self, name)}")
        n = len(self.corpora)
        if self.mixture_weights is not None:
            w = tuple(float(x) for x in self.mixture_weights)
            if len(w) != n:
                raise ConfigError(f"data.mixture_weights has {len(w)} weights for {n} corpora "
                                  f"({' + '.join(self.corpora)})")
            if any(not x >= 0 for x in w) or sum(w) <= 0:
                raise ConfigError(f"data.mixture_weights={w}: weights must be >= 0, not all zero")
            object.__setattr__(self, "mixture_weights", w)
        if self.tokenizer_type not in ("bpe", "unigram"):
            raise ConfigError(f"data.tokenizer_type {self.tokenizer_type!r}"
                              f"{configs.closest_name(self.tokenizer_type, ('bpe', 'unigram'))}; "
                              "known: bpe, unigram")


    @property
    def corpora(self) -> tuple[str, ...]:
        """The corpus names of a (possibly "+"-joined) `corpus`."""
        return tuple(c.strip() for c in self.corpus.split("+") if c.strip()) or (self.corpus,)


@dataclasses.dataclass
class TextData:
    """The tokenizer, the training documents and the validation rows of one run."""

    tokenizer: Tokenizer
    train_documents: list[list[str]]  # one list of documents per corpus
    eval_rows: EvalRows
    config: TextDataConfig
    seed: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def bos_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    @property
    def val_bytes(self) -> int:
        return self.eval_rows.num_bytes

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def pipeline_config(self) -> TextPipelineConfig:
        c = self.config
        return TextPipelineConfig(seq_len=c.seq_len, batch_size=c.batch_size, seed=self.seed,
                                  add_bos=True, add_eos=False, shuffle_window=c.shuffle_window,
                                  mixture_weights=c.mixture_weights if len(c.corpora) > 1 else None)

    def train_iterator(self):
        """Endless shuffled packed batches (reshuffled each epoch), resumable via get/set_state."""
        ds = make_text_dataset(self.train_documents, self.tokenizer, self.pipeline_config())
        return iter(ds)

    def eval_batches(self, batch_size: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """This process's share of the validation rows, fixed-shape batches."""
        return self.eval_rows.batches(batch_size or self.config.batch_size,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count())


def build(cfg: TextDataConfig, workdir: str, log: Callable[[str], None] = print) -> TextData:
    """Load the corpus, train (or reuse) `workdir/tokenizer.model`, prepare both splits."""
    splits = []
    for name in cfg.corpora:
        try:
            splits.append(load_corpus(name))
        except Exception as e:  # noqa: BLE001 - corpora raise InputError; keep one error type here
            raise DataError(str(e)) from None
    # a mixture: the tokenizer learns from every training split, validation covers every
    # validation split (so bits per byte measure the whole mixture)
    train_text = "\n\n".join(t for t, _ in splits)
    val_text = "\n\n".join(v for _, v in splits)
    if not train_text.strip():
        raise DataError(f"data.corpus={cfg.corpus!r}: the training split is empty")
    # byte-fallback BPE never makes more tokens than UTF-8 bytes (+1 BOS per document), so a
    # split with fewer bytes than one batch of tokens can never fill a batch
    need = cfg.batch_size * (cfg.seq_len + 1)
    have = len(train_text.encode("utf-8"))
    if have < need:
        raise DataError(
            f"data.corpus={cfg.corpus!r}: the training split has {have} bytes, fewer than the "
            f"{need} tokens one batch of {cfg.batch_size} x {cfg.seq_len} needs; use a larger "
            "corpus or lower data.batch_size / data.seq_len")
    path = os.path.join(workdir, TOKENIZER_FILE)
    if not os.path.exists(path):
        if jax.process_index() == 0:
            Tokenizer.train(train_text, path, cfg.vocab_size, model_type=cfg.tokenizer_type,
                            input_sentence_size=cfg.tokenizer_sentences, seed=cfg.seed)
            log(f"trained a {cfg.tokenizer_type} sentencepiece tokenizer "
                f"(vocab {cfg.vocab_size}) -> {path}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("tokenizer trained")
    tokenizer = Tokenizer.load(path)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise DataError(
            f"{path} has a vocabulary of {tokenizer.vocab_size} but data.vocab_size="
            f"{cfg.vocab_size}; use another --workdir or delete the tokenizer"
        )
    docs = [documents(t, min_chars=cfg.doc_min_chars) for t, _ in splits]
    n_tokens = len(tokenizer.encode(train_text[: 200_000]))
    approx = n_tokens * max(len(train_text) / 200_000, 1.0)
    if approx < cfg.batch_size * (cfg.seq_len + 1):
        raise DataError(
            f"data.corpus={cfg.corpus!r}: the training split has about {int(approx)} tokens, too "
            f"few for one batch of {cfg.batch_size} x {cfg.seq_len}; lower data.batch_size or "
            "data.seq_len"
        )
    rows = make_eval_rows(val_text, tokenizer, cfg.seq_len)
    return TextData(tokenizer, docs, rows, cfg, cfg.seed)



def tokenizer_file(path: str) -> str:
    """The sentencepiece `.model` a `data.tokenizer` setting names: the file itself, or the
    tokenizer of a training workdir (InputError naming what is missing)."""
    if os.path.isdir(path):
        candidate = os.path.join(path, TOKENIZER_FILE)
        if not os.path.isfile(candidate):
            raise InputError(f"data.tokenizer={path!r} is a directory without {TOKENIZER_FILE} (train "
                             "that language model first, or name its .model file)")
        return candidate
    if not os.path.isfile(path):
        raise InputError(f"data.tokenizer={path!r} does not exist (train the language model "
                         "first, e.g. `mmjax train experiments/llm_text.py`)")
    return path


def workdir_tokenizer(workdir: str, source: str | None, log: Callable[[str], None] = print
                      ) -> tuple[Tokenizer | None, str]:
    """(tokenizer, its path in the workdir): the workdir's own (a resumed run keeps it), else the
    one `source` names, copied into the workdir (process 0); (None, path) when neither exists and
    the caller is to train one at that path."""
    import shutil

    target = os.path.join(workdir, TOKENIZER_FILE)
    if os.path.isfile(target):
        return Tokenizer.load(target), target
    os.makedirs(workdir, exist_ok=True)
    if source is None:
        return None, target
    path = tokenizer_file(source)
    if jax.process_index() == 0:
        shutil.copyfile(path, target)
    log(f"tokenizer: {path}")
    return Tokenizer.load(path), target
