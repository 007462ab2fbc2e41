"""SFT examples packed into fixed rows: the batch keys of `mmjax.tasks.lm`, loss on labels only.

    cfg = SFTPipelineConfig(seq_len=256, batch_size=8, seed=0)
    ds = make_sft_dataset(conversations, tokenizer, "vicuna_v1", cfg)   # a grain.IterDataset
    it = iter(ds)                 # it.get_state() / it.set_state(state): JSON-able, exact resume
    batch = next(it)              # dict of numpy arrays, each [batch_size, seq_len]
    rows = make_sft_eval_rows(held_out, tokenizer, "vicuna_v1", seq_len=256)   # EvalRows

Each conversation is rendered by `mmjax.data.chat.render` (tokens + labels aligned with them)
and shifted once, per example: an example of T tokens becomes ``inputs = tokens[:-1]`` and
``targets = labels[1:]`` (T - 1 positions; the last token is only ever a target), so no target
can come from another example. Examples are then packed whole, greedy first-fit (grain's
``FirstFitPackIterDataset``: each example goes to the first of `packing_bins` open rows with
room; when one fits in none, the rows are emitted and new ones opened). An example with more
than `seq_len` positions is an InputError unless ``truncate=True`` (then it is cut to
`seq_len` positions, and its end-of-turn token may be lost).

Batch keys (all ``[batch, seq_len]``), as `mmjax.data.text` makes them:

* ``inputs`` (int32): token ids, pad id in padding.
* ``targets`` (int32): the next token where it is trained on (an assistant token or an
  end-of-turn token of the same example), else the pad id: a valid id everywhere, so the LM
  cross-entropy never indexes with IGNORE (optax gives NaN for an out-of-range label, and
  NaN * 0 is NaN).
* ``loss_mask`` (float32): 1 exactly where the target is trained on.
* ``segment_ids`` (int32): 1, 2, ... per example of a row, 0 for padding.
* ``positions`` (int32): restart at 0 at each example; 0 in padding.

Conversations are sharded across processes (conversation ``i`` goes to process
``i % process_count``), shuffled with a seeded per-epoch order and repeated ``num_epochs``
times (None = forever). Everything is deterministic for a seed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np
from grain.experimental import FirstFitPackIterDataset

from mmjax.data import chat
from mmjax.data.text import BATCH_KEYS, EvalRows, JsonStateIterDataset, _derive_seed
from mmjax.errors import ConfigError, InputError

IGNORE = chat.IGNORE


@dataclasses.dataclass(frozen=True)
class SFTPipelineConfig:
    """Settings of an SFT pipeline (see the module docstring).

    seq_len: positions per row. batch_size: rows per batch (per process).
    seed: seeds the conversation order and the packed-row shuffle.
    shuffle: shuffle conversations each epoch and the rows of each packing round.
    num_epochs: passes over the conversations; None repeats forever.
    packing_bins: rows open at once for first-fit packing (0 = batch_size).
    truncate: cut over-long examples to seq_len positions instead of raising InputError.
    image_seq_length: tokens per `<image>` placeholder.
    drop_remainder: drop a last incomplete batch (only with finite num_epochs).
    """

    seq_len: int
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    packing_bins: int = 0
    truncate: bool = False
    image_seq_length: int = 1
    drop_remainder: bool = True

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "image_seq_length"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ConfigError(f"SFTPipelineConfig.{name}={value!r}: must be a positive int")
        if self.packing_bins < 0:
            raise ConfigError(f"SFTPipelineConfig.packing_bins={self.packing_bins}: must be >= 0")
        if self.num_epochs is not None and self.num_epochs <= 0:
            raise ConfigError(f"SFTPipelineConfig.num_epochs={self.num_epochs}: must be positive "
                              "or None")


def shift_example(rendered: chat.RenderedChat, seq_len: int, *, truncate: bool = False,
                  name: str = "a conversation") -> dict[str, np.ndarray]:
    """{"inputs": tokens[:-1], "targets": labels[1:]} (int32 [T - 1]), checked against
    `seq_len` (InputError when longer, unless `truncate`)."""
    n = len(rendered) - 1
    if n < 1:
        raise InputError(f"{name} renders to {len(rendered)} token(s): nothing to predict")
    if rendered.num_targets == 0:
        raise InputError(f"{name} has no trained token (no assistant content)")
    inputs, targets = rendered.tokens[:-1], rendered.labels[1:]
    if n > seq_len:
        if not truncate:
            raise InputError(f"{name} needs {n} positions ({n + 1} tokens), more than "
                             f"seq_len={seq_len}; raise seq_len, shorten it, or set truncate=True")
        inputs, targets = inputs[:seq_len], targets[:seq_len]
    return {"inputs": np.asarray(inputs, np.int32), "targets": np.asarray(targets, np.int32)}


@dataclasses.dataclass(frozen=True)
class RenderExample(grain.transforms.Map):
    """grain map: a conversation -> the shifted example of `shift_example`."""

    tokenizer: Any
    template: str | chat.Template
    seq_len: int
    image_seq_length: int = 1
    truncate: bool = False

    def map(self, conversation) -> dict[str, np.ndarray]:
        rendered = chat.render(conversation, self.tokenizer, self.template,
                               image_seq_length=self.image_seq_length, train=True)
        first = next((t.content for t in chat.as_turns(conversation) if t.role == "user"), "")
        name = f"the conversation asking {first[:60]!r}"
        return shift_example(rendered, self.seq_len, truncate=self.truncate, name=name)


@dataclasses.dataclass(frozen=True)
class PackedToBatchKeys(grain.transforms.Map):
    """grain map: a packed row of inputs/targets (+ segment ids, positions) -> BATCH_KEYS."""

    pad_id: int

    def map(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return finish_row(row["inputs"], row["targets"], row["inputs_segment_ids"],
                          row["inputs_positions"], self.pad_id)


def finish_row(inputs: np.ndarray, targets: np.ndarray, segment_ids: np.ndarray,
               positions: np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
    """The batch keys of one packed row (see the module docstring)."""
    segment_ids = np.asarray(segment_ids, np.int32)
    real = segment_ids != 0
    mask = real & (np.asarray(targets) != IGNORE)
    return {
        "inputs": np.where(real, inputs, pad_id).astype(np.int32),
        "targets": np.where(mask, targets, pad_id).astype(np.int32),
        "segment_ids": segment_ids,
        "positions": np.where(real, positions, 0).astype(np.int32),
        "loss_mask": mask.astype(np.float32),
    }


def _packed_rows(conversations: Sequence[Any], tokenizer: Any, template: str | chat.Template,
                 config: SFTPipelineConfig) -> grain.IterDataset:
    ds = grain.MapDataset.source(list(conversations))
    if config.shuffle:
        ds = ds.shuffle(seed=_derive_seed(config.seed, "conversations"))
    ds = ds.repeat(config.num_epochs)
    ds = ds.map(RenderExample(tokenizer, template, config.seq_len, config.image_seq_length,
                              config.truncate))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=16))
    it = FirstFitPackIterDataset(
        it, length_struct={"inputs": config.seq_len, "targets": config.seq_len},
        num_packing_bins=config.packing_bins or config.batch_size,
        seed=_derive_seed(config.seed, "bins"), shuffle_bins=config.shuffle)
    return it.map(PackedToBatchKeys(int(tokenizer.pad_id)))


def make_sft_dataset(
    conversations: Sequence[Any],
    tokenizer: Any,
    template: str | chat.Template,
    config: SFTPipelineConfig,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """A grain IterDataset of packed SFT batches (dicts of numpy arrays, see module docs).

    This process reads conversations ``process_index::process_count`` (default: jax's).
    """
    template = chat.get_template(template)
    chat.special_ids(template, tokenizer)  # a missing template token fails here, not mid-run
    if isinstance(conversations, (str, bytes)) or not isinstance(conversations, Sequence):
        raise InputError("conversations must be a list of conversations (lists of turns)")
    index = jax.process_index() if process_index is None else int(process_index)
    count = jax.process_count() if process_count is None else int(process_count)
    if count <= 0 or not 0 <= index < count:
        raise InputError(f"process_index={index} must lie in [0, process_count={count})")
    shard = list(conversations)[index::count]
    if not shard:
        raise InputError(f"{len(conversations)} conversations: none for process {index} of "
                         f"{count}")
    ds = _packed_rows(shard, tokenizer, template, config)
    ds = ds.batch(config.batch_size, drop_remainder=config.drop_remainder)
    return JsonStateIterDataset(ds)


def make_sft_eval_rows(conversations: Sequence[Any], tokenizer: Any,
                       template: str | chat.Template, seq_len: int, *,
                       image_seq_length: int = 1) -> EvalRows:
    """Every held-out conversation once, packed in order (no shuffle), as `EvalRows`
    (``batches(batch_size)`` gives fixed-shape, process-sharded batches; `num_targets` counts
    the trained tokens; `num_bytes` is the UTF-8 size of the assistant contents)."""
    config = SFTPipelineConfig(seq_len=seq_len, batch_size=1, shuffle=False, num_epochs=1,
                               packing_bins=8, image_seq_length=image_seq_length)
    rows = list(_packed_rows(list(conversations), tokenizer, chat.get_template(template),
                             config))
    if not rows:
        raise InputError("no held-out conversations to evaluate")
    arrays = {k: np.stack([r[k] for r in rows]) for k in BATCH_KEYS}
    num_bytes = sum(len(t.content.encode("utf-8")) for conv in conversations
                    for t in chat.as_turns(conv) if t.role == "assistant")
    return EvalRows(**arrays, num_targets=int(arrays["loss_mask"].sum()), num_bytes=num_bytes)
