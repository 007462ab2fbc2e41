"""Sentence embeddings from a sentence-transformers directory with a BERT encoder (e.g.
all-MiniLM-L6-v2): the checkpoint's own tokenizer, the mmjax BERT, pooling over the attention
mask and L2 normalisation -- the numbers `sentence_transformers.SentenceTransformer(path)
.encode(sentences)` gives.

    encoder = SentenceEncoder(path)                       # reads the directory, loads the model
    emb = encoder.encode(sentences, batch_size=32)        # [n, dim] float32 numpy, normalised
    emb @ emb.T                                           # cosine similarities

What is read from the directory (nothing is hard-coded):
  * `modules.json`: the module chain. Supported: Transformer (the BERT, loaded unchanged with
    `mmjax.convert.from_hf` from its path), Pooling, Normalize; any other module (Dense, ...)
    raises `UnsupportedModelError` naming it. Without `modules.json`: Transformer at the root,
    mean pooling, no normalisation.
  * `sentence_bert_config.json` of the Transformer module: `max_seq_length` (inputs are
    truncated to it, special tokens included, as sentence-transformers does; capped at the
    model's max_position_embeddings) and `do_lower_case` (lowercase the text first).
  * the Pooling module's `config.json`: exactly one of `pooling_mode_mean_tokens`,
    `pooling_mode_cls_token`, `pooling_mode_max_tokens`, `pooling_mode_mean_sqrt_len_tokens`
    (several at once, weighted-mean or last-token pooling are refused by name).
  * the tokenizer: `tokenizer.json` with the `tokenizers` library (its stored padding and
    truncation are replaced by the model's), else `vocab.txt` through `tokenizers`'
    `BertWordPieceTokenizer` with `tokenizer_config.json`'s `do_lower_case`. A tokenizer whose
    vocabulary size differs from the checkpoint's `vocab_size` raises `InputError` naming both.

Batches are padded to a multiple of 16 tokens and to `batch_size` rows, so a handful of
compiled programs serve any input; padding never reaches a real token (masked keys, masked
pooling).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from mmjax.errors import InputError, UnsupportedModelError

POOLING_MODES = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}
_REFUSED_POOLING = ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
_MODULES = ("Transformer", "Pooling", "Normalize")
_LENGTH_BUCKET = 16


def _read_json(path: str, default: Any = None) -> Any:
    if not os.path.isfile(path):
        return default
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_modules(path: str) -> list[tuple[str, str]]:
    """[(kind, directory)] of a sentence-transformers directory's module chain, kind one of
    Transformer / Pooling / Normalize."""
    if not os.path.isdir(path):
        raise InputError(f"sentence encoder directory {path!r} does not exist")
    entries = _read_json(os.path.join(path, "modules.json"))
    if entries is None:
        return [("Transformer", path), ("Pooling", "")]
    modules = []
    for entry in entries:
        kind = str(entry.get("type", "")).rsplit(".", 1)[-1]
        if kind not in _MODULES:
            raise UnsupportedModelError(f"{path}/modules.json: module {entry.get('type')!r} is not supported; "
                                        f"supported: {', '.join(_MODULES)}")
        modules.append((kind, os.path.join(path, entry.get("path", ""))))
    kinds = [k for k, _ in modules]
    if kinds[:1] != ["Transformer"] or kinds.count("Transformer") != 1 or kinds.count("Pooling") > 1:
        raise UnsupportedModelError(f"{path}/modules.json: expected Transformer, Pooling[, Normalize]; "
                                    f"got {', '.join(kinds)}")
    return modules


def pooling_mode(config: dict[str, Any], where: str) -> str:
    """The one pooling mode of a sentence-transformers Pooling config."""
    refused = [k for k in _REFUSED_POOLING if config.get(k)]
    if refused:
        raise UnsupportedModelError(f"{where}: {', '.join(refused)} is not supported; supported: "
                                    f"{', '.join(POOLING_MODES)}")
    if config.get("include_prompt", True) is not True:
        raise UnsupportedModelError(f"{where}: include_prompt=false (prompts) is not supported")
    modes = [mode for key, mode in POOLING_MODES.items() if config.get(key)]
    if len(modes) != 1:
        raise UnsupportedModelError(f"{where}: exactly one pooling mode must be set, got {modes or 'none'} "
                                    f"(keys: {', '.join(POOLING_MODES)})")
    return modes[0]


def load_tokenizer(path: str, max_length: int):
    """The `tokenizers.Tokenizer` of a model directory: `tokenizer.json`, else `vocab.txt`
    (BERT WordPiece); truncating to `max_length` tokens, no padding."""
    try:
        import tokenizers
    except ImportError as e:
        raise InputError(f"sentence embeddings need the 'tokenizers' package ({e})") from None
    json_file, vocab_file = os.path.join(path, "tokenizer.json"), os.path.join(path, "vocab.txt")
    if os.path.isfile(json_file):
        tok = tokenizers.Tokenizer.from_file(json_file)
    elif os.path.isfile(vocab_file):
        from tokenizers.implementations import BertWordPieceTokenizer

        settings = _read_json(os.path.join(path, "tokenizer_config.json"), {})
        tok = BertWordPieceTokenizer(vocab_file, lowercase=bool(settings.get("do_lower_case", True)),
                                     strip_accents=settings.get("strip_accents"))
    else:
        raise InputError(f"{path}: no tokenizer.json or vocab.txt to tokenize with")
    tok.no_padding()
    tok.enable_truncation(max_length)
    return tok


class SentenceEncoder:
    """A sentence-transformers BERT directory as an mmjax encoder (module docstring).

    Attributes: module, params (the converted BERT), tokenizer (`tokenizers.Tokenizer`),
    pooling ("mean", "cls", "max", "mean_sqrt_len"), normalize (the directory has a Normalize
    module), max_seq_length, do_lower_case, dim.
    """

    def __init__(self, path: str, *, max_seq_length: int | None = None):
        from mmjax.convert import from_hf
        from mmjax.models.bert import BertConfig

        modules = read_modules(str(path))
        transformer_dir = modules[0][1]
        self.module, self.params = from_hf(transformer_dir)
        config = self.module.config
        if not isinstance(config, BertConfig):
            raise UnsupportedModelError(f"{transformer_dir}: the Transformer module is a "
                                        f"{type(config).__name__}, SentenceEncoder takes a BERT")
        settings = _read_json(os.path.join(transformer_dir, "sentence_bert_config.json"), {})
        limit = max_seq_length or settings.get("max_seq_length") or config.max_len
        self.max_seq_length = int(min(limit, config.max_len))
        self.do_lower_case = bool(settings.get("do_lower_case", False))
        pooling = [d for k, d in modules if k == "Pooling"]
        if pooling:
            where = os.path.join(pooling[0], "config.json")
            self.pooling = pooling_mode(_read_json(where, {}), where)
        else:
            self.pooling = "mean"
        self.normalize = any(k == "Normalize" for k, _ in modules)
        self.tokenizer = load_tokenizer(transformer_dir, self.max_seq_length)
        size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        if size != config.vocab_size:
            raise InputError(f"{transformer_dir}: the tokenizer has {size} tokens but the checkpoint's "
                             f"vocab_size is {config.vocab_size}; use the tokenizer saved with this model")
        self.dim = config.dim
        self._embed = None

    def tokenize(self, sentences: Sequence[str]) -> list[list[int]]:
        """Token ids of each sentence ([CLS] ... [SEP], truncated to max_seq_length)."""
        texts = [str(s).lower() if self.do_lower_case else str(s) for s in sentences]
        return [enc.ids for enc in self.tokenizer.encode_batch(texts)]

    def _compiled(self):
        if self._embed is None:
            import jax
            import jax.numpy as jnp

            module, pooling = self.module, self.pooling

            def embed(params, tokens, mask):
                hidden = module.apply({"params": params}, tokens, None, mask)
                return pool(hidden, mask, pooling)

            self._embed = jax.jit(embed)
            self._jnp = jnp
        return self._embed

    def encode(self, sentences: Sequence[str] | str, *, normalize: bool | None = None,
               batch_size: int = 32) -> np.ndarray:
        """[n, dim] float32 sentence embeddings (one sentence: [dim]); `normalize` None = as the
        directory says (a Normalize module), True / False to force it."""
        if isinstance(sentences, str):
            return self.encode([sentences], normalize=normalize, batch_size=batch_size)[0]
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        normalize = self.normalize if normalize is None else normalize
        ids = self.tokenize(sentences)
        embed = self._compiled()
        jnp = self._jnp
        out = np.zeros((len(ids), self.dim), np.float32)
        order = np.argsort([-len(x) for x in ids], kind="stable")  # similar lengths together
        for start in range(0, len(ids), batch_size):
            rows = order[start:start + batch_size]
            longest = max(len(ids[i]) for i in rows)
            width = min(-(-longest // _LENGTH_BUCKET) * _LENGTH_BUCKET, self.max_seq_length)
            width = max(width, longest)
            tokens = np.zeros((batch_size, width), np.int32)
            mask = np.zeros((batch_size, width), bool)
            for r, i in enumerate(rows):
                tokens[r, :len(ids[i])] = ids[i]
                mask[r, :len(ids[i])] = True
            vectors = np.asarray(embed(self.params, jnp.asarray(tokens), jnp.asarray(mask)))
            out[rows] = vectors[:len(rows)]
        if normalize:
            out = out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
        return out


def pool(hidden: Any, mask: Any, mode: str) -> Any:
    """Sentence vectors [batch, dim] from token states [batch, seq, dim] and the attention
    mask [batch, seq] (True = real token), as sentence-transformers' Pooling module."""
    import jax.numpy as jnp

    m = mask.astype(hidden.dtype)[..., None]
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return jnp.max(jnp.where(m > 0, hidden, -jnp.inf), axis=1)
    total = jnp.sum(hidden * m, axis=1)
    count = jnp.maximum(jnp.sum(m, axis=1), 1e-9)
    return total / (count if mode == "mean" else jnp.sqrt(count))


__all__ = ["SentenceEncoder", "pool", "read_modules", "pooling_mode", "load_tokenizer"]
