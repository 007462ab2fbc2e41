"""Grain pipelines for language-model text: packed, shuffled, mixed, sharded and resumable.

Training::

    cfg = TextPipelineConfig(seq_len=256, batch_size=8, seed=0)
    ds = make_text_dataset([documents(train_text)], tokenizer, cfg)   # a grain.IterDataset
    it = iter(ds)                          # it.get_state() / it.set_state(state) for checkpoints
    batch = next(it)                       # dict of numpy arrays, each [batch_size, seq_len]

Evaluation (every validation token predicted exactly once)::

    rows = make_eval_rows(val_text, tokenizer, seq_len=256)
    for batch in rows.batches(8): ...      # same keys as training batches
    bpb = rows.bits_per_byte(total_nll_in_nats)

Batch keys (all ``[batch, seq_len]``):

* ``inputs`` / ``targets`` (int32): token ids; ``targets`` is ``inputs`` shifted left by one.
* ``segment_ids`` (int32): 1, 2, 3, ... for the documents (or document pieces) of a row in order,
  0 for padding. Feed them to the model's ``segment_ids`` so no token attends across documents.
* ``positions`` (int32): position of each token inside its segment, restarting at 0 at every
  segment start (also for the piece of a long document continued from the previous row).
* ``loss_mask`` (float32): 1 where the target belongs to the same segment as the input, else 0
  (the last token of a document never predicts the next document's first token; padding is 0).

How a training row is made: each source is a sequence of documents (strings, e.g. from
`mmjax.data.corpora.documents`). Per source, documents are sharded across processes (document
``i`` goes to process ``i % process_count``), shuffled globally with a seeded per-epoch order,
repeated ``num_epochs`` times (None = forever), tokenized (BOS/EOS added per document if asked)
and packed by grain's ``ConcatThenSplitIterDataset`` into rows of ``seq_len + 1`` tokens: documents
are concatenated and cut, so no token is dropped and a long document continues in the next row.
Each row gives ``seq_len`` (input, target) pairs. Sources are then mixed row by row with the
config's mixture weights (grain ``IterDataset.mix``, which stops when any source runs out), rows
are shuffled inside a window of ``shuffle_window`` rows, and batched.

Everything is deterministic for a seed, and the iterator state (a small JSON-safe dict) restores
the exact position: ``set_state(get_state())`` on a fresh iterator of the same pipeline continues
with the same batches, also after the state went through ``json.dumps`` / ``json.loads``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import grain
import jax
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset, WindowShuffleIterDataset

from mmjax.errors import ConfigError, InputError

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


class TokenizerLike(Protocol):
    """What the pipelines need from a tokenizer (`mmjax.data.tokenizer.Tokenizer` fits)."""

    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class TextPipelineConfig:
    """Settings of a training text pipeline (see the module docstring).

    seq_len: tokens per row (the model's input length); rows are packed from seq_len + 1 tokens.
    batch_size: rows per batch (per process).
    seed: seeds document shuffling, row shuffling and mixing.
    shuffle: shuffle documents (a new order each epoch) and rows; False keeps corpus order.
    num_epochs: passes over each source; None repeats forever.
    add_bos / add_eos: put BOS before / EOS after every document.
    mixture_weights: one non-negative weight per source (normalised); None = equal weights.
    shuffle_window: rows shuffled together after packing (0 or 1: no row shuffle), so pieces of
      one long document do not sit in consecutive rows.
    drop_remainder: drop a last incomplete batch (only happens with finite num_epochs).
    read_threads: grain threads that read and tokenize documents.
    """

    seq_len: int
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    add_bos: bool = True
    add_eos: bool = True
    mixture_weights: tuple[float, ...] | None = None
    shuffle_window: int = 256
    drop_remainder: bool = True
    read_threads: int = 2

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "read_threads"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ConfigError(f"TextPipelineConfig.{name}={value!r}: must be a positive int")
        if self.num_epochs is not None and (
            not isinstance(self.num_epochs, (int, np.integer)) or self.num_epochs <= 0
        ):
            raise ConfigError(
                f"TextPipelineConfig.num_epochs={self.num_epochs!r}: must be a positive int "
                f"or None (repeat forever)"
            )
        if self.shuffle_window < 0:
            raise ConfigError(
                f"TextPipelineConfig.shuffle_window={self.shuffle_window}: must be >= 0"
            )
        if self.mixture_weights is not None:
            weights = tuple(float(w) for w in self.mixture_weights)
            if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
                raise ConfigError(
                    f"TextPipelineConfig.mixture_weights={weights}: weights must be finite, "
                    f">= 0, and not all zero"
                )
            object.__setattr__(self, "mixture_weights", weights)

    def replace(self, **changes) -> "TextPipelineConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def make_text_dataset(
    sources: Sequence[Sequence[str]],
    tokenizer: TokenizerLike,
    config: TextPipelineConfig,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """A grain IterDataset of packed training batches (dicts of numpy arrays, see module docs).

    `sources`: a list of sources, each a sequence of document strings (one source:
    ``[docs]``). This process reads documents ``process_index::process_count`` of every source
    (default: ``jax.process_index()`` / ``jax.process_count()``).
    """
    sources = _check_sources(sources)
    weights = config.mixture_weights
    if weights is not None and len(weights) != len(sources):
        raise ConfigError(
            f"TextPipelineConfig.mixture_weights has {len(weights)} weights for "
            f"{len(sources)} sources"
        )
    index, count = _process_shard(process_index, process_count)
    rows = []
    for source_id, docs in enumerate(sources):
        shard = docs[index::count]
        if not shard:
            raise InputError(
                f"source {source_id} has {len(docs)} documents: none for process {index} of "
                f"{count}"
            )
        rows.append(_packed_rows(shard, source_id, tokenizer, config))
    if len(rows) == 1:
        ds = rows[0]
    else:
        ds = grain.IterDataset.mix(rows, list(weights) if weights else None)
    if config.shuffle and config.shuffle_window > 1:
        ds = WindowShuffleIterDataset(
            ds, window_size=config.shuffle_window, seed=_derive_seed(config.seed, "rows")
        )
    ds = ds.batch(config.batch_size, drop_remainder=config.drop_remainder)
    return JsonStateIterDataset(ds)


def _packed_rows(docs: list[str], source_id: int, tokenizer: TokenizerLike,
                 config: TextPipelineConfig) -> grain.IterDataset:
    """One source's documents -> shuffled, repeated, tokenized, packed training rows."""
    ds = grain.MapDataset.source(docs)
    if config.shuffle:
        ds = ds.shuffle(seed=_derive_seed(config.seed, "documents", source_id))
    ds = ds.repeat(config.num_epochs)
    ds = ds.map(TokenizeDocument(tokenizer, config.add_bos, config.add_eos))
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=64)
    )
    it = ConcatThenSplitIterDataset(it, length_struct={"tokens": config.seq_len + 1})
    return it.map(PackedRowToExample(tokenizer.pad_id))


@dataclasses.dataclass(frozen=True)
class TokenizeDocument(grain.transforms.Map):
    """grain map: a document string -> {"tokens": int32 ids} with optional BOS/EOS."""

    tokenizer: Any
    add_bos: bool
    add_eos: bool

    def map(self, document: str) -> dict[str, np.ndarray]:
        ids = list(self.tokenizer.encode(document))
        if self.add_bos:
            ids.insert(0, self.tokenizer.bos_id)
        if self.add_eos:
            ids.append(self.tokenizer.eos_id)
        return {"tokens": np.asarray(ids, np.int32)}


@dataclasses.dataclass(frozen=True)
class PackedRowToExample(grain.transforms.Map):
    """grain map: a packed row of seq_len + 1 tokens -> one training example (BATCH_KEYS)."""

    pad_id: int

    def map(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return split_packed_row(row["tokens"], row["tokens_segment_ids"],
                                row["tokens_positions"], self.pad_id)


def split_packed_row(tokens: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray,
                     pad_id: int) -> dict[str, np.ndarray]:
    """A packed row of n + 1 tokens -> inputs/targets/segment_ids/positions/loss_mask of n."""
    tokens = np.where(segment_ids == 0, pad_id, tokens).astype(np.int32)
    segment_ids = segment_ids.astype(np.int32)
    same_segment = (segment_ids[:-1] == segment_ids[1:]) & (segment_ids[:-1] != 0)
    return {
        "inputs": tokens[:-1],
        "targets": tokens[1:],
        "segment_ids": segment_ids[:-1],
        "positions": np.where(segment_ids[:-1] == 0, 0, positions[:-1]).astype(np.int32),
        "loss_mask": same_segment.astype(np.float32),
    }


class JsonStateIterDataset(grain.IterDataset):
    """The parent's elements unchanged; its iterators' states survive a JSON round trip.

    Grain iterator states hold tuples, which JSON turns into lists that grain's packing no longer
    recognises. ``get_state`` tags tuples as ``{"__tuple__": [...]}``; ``set_state`` accepts
    tagged states (e.g. read back from a JSON checkpoint) as well as raw grain states.
    """

    def __init__(self, parent: grain.IterDataset):
        super().__init__(parent)

    def __iter__(self) -> grain.DatasetIterator:
        return _JsonStateIterator(self._parent.__iter__())

    def __str__(self) -> str:
        return "JsonStateIterDataset"


class _JsonStateIterator(grain.DatasetIterator):
    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return _json_safe(self._parent.get_state())

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(_from_json_safe(state))


_TUPLE_TAG = "__tuple__"


def _json_safe(value: Any) -> Any:
    """Tuples -> {"__tuple__": [...]}, numpy scalars -> Python scalars, recursively."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return {_TUPLE_TAG: [_json_safe(v) for v in value]}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _from_json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TUPLE_TAG}:
            return tuple(_from_json_safe(v) for v in value[_TUPLE_TAG])
        return {k: _from_json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json_safe(v) for v in value]
    return value


# ------------------------------------------------------------------------------------ evaluation


@dataclasses.dataclass(frozen=True)
class EvalRows:
    """A validation text as rows that predict each of its tokens exactly once.

    The token stream is ``[BOS] + encode(text)`` (BOS only if `add_bos`) cut into consecutive
    windows: row ``j`` has inputs ``stream[j*L : j*L + L]`` and targets one further, so the
    targets of all rows are the stream without its first token, each once. The tail of the last
    row is padding (pad id, segment 0, loss_mask 0). Arrays are ``[num_rows, seq_len]``.
    """

    inputs: np.ndarray
    targets: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    loss_mask: np.ndarray
    num_targets: int  # tokens predicted (== loss_mask.sum())
    num_bytes: int  # UTF-8 bytes of the text, for bits per byte

    @property
    def num_rows(self) -> int:
        return int(self.inputs.shape[0])

    def bits_per_byte(self, total_nll: float) -> float:
        """Bits per UTF-8 byte from the summed next-token negative log-likelihood in nats."""
        return float(total_nll) / math.log(2) / self.num_bytes

    def batches(self, batch_size: int, *, process_index: int = 0,
                process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
        """Fixed-shape batches of this process's rows (rows ``process_index::process_count``).

        Every process yields the same number of batches; slots past the end repeat a row with
        loss_mask 0, so summing ``loss_mask``-weighted losses over all processes counts each
        target exactly once.
        """
        if batch_size <= 0:
            raise ConfigError(f"eval batch_size={batch_size}: must be positive")
        if not 0 <= process_index < process_count:
            raise InputError(f"process_index={process_index} not in [0, {process_count})")
        mine = np.arange(process_index, self.num_rows, process_count)
        rows_per_process = -(-self.num_rows // process_count)
        num_batches = -(-rows_per_process // batch_size)
        for b in range(num_batches):
            idx = mine[b * batch_size:(b + 1) * batch_size]
            real = len(idx)
            take = np.concatenate([idx, np.zeros(batch_size - real, np.int64)]).astype(np.int64)
            batch = {k: getattr(self, k)[take] for k in BATCH_KEYS}
            batch["loss_mask"] = batch["loss_mask"].copy()
            batch["loss_mask"][real:] = 0.0
            yield batch


def make_eval_rows(text: str, tokenizer: TokenizerLike, seq_len: int, *,
                   add_bos: bool = True) -> EvalRows:
    """`text` as `EvalRows` of `seq_len` tokens, with its UTF-8 byte count (see EvalRows)."""
    if not isinstance(seq_len, (int, np.integer)) or seq_len <= 0:
        raise ConfigError(f"eval seq_len={seq_len!r}: must be a positive int")
    ids = list(tokenizer.encode(text))
    if not ids:
        raise InputError("the validation text is empty: nothing to evaluate")
    stream = np.asarray(([tokenizer.bos_id] if add_bos else []) + ids, np.int32)
    num_targets = len(stream) - 1
    if num_targets <= 0:
        raise InputError("the validation text has one token and no BOS: nothing to predict")
    num_rows = -(-num_targets // seq_len)
    padded = np.full(num_rows * seq_len + 1, tokenizer.pad_id, np.int32)
    padded[: len(stream)] = stream
    real = np.zeros(num_rows * seq_len + 1, bool)
    real[: len(stream)] = True
    windows = np.lib.stride_tricks.sliding_window_view(padded, seq_len + 1)[::seq_len]
    real_windows = np.lib.stride_tricks.sliding_window_view(real, seq_len + 1)[::seq_len]
    inputs_real = real_windows[:, :-1]
    return EvalRows(
        inputs=np.ascontiguousarray(windows[:, :-1]),
        targets=np.ascontiguousarray(windows[:, 1:]),
        segment_ids=inputs_real.astype(np.int32),
        positions=np.where(inputs_real, np.arange(seq_len, dtype=np.int32), 0).astype(np.int32),
        loss_mask=real_windows[:, 1:].astype(np.float32),
        num_targets=num_targets,
        num_bytes=len(text.encode("utf-8")),
    )


# --------------------------------------------------------------------------------------- helpers


def _check_sources(sources) -> list[list[str]]:
    if isinstance(sources, str) or not isinstance(sources, Sequence):
        raise InputError(
            "sources must be a list of sources, each a list of document strings (one source: "
            f"[documents]); got {type(sources).__name__}"
        )
    if not sources:
        raise InputError("no sources given: pass [documents] for one corpus")
    checked = []
    for i, docs in enumerate(sources):
        if isinstance(docs, str) or not isinstance(docs, Sequence):
            raise InputError(
                f"source {i} must be a sequence of document strings, got {type(docs).__name__} "
                f"(wrap a single source as [documents])"
            )
        kept = [d for d in docs if d]
        for d in kept:
            if not isinstance(d, str):
                raise InputError(f"source {i} holds a {type(d).__name__}, not a document string")
        if not kept:
            raise InputError(f"source {i} is empty: it has no non-empty documents")
        checked.append(kept)
    return checked


def _process_shard(index: int | None, count: int | None) -> tuple[int, int]:
    index = jax.process_index() if index is None else int(index)
    count = jax.process_count() if count is None else int(count)
    if count <= 0 or not 0 <= index < count:
        raise InputError(f"process_index={index} must lie in [0, process_count={count})")
    return index, count


def _derive_seed(seed: int, *keys: str | int) -> int:
    """A 32-bit seed for one random step, derived from the pipeline seed and the step's name."""
    entropy = [int(seed) % 2**32] + [
        k if isinstance(k, int) else int.from_bytes(k.encode("utf-8")[:8], "little")
        for k in keys
    ]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])
