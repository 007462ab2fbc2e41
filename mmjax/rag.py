"""Retrieval-augmented generation: chunk documents, embed, exact top-k by cosine, compose the
prompt, answer with an mmjax LM.

    from mmjax.eval.sentence import SentenceEncoder
    passages = chunk_documents(docs, max_words=64, overlap=1)         # [Passage(id, text, doc, ...)]
    retriever = Retriever.build(SentenceEncoder(minilm_dir), passages)   # embeds, indexes
    hits = retriever.retrieve("How do I open a file?", k=5)             # [Hit(id, score, item)]
    prompt = compose_prompt("How do I open a file?", [h.item for h in hits])
    answer = generate_answer("workdirs/llm_text", "How do I open a file?", retriever, k=3)

An encoder is anything with `encode(items) -> [n, d]` float32 rows of unit L2 norm (the
`Encoder` protocol): `mmjax.eval.sentence.SentenceEncoder` on strings, and a CLIP's two towers
through `CLIPTextEncoder` (strings or token ids) and `CLIPImageEncoder` (images). The index
knows nothing of modality, so text -> image retrieval is `Retriever.build(image_encoder,
images, query_encoder=text_encoder)` and image -> text the reverse.

`Index` is exact: the scores are one matrix product of the normalised queries with every stored
row, the top k come from `np.argpartition` and are then sorted by score (ties: the lower id
first), so results equal a full sort. No approximate-nearest-neighbour structure.

Chunking (`chunk_documents`) is deterministic: sentences (split after `.`, `!`, `?` followed by
whitespace, and at blank lines) are packed greedily into passages of at most `max_words` words;
a sentence longer than that is cut into `max_words`-word pieces. `overlap` repeats the last
`overlap` sentences (unit="sentences") or words (unit="words") of a passage at the start of the
next one. Passages never span two documents.

Bad input (an empty document set, an empty query, k <= 0 or k > the index size, embeddings of
the wrong width, `overlap >= max_words`) raises `mmjax.errors.InputError` saying what to change.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from mmjax.errors import InputError

DEFAULT_TEMPLATE = "{context}\n\nQuestion: {question}\nAnswer:"
PASSAGE_FORMAT = "[{rank}] {text}"

# A sentence ends at . ! ? (optionally followed by a closing quote/bracket) before whitespace,
# or at a paragraph break.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+|\n\s*\n")


class Encoder(Protocol):
    def encode(self, items: Sequence[Any]) -> np.ndarray:
        """[n, d] float32, each row of unit L2 norm."""


@dataclasses.dataclass(frozen=True)
class Passage:
    """One chunk: `id` (its position in the chunk list), `text`, `doc_id` (the document it came
    from) and `start` (its first word's index among the document's words)."""

    id: int
    text: str
    doc_id: int
    start: int


@dataclasses.dataclass(frozen=True)
class Hit:
    """A retrieved item: `id` (its row in the index), `score` (cosine), `item` (the stored
    passage / image / whatever was indexed)."""

    id: int
    score: float
    item: Any


# ------------------------------------------------------------------------------------------
# Chunking
# ------------------------------------------------------------------------------------------


def split_sentences(text: str) -> list[str]:
    """The sentences of `text`, whitespace-normalised, empty ones dropped."""
    return [s for s in (" ".join(p.split()) for p in _SENTENCE_END.split(text)) if s]


def chunk_documents(documents: Sequence[str], *, max_words: int = 64, overlap: int = 0,
                    unit: str = "sentences") -> list[Passage]:
    """Passages of at most `max_words` words (module docstring); `unit` "sentences" packs whole
    sentences, "words" cuts fixed windows of words."""
    if isinstance(documents, str):
        raise InputError("chunk_documents takes a sequence of documents, got one string; "
                         "wrap it in a list")
    if not documents or not any(str(d).strip() for d in documents):
        raise InputError("chunk_documents: the document set is empty (no non-blank document)")
    if max_words < 1:
        raise InputError(f"chunk_documents: max_words must be >= 1, got {max_words}")
    if not 0 <= overlap < max_words:
        raise InputError(f"chunk_documents: overlap must be in [0, max_words - 1 = {max_words - 1}], "
                         f"got {overlap}")
    if unit not in ("sentences", "words"):
        raise InputError(f"chunk_documents: unit must be 'sentences' or 'words', got {unit!r}")
    passages: list[Passage] = []
    for doc_id, doc in enumerate(documents):
        spans = _word_chunks(str(doc), max_words, overlap) if unit == "words" else \
            _sentence_chunks(str(doc), max_words, overlap)
        for start, words in spans:
            passages.append(Passage(len(passages), " ".join(words), doc_id, start))
    return passages


def _word_chunks(doc: str, max_words: int, overlap: int) -> list[tuple[int, list[str]]]:
    words = doc.split()
    out, start, step = [], 0, max_words - overlap
    while start < len(words):
        out.append((start, words[start:start + max_words]))
        if start + max_words >= len(words):
            break
        start += step
    return out


def _sentence_chunks(doc: str, max_words: int, overlap: int) -> list[tuple[int, list[str]]]:
    # sentences as word lists, each at most max_words long; with their first word's index
    pieces: list[tuple[int, list[str]]] = []
    position = 0
    for sentence in split_sentences(doc):
        words = sentence.split()
        for i in range(0, len(words), max_words):
            pieces.append((position + i, words[i:i + max_words]))
        position += len(words)
    out: list[tuple[int, list[str]]] = []
    i = 0
    while i < len(pieces):
        start, current, j = pieces[i][0], list(pieces[i][1]), i + 1
        while j < len(pieces) and len(current) + len(pieces[j][1]) <= max_words:
            current += pieces[j][1]
            j += 1
        out.append((start, current))
        if j >= len(pieces):
            break
        # the next passage starts `overlap` sentences back (always moving forward), as far
        # back as still leaves room for the next new sentence
        i = max(i + 1, j - overlap)
        while sum(len(p[1]) for p in pieces[i:j + 1]) > max_words:
            i += 1
    return out


# ------------------------------------------------------------------------------------------
# Exact index
# ------------------------------------------------------------------------------------------


def _as_rows(x: Any, what: str) -> np.ndarray:
    a = np.asarray(x, np.float32)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2:
        raise InputError(f"{what} must be [n, dim] (or one [dim] vector), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise InputError(f"{what} contain NaN or inf")
    return a


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(values [q, k], indices [q, k]) of the k largest entries of each row of scores [q, n],
    best first, ties broken by the lower index: what a full stable sort gives."""
    n = scores.shape[1]
    if k < n:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        kth = np.take_along_axis(scores, part, 1).min(axis=1, keepdims=True)
        # entries tied with the k-th value may have been cut arbitrarily: take the lowest ids
        tied = scores == kth
        need = k - (scores > kth).sum(axis=1)
        cand = np.where(scores > kth, True, tied & (np.cumsum(tied, axis=1) <= need[:, None]))
        idx = np.stack([np.flatnonzero(row) for row in cand]) if len(cand) else part
    else:
        idx = np.broadcast_to(np.arange(n), scores.shape).copy()
    vals = np.take_along_axis(scores, idx, 1)
    order = np.lexsort((idx, -vals), axis=1) if vals.size else idx
    idx = np.take_along_axis(idx, order, 1)
    return np.take_along_axis(scores, idx, 1), idx


class Index:
    """Exact cosine top-k over stored embeddings [size, dim] (normalised on the way in), each
    row with an item (passage, image, label...)."""

    def __init__(self, dim: int):
        if dim < 1:
            raise InputError(f"Index dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self._rows: list[np.ndarray] = []
        self._matrix: np.ndarray | None = np.zeros((0, self.dim), np.float32)
        self.items: list[Any] = []

    @property
    def size(self) -> int:
        return len(self.items)

    def __len__(self) -> int:
        return self.size

    @property
    def embeddings(self) -> np.ndarray:
        """[size, dim] the stored unit rows."""
        if self._matrix is None:
            self._matrix = np.concatenate(self._rows) if self._rows else np.zeros((0, self.dim), np.float32)
            self._rows = [self._matrix]
        return self._matrix

    def add(self, embeddings: Any, items: Sequence[Any] | None = None) -> list[int]:
        """Store rows [n, dim] with their items (default: their ids); returns the new ids."""
        rows = _as_rows(embeddings, "embeddings added to the index")
        if rows.shape[1] != self.dim:
            raise InputError(f"embeddings of width {rows.shape[1]} added to an index of width {self.dim}; "
                             "embed with the encoder the index was built with")
        if len(rows) == 0:
            raise InputError("Index.add: no embeddings given")
        ids = list(range(self.size, self.size + len(rows)))
        items = ids if items is None else list(items)
        if len(items) != len(rows):
            raise InputError(f"Index.add: {len(rows)} embeddings but {len(items)} items")
        self.embeddings  # materialise what is stored, then append
        self._rows.append(normalize(rows))
        self._matrix = None
        self.items.extend(items)
        return ids

    def scores(self, queries: Any) -> np.ndarray:
        """[q, size] cosine of each query with every stored row."""
        q = _as_rows(queries, "query embeddings")
        if q.shape[1] != self.dim:
            raise InputError(f"query embeddings of width {q.shape[1]} for an index of width {self.dim}")
        return normalize(q) @ self.embeddings.T

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [q, k], ids [q, k]) of the k most similar rows per query, best first."""
        self._check_k(k)
        return top_k(self.scores(queries), int(k))

    def _check_k(self, k: int) -> None:
        if self.size == 0:
            raise InputError("the index is empty: add embeddings before searching")
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k <= 0:
            raise InputError(f"k must be a positive integer, got {k!r}")
        if k > self.size:
            raise InputError(f"k={k} exceeds the index size {self.size}; ask for at most {self.size}")


class Retriever:
    """An encoder (for queries) + an index of items embedded by `item_encoder`.

    `Retriever.build(encoder, items)` embeds `items` with `encoder` and answers queries with the
    same encoder; `query_encoder=` gives queries another one (CLIP: images indexed with the
    image tower, text queries with the text tower).
    """

    def __init__(self, query_encoder: Encoder, index: Index):
        self.query_encoder, self.index = query_encoder, index

    @classmethod
    def build(cls, item_encoder: Encoder, items: Sequence[Any], *, texts: Sequence[Any] | None = None,
              query_encoder: Encoder | None = None) -> "Retriever":
        """Embed `texts` (default: `items`, or each Passage's text) and index them with `items`."""
        items = list(items)
        if not items:
            raise InputError("Retriever.build: the item set is empty; nothing to index")
        if texts is None:
            texts = [it.text if isinstance(it, Passage) else it for it in items]
        emb = _as_rows(item_encoder.encode(list(texts)), "item embeddings")
        index = Index(emb.shape[1])
        index.add(emb, items)
        return cls(query_encoder or item_encoder, index)

    def retrieve(self, query: Any, k: int = 5) -> list[Hit]:
        """The k best items for one query (a string, an image...), best first."""
        return self.retrieve_batch([query], k)[0]

    def retrieve_batch(self, queries: Sequence[Any], k: int = 5) -> list[list[Hit]]:
        """retrieve() for several queries in one encoder call."""
        queries = list(queries)
        if not queries:
            raise InputError("retrieve: no queries given")
        for q in queries:
            if q is None or (isinstance(q, str) and not q.strip()):
                raise InputError("retrieve: the query is empty; give some text to search for")
        self.index._check_k(k)
        emb = _as_rows(self.query_encoder.encode(queries), "query embeddings")
        scores, ids = self.index.search(emb, k)
        items = self.index.items
        return [[Hit(int(i), float(s), items[int(i)]) for s, i in zip(srow, irow)]
                for srow, irow in zip(scores, ids)]


# ------------------------------------------------------------------------------------------
# CLIP towers as encoders
# ------------------------------------------------------------------------------------------


class CLIPTextEncoder:
    """A CLIP's text tower as an Encoder. `tokenize(texts) -> (tokens [n, T] int, mask [n, T]
    bool)` turns strings into ids (e.g. `CaptionTokenizer.encode`); without it, items must be
    (tokens, mask) pairs already or rows of token ids of one length."""

    def __init__(self, model, params, tokenize: Callable[[Sequence[str]], tuple] | None = None,
                 batch_size: int = 64):
        import jax

        self.model, self.params, self.tokenize, self.batch_size = model, params, tokenize, batch_size
        self._fn = jax.jit(lambda p, t, m: model.apply({"params": p}, t, input_mask=m,
                                                       method=model.encode_text))

    def encode(self, items: Sequence[Any]) -> np.ndarray:
        if self.tokenize is not None and all(isinstance(x, str) for x in items):
            tokens, mask = self.tokenize(list(items))
        else:
            tokens = np.asarray(items, np.int32)
            if tokens.ndim != 2:
                raise InputError("CLIPTextEncoder: give strings with a tokenize function, or token "
                                 f"ids [n, T]; got shape {tokens.shape}")
            mask = np.ones(tokens.shape, bool)
        tokens, mask = np.asarray(tokens, np.int32), np.asarray(mask, bool)
        return _batched(lambda a, b: self._fn(self.params, a, b), (tokens, mask), self.batch_size)


class CLIPImageEncoder:
    """A CLIP's image tower as an Encoder over images [n, H, W, C] (preprocessed as the model
    expects, e.g. `mmjax.data.images.clip_preprocess`)."""

    def __init__(self, model, params, batch_size: int = 64):
        import jax

        self.model, self.params, self.batch_size = model, params, batch_size
        self._fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_image))

    def encode(self, items: Any) -> np.ndarray:
        images = np.asarray(items, np.float32)
        if images.ndim != 4:
            raise InputError(f"CLIPImageEncoder: images must be [n, H, W, C], got shape {images.shape}")
        return _batched(lambda a: self._fn(self.params, a), (images,), self.batch_size)


def _batched(fn, arrays: tuple, batch_size: int) -> np.ndarray:
    """fn over fixed-size batches (the last one padded, so one compiled shape), rows concatenated."""
    n = len(arrays[0])
    if n == 0:
        raise InputError("encode: no items given")
    out = []
    for s in range(0, n, batch_size):
        chunk = [a[s:s + batch_size] for a in arrays]
        m = len(chunk[0])
        padded = [np.concatenate([c, np.repeat(c[-1:], batch_size - m, 0)]) if m < batch_size else c
                  for c in chunk]
        out.append(np.asarray(fn(*padded), np.float32)[:m])
    return np.concatenate(out)


# ------------------------------------------------------------------------------------------
# Prompt and answer
# ------------------------------------------------------------------------------------------


def _text_of(p: Any) -> str:
    if isinstance(p, Hit):
        p = p.item
    return p.text if isinstance(p, Passage) else str(p)


def compose_prompt(question: str, passages: Sequence[Any], template: str = DEFAULT_TEMPLATE, *,
                   passage_format: str = PASSAGE_FORMAT, separator: str = "\n") -> str:
    """`template` with {context} = the passages (Passage, Hit or str), each as `passage_format`
    ({rank} from 1, {text}) joined by `separator`, and {question}."""
    if not isinstance(question, str) or not question.strip():
        raise InputError("compose_prompt: the question is empty")
    for field in ("{context}", "{question}"):
        if field not in template:
            raise InputError(f"compose_prompt: the template must contain {field}; got {template!r}")
    context = separator.join(passage_format.format(rank=i + 1, text=_text_of(p))
                             for i, p in enumerate(passages))
    return template.format(context=context, question=question.strip())


def generate_answer(workdir: str | tuple, question: str, retriever: Retriever, *, k: int = 3,
                    template: str = DEFAULT_TEMPLATE, max_new_tokens: int = 48,
                    max_prompt_tokens: int | None = None) -> dict[str, Any]:
    """Retrieve k passages, compose the prompt, continue it greedily with the LM of `workdir`
    (or a `(module, params, tokenizer)` triple from `load_for_inference`). The prompt is cut
    from the left (the oldest context first) to `max_prompt_tokens` (default: the model's
    max_len minus max_new_tokens). Returns {"answer", "prompt", "hits"}."""
    import jax

    from mmjax.generate import GenerationConfig, generate
    from mmjax.train import load_for_inference

    if max_new_tokens <= 0:
        raise InputError(f"max_new_tokens must be positive, got {max_new_tokens}")
    hits = retriever.retrieve(question, k)
    prompt = compose_prompt(question, hits, template)
    model, params, tokenizer = load_for_inference(workdir) if isinstance(workdir, str) else workdir
    limit = max_prompt_tokens or model.config.max_len - max_new_tokens
    if limit < 2:
        raise InputError(f"no room for a prompt: max_len={model.config.max_len}, "
                         f"max_new_tokens={max_new_tokens}")
    ids = list(tokenizer.encode(prompt))[-(limit - 1):]
    bos = tokenizer.bos_id
    ids = ([bos] if bos >= 0 else []) + ids
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0,
                              eos_token_id=(tokenizer.eos_id,), pad_token_id=max(tokenizer.pad_id, 0))
    out = generate(model, params, [ids], config, rng=jax.random.key(0))
    new = [int(t) for t in np.asarray(out.tokens)[0][: int(np.asarray(out.lengths)[0])]]
    if tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id)]
    return {"answer": tokenizer.decode(new).strip(), "prompt": prompt, "hits": hits}


__all__ = ["CLIPImageEncoder", "CLIPTextEncoder", "DEFAULT_TEMPLATE", "Encoder", "Hit", "Index",
           "Passage", "Retriever", "chunk_documents", "compose_prompt", "generate_answer",
           "normalize", "split_sentences", "top_k"]
