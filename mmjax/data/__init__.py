"""Data: sentencepiece tokenizers and grain pipelines (text packing, mixtures, sharding).

* `mmjax.data.corpora`: `load_corpus(name) -> (train_text, val_text)`, `documents(text)`.
* `mmjax.data.tokenizer`: `Tokenizer` (train / load / encode / decode / save).
* `mmjax.data.text`: `TextPipelineConfig`, `make_text_dataset` (packed, shuffled, mixed,
  per-process training batches with a resumable iterator) and `make_eval_rows` (the validation
  text, each token predicted once, with its UTF-8 byte count for bits per byte).
* `mmjax.data.chat`: chat templates (`TEMPLATES`: vicuna_v1, llama3, plain, minigpt4),
  `render(conversation, tokenizer, template)` -> tokens + aligned labels, `stop_ids`.
* `mmjax.data.sft`: `SFTPipelineConfig`, `make_sft_dataset` (rendered conversations packed
  first-fit into LM batches, loss on assistant tokens only) and `make_sft_eval_rows`.
* `mmjax.data.instructions`: `pydoc_instructions()`, question/answer conversations built
  offline from Python's documentation topics, split by topic.
* `mmjax.data.interleaved`: Flamingo's interleaved image-text data (`InterleavedDataConfig`,
  `make_interleaved_dataset`: M3W-like digit documents mixed with image-text pairs, resumable;
  `render_document`, `encode_example`, `image_pool`).

The names below are imported lazily, so ``import mmjax.data.tokenizer`` does not pay for grain.
"""

import importlib

_EXPORTS = {
    "documents": "mmjax.data.corpora",
    "load_corpus": "mmjax.data.corpora",
    "Tokenizer": "mmjax.data.tokenizer",
    "EvalRows": "mmjax.data.text",
    "TextPipelineConfig": "mmjax.data.text",
    "make_eval_rows": "mmjax.data.text",
    "make_text_dataset": "mmjax.data.text",
    "InterleavedDataConfig": "mmjax.data.interleaved",
    "make_interleaved_dataset": "mmjax.data.interleaved",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mmjax.data' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
