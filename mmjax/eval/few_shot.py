"""Few-shot in-context evaluation of Flamingo-family models (OpenFlamingo's evaluation style).

    acc = few_shot_accuracy(model, params, tok, support.images, support.labels,
                            query.images, query.labels, DIGIT_NAMES)   # {"0": a, "4": a, "8": a}
    acc_r = few_shot_accuracy(..., selection="rices", embeddings=(support_emb, query_emb))
    epi = episodic_accuracy(model, params, tok, support.images, support.labels,
                            query.images, query.labels)                # {"0": ~1/C, "4": .., ..}
    res = few_shot_predictions(...)["4"]   # FewShotResult: scores [Q, C], predictions, demos

Prompts (`PromptTemplate`; presets `TEMPLATES`)
-----------------------------------------------
A k-shot prompt is k demonstrations followed by the query, one ``<image>`` each, the images
passed alongside in the same order (demo 1, ..., demo k, query):

    "caption": <image>Output:{answer}<|endofchunk|>                       (query: <image>Output:)
    "vqa":     <image>Question:{question} Short answer:{answer}<|endofchunk|>
                                                    (query: <image>Question:{question} Short answer:)

`few_shot_prompt` writes the string; `few_shot_tokens` the ids the model reads: BOS, then per
demo ``encode(query prefix) + encode(answer) + [<|endofchunk|>]``, then ``encode(query prefix)``.
Each answer is tokenized on its own (as lm-eval-harness and OpenFlamingo tokenize class names),
so a class's tokens are the same in a demonstration and as a candidate; the tokenizer is
lossless, so ``decode(few_shot_tokens(...)) == few_shot_prompt(...)``. 0 shots is the query
alone (``<image>Output:``; OpenFlamingo's "0-shot" adds two text-only demos, this does not).

Demonstrations (`random_select`, `rices_select`)
------------------------------------------------
* "random": per query, k distinct support examples drawn uniformly (a seeded generator per shot
  count: ``default_rng([seed, k])``), never the query itself when the support and query pools are
  the same array (``support_images is query_images``).
* "rices" (Retrieval-based In-Context Example Selection, Yang et al. 2022, as OpenFlamingo's
  evaluation): the k support examples whose embedding (e.g. CLIP image features, which the caller
  computes and passes as ``embeddings=(support_emb, query_emb)``) has the highest cosine
  similarity with the query's, ordered by increasing similarity so that the most similar
  demonstration comes LAST, right before the query (OpenFlamingo reverses its top-k for this).

Scoring: rank classification (OpenFlamingo's classification evaluation)
-----------------------------------------------------------------------
Every query is scored against the fixed candidate set (all `class_names`): the score of a
candidate is the log-likelihood of its tokens followed by ``<|endofchunk|>`` given the prompt,

    score(c) = sum_t log p(c_t | prompt, c_<t),   c = encode(answer) + [<|endofchunk|>],

and the prediction is the argmax (ties: the first class). `normalize="sum"` (default) keeps the
plain sum, the log-probability of the complete answer string: with ``<|endofchunk|>`` appended
the candidates are disjoint events (a candidate that is a prefix of another is not favoured), so
the sum compares proper probabilities. ``normalize="mean"`` divides by the candidate's token
count (OpenFlamingo calls get_rank_classifications with normalize_length=True); the mean favours
candidates whose later tokens are nearly determined by their first (a name split into several
pieces), which is a bias when the class names have different token counts, as "one" and
"seven" do -- so it is offered for comparability, not by default.

Batching: every image is encoded once (``method="encode_images"``, one media block of
[tokens_per_image, media_dim] per pool image); rows of (query, candidate) then gather their
images' media from that bank inside the jitted scorer (``media=``), so no image goes through the
tower twice, whatever the shots or candidates. Rows are RIGHT-padded to a length bucket (a
multiple of `length_bucket`, capped at the model's max_len) and run `batch_size` rows at a time
(the last batch padded with copies), so the scorer compiles once per (number of images, bucket).
Right padding keeps every real token at the position it has unpadded: the decoder derives
positions from `input_mask` (``cumsum(input_mask) - 1``), attention is causal and padding keys
are masked, so a row's log-likelihoods equal those of the same row run alone
(tests/eval/test_few_shot.py checks this against one unbatched forward per candidate with the
pixels).

Episodic accuracy (`episodic_accuracy`): true in-context learning
-----------------------------------------------------------------
Every query is its own episode: the C classes present (the union of support and query labels)
are mapped to C fresh nonsense words (`nonsense_words`: consonant-vowel syllables plus a final
consonant, e.g. "dakom", or a random C-subset of `words` in random order), the demonstrations
show those words as their answers, and the candidates are the episode's C words. The word
assignment is a uniform random bijection drawn independently of the images, so at 0 shots no
model can do better than chance: the expected accuracy is exactly 1/C (the measured one
fluctuates around it, std sqrt(C-1)/C/sqrt(Q)); above chance at k shots means the mapping was
read from the context. An episode keeps its words for every shot count (drawn once, ``default_rng([seed,
2**20])``), only the demonstrations change with k.
"""

from __future__ import annotations

import dataclasses
import functools
import string
from collections.abc import Sequence
from typing import Any

import numpy as np

from mmjax import configs
from mmjax.data.interleaved import END_OF_CHUNK, IMAGE_TOKEN, MarkerIds, marker_ids
from mmjax.errors import InputError

SELECTIONS = ("random", "rices")
NORMALIZE = ("sum", "mean")
DEFAULT_SHOTS = (0, 4, 8)
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


# --------------------------------------------------------------------------------- prompts


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """A demonstration format and its query prefix: ``demo == query + "{answer}" +
    "<|endofchunk|>"``, both starting with the one ``<image>``; ``{question}`` is optional (in
    both or neither)."""

    demo: str
    query: str
    name: str = ""

    def __post_init__(self):
        fields_demo = _fields(self.demo, "demo")
        fields_query = _fields(self.query, "query")
        if self.demo != self.query + "{answer}" + END_OF_CHUNK:
            raise InputError(f"PromptTemplate: demo {self.demo!r} must be the query prefix "
                             f"{self.query!r} + '{{answer}}' + {END_OF_CHUNK!r} (the candidates "
                             "are scored as the continuation of the query prefix)")
        if not self.query.startswith(IMAGE_TOKEN) or self.query.count(IMAGE_TOKEN) != 1:
            raise InputError(f"PromptTemplate: the query prefix {self.query!r} must start with "
                             f"{IMAGE_TOKEN!r} and hold no other")
        if END_OF_CHUNK in self.query:
            raise InputError(f"PromptTemplate: the query prefix {self.query!r} holds {END_OF_CHUNK!r}")
        if not fields_query <= {"question"} or fields_demo != fields_query | {"answer"}:
            raise InputError(f"PromptTemplate: placeholders are {{answer}} (demo only) and "
                             f"{{question}}; got demo {sorted(fields_demo)}, query {sorted(fields_query)}")

    @property
    def needs_question(self) -> bool:
        return "{question}" in self.query


def _fields(text: str, what: str) -> set[str]:
    try:
        return {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as e:
        raise InputError(f"PromptTemplate.{what} {text!r}: {e}") from None


TEMPLATES = {
    "caption": PromptTemplate(f"{IMAGE_TOKEN}Output:{{answer}}{END_OF_CHUNK}",
                              f"{IMAGE_TOKEN}Output:", "caption"),
    "vqa": PromptTemplate(f"{IMAGE_TOKEN}Question:{{question}} Short answer:{{answer}}{END_OF_CHUNK}",
                          f"{IMAGE_TOKEN}Question:{{question}} Short answer:", "vqa"),
}


def get_template(template: str | PromptTemplate) -> PromptTemplate:
    """A preset by name ("caption", "vqa") or a `PromptTemplate` as is."""
    if isinstance(template, PromptTemplate):
        return template
    if isinstance(template, str) and template in TEMPLATES:
        return TEMPLATES[template]
    name = str(template)
    raise InputError(f"unknown prompt template {template!r}{configs.closest_name(name, TEMPLATES)}; "
                     f"known: {', '.join(TEMPLATES)} (or pass a PromptTemplate)")


def _check_text(text: Any, what: str) -> str:
    if not isinstance(text, str):
        raise InputError(f"{what} must be a str, got {type(text).__name__}")
    for marker in (IMAGE_TOKEN, END_OF_CHUNK):
        if marker in text:
            raise InputError(f"{what} {text!r} contains {marker!r}: the markers are written by "
                             "the prompt template")
    return text


def _demo_parts(demo: Any, i: int) -> tuple[str, str | None]:
    if isinstance(demo, str):
        return demo, None
    if isinstance(demo, (tuple, list)) and len(demo) in (1, 2):
        return demo[0], (demo[1] if len(demo) == 2 else None)
    raise InputError(f"demo {i} must be an answer str or an (answer, question) pair, got {demo!r}")


def _prefix(template: PromptTemplate, question: str | None, what: str) -> str:
    if template.needs_question:
        if question is None:
            raise InputError(f"{what}: the {template.name or 'given'} template needs a question "
                             f"({template.query!r})")
        return template.query.format(question=_check_text(question, f"{what} question"))
    if question is not None:
        raise InputError(f"{what}: a question was given but the {template.name or 'given'} "
                         f"template has no {{question}} ({template.query!r})")
    return template.query


def few_shot_prompt(template: str | PromptTemplate, demos: Sequence[Any],
                    query_question: str | None = None) -> str:
    """The k-shot prompt string: each demo (an answer, or (answer, question)) in the template's
    demo format, then the query prefix; k + 1 ``<image>`` markers, the query's last."""
    t = get_template(template)
    parts = []
    for i, demo in enumerate(demos):
        answer, question = _demo_parts(demo, i)
        parts.append(_prefix(t, question, f"demo {i}") + _check_text(answer, f"demo {i} answer")
                     + END_OF_CHUNK)
    parts.append(_prefix(t, query_question, "query"))
    return "".join(parts)


def candidate_tokens(tokenizer: Any, answer: str, markers: MarkerIds | None = None) -> list[int]:
    """A candidate's ids: ``encode(answer) + [<|endofchunk|>]`` (what rank classification scores)."""
    m = markers or marker_ids(tokenizer)
    _check_text(answer, "answer")
    if not answer:
        raise InputError("an answer is empty: every candidate needs at least one token")
    return [int(i) for i in tokenizer.encode(answer)] + [m.end_of_chunk]


def few_shot_tokens(tokenizer: Any, template: str | PromptTemplate, demos: Sequence[Any],
                    query_question: str | None = None, markers: MarkerIds | None = None) -> list[int]:
    """The prompt's ids: BOS, per demo ``encode(prefix) + candidate_tokens(answer)``, then
    ``encode(query prefix)`` (decodes to `few_shot_prompt`'s string)."""
    t = get_template(template)
    m = markers or marker_ids(tokenizer)
    ids = [m.bos]
    for i, demo in enumerate(demos):
        answer, question = _demo_parts(demo, i)
        ids += [int(x) for x in tokenizer.encode(_prefix(t, question, f"demo {i}"))]
        ids += candidate_tokens(tokenizer, answer, m)
    ids += [int(x) for x in tokenizer.encode(_prefix(t, query_question, "query"))]
    return ids


# ---------------------------------------------------------------------- demo selection


def _rng(rng: Any) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _check_k(k: Any, num_support: int, same_pool: bool) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise InputError(f"shots must be non-negative ints, got {k!r}")
    avail = num_support - (1 if same_pool else 0)
    if k > avail:
        extra = " (the query itself is never its own demo)" if same_pool else ""
        raise InputError(f"{k} shots need {k} support examples per query but only {avail} are "
                         f"available{extra}")
    return int(k)


def random_select(rng: Any, num_queries: int, num_support: int, k: int,
                  same_pool: bool = False) -> np.ndarray:
    """[num_queries, k] support indices, k distinct ones per query drawn uniformly; with
    `same_pool` (query i is support i) never the query itself. `rng`: a Generator or a seed."""
    k = _check_k(k, num_support, same_pool)
    if same_pool and num_queries != num_support:
        raise InputError(f"same_pool needs as many queries as support examples, got "
                         f"{num_queries} and {num_support}")
    g = _rng(rng)
    if k == 0:
        return np.zeros((num_queries, 0), np.int64)
    keys = g.random((num_queries, num_support))
    if same_pool:
        keys[np.arange(num_queries), np.arange(num_queries)] = np.inf
    return np.argsort(keys, axis=1, kind="stable")[:, :k].astype(np.int64)


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def rices_select(query_embeddings: Any, support_embeddings: Any, k: int,
                 same_pool: bool = False) -> np.ndarray:
    """[Q, k] indices of the k support rows of highest cosine similarity to each query, in
    increasing similarity: the most similar is LAST (closest to the query in the prompt). Ties
    go to the lower index. With `same_pool` the query's own row is skipped."""
    q, s = np.asarray(query_embeddings), np.asarray(support_embeddings)
    if q.ndim != 2 or s.ndim != 2 or q.shape[1] != s.shape[1]:
        raise InputError(f"RICES embeddings must be [queries, dim] and [support, dim] with the "
                         f"same dim, got {q.shape} and {s.shape}")
    if not (np.all(np.isfinite(q)) and np.all(np.isfinite(s))):
        raise InputError("RICES embeddings hold NaN or infinite values")
    k = _check_k(k, len(s), same_pool)
    if same_pool and len(q) != len(s):
        raise InputError(f"same_pool needs as many queries as support examples, got {len(q)} and {len(s)}")
    if k == 0:
        return np.zeros((len(q), 0), np.int64)
    sim = (_normalize(q) @ _normalize(s).T).astype(np.float64)
    if same_pool:
        sim[np.arange(len(q)), np.arange(len(q))] = -np.inf
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return top[:, ::-1].astype(np.int64)


def select_demos(selection: str, k: int, num_queries: int, num_support: int, *, seed: int = 0,
                 embeddings: Any = None, same_pool: bool = False) -> np.ndarray:
    """`random_select` (``default_rng([seed, k])``) or `rices_select` (``embeddings =
    (support_emb, query_emb)``) by name."""
    if selection == "random":
        return random_select(np.random.default_rng([int(seed), int(k)]), num_queries, num_support,
                             k, same_pool)
    if selection == "rices":
        support_emb, query_emb = _embeddings(embeddings, num_support, num_queries)
        return rices_select(query_emb, support_emb, k, same_pool)
    raise InputError(f"unknown demo selection {selection!r}{configs.closest_name(str(selection), SELECTIONS)}; "
                     f"known: {', '.join(SELECTIONS)}")


def _embeddings(embeddings: Any, num_support: int, num_queries: int) -> tuple[np.ndarray, np.ndarray]:
    if embeddings is None:
        raise InputError("selection='rices' needs embeddings=(support_emb, query_emb): e.g. CLIP "
                         "image features of the support and query images, [n, dim] each")
    if not isinstance(embeddings, (tuple, list)) or len(embeddings) != 2:
        raise InputError("embeddings must be a pair (support_emb, query_emb)")
    s, q = np.asarray(embeddings[0]), np.asarray(embeddings[1])
    if len(s) != num_support or len(q) != num_queries:
        raise InputError(f"embeddings=(support_emb {s.shape}, query_emb {q.shape}) must have one "
                         f"row per support ({num_support}) and query ({num_queries}) image")
    return s, q


# --------------------------------------------------------------------------- the scorer


def _config(model: Any) -> Any:
    c = getattr(model, "config", None)
    if c is None or not hasattr(c, "image_token_index") or not hasattr(c, "tokens_per_image"):
        raise InputError(f"few-shot evaluation needs a Flamingo-family model "
                         f"(mmjax.models.flamingo.Flamingo), got {type(model).__name__}")
    return c


def _check_model_markers(config: Any, markers: MarkerIds) -> None:
    if config.image_token_index != markers.image:
        raise InputError(f"the tokenizer's {IMAGE_TOKEN!r} id is {markers.image} but the model's "
                         f"image_token_index is {config.image_token_index}: model and tokenizer "
                         "must agree")
    eoc = getattr(config, "end_of_chunk_token_id", None)
    if eoc is not None and eoc != markers.end_of_chunk:
        raise InputError(f"the tokenizer's {END_OF_CHUNK!r} id is {markers.end_of_chunk} but the "
                         f"model's end_of_chunk_token_id is {eoc}")


def _check_images(images: Any, config: Any, what: str) -> np.ndarray:
    x = np.asarray(images)
    h, w = config.vision.image_hw
    want = (h, w, config.vision.channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
        raise InputError(f"{what} must be float [n, {h}, {w}, {want[2]}] (NHWC, normalised, the "
                         f"model's image size), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"{what} must be float (CLIP-normalised, e.g. mmjax.data.interleaved."
                         f"image_pool), got dtype {x.dtype}")
    if len(x) == 0:
        raise InputError(f"{what} is empty")
    return x


def _check_labels(labels: Any, n: int | None, what: str, num_classes: int | None = None) -> np.ndarray:
    """[n] integer labels (n None: any length), within [0, num_classes) when given."""
    y = np.asarray(labels)
    if y.ndim != 1 or (n is not None and len(y) != n) or not np.issubdtype(y.dtype, np.integer):
        want = "n" if n is None else n
        raise InputError(f"{what} must be [{want}] integer labels (one per image), got shape "
                         f"{y.shape} dtype {y.dtype}")
    if num_classes is not None and len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise InputError(f"{what} must index class_names ([0, {num_classes})), got "
                         f"[{y.min()}, {y.max()}]")
    return y.astype(np.int64)


def _questions(questions: Any, n: int, template: PromptTemplate, what: str) -> list[str | None]:
    if questions is None:
        if template.needs_question:
            raise InputError(f"the {template.name or 'given'} template needs {what} (one str for "
                             "all, or one per image)")
        return [None] * n
    if not template.needs_question:
        raise InputError(f"{what} given but the {template.name or 'given'} template has no "
                         "{question}")
    if isinstance(questions, str):
        return [questions] * n
    qs = list(questions)
    if len(qs) != n:
        raise InputError(f"{what} must be one str or {n} strs (one per image), got {len(qs)}")
    return qs


@functools.lru_cache(maxsize=8)
def _jitted(model: Any) -> tuple[Any, Any]:
    import jax
    import jax.numpy as jnp

    def encode(params, images):  # [B, H, W, C] -> [B, R, D]
        return model.apply({"params": params}, images[:, None], method="encode_images")[:, 0]

    def score(params, bank, tokens, input_mask, target_mask, media_index):
        media = bank[media_index]  # [B, N, R, D]: each row's images, from the one encoding
        logits = model.apply({"params": params}, tokens, media=media, input_mask=input_mask)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        token_lp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        return jnp.where(target_mask[:, 1:], token_lp, 0.0).sum(-1)

    return jax.jit(encode), jax.jit(score)


def _functions(model: Any) -> tuple[Any, Any]:
    try:
        return _jitted(model)
    except TypeError:  # an unhashable module: jit afresh
        return _jitted.__wrapped__(model)


def encode_media(model: Any, params: Any, images: Any, batch_size: int = 64) -> Any:
    """Every image's media once: images [n, H, W, C] -> [n, tokens_per_image, media_dim] (the
    model's ``encode_images``, `batch_size` images per jitted call, the last batch padded)."""
    import jax.numpy as jnp

    encode, _ = _functions(model)
    x = np.asarray(images, np.float32)
    n = len(x)
    out = []
    for start in range(0, n, batch_size):
        chunk = x[start:start + batch_size]
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], pad, axis=0)])
        out.append(encode(params, jnp.asarray(chunk))[:batch_size - pad])
    return jnp.concatenate(out)


def rank_scores(model: Any, params: Any, bank: Any, prompts: Sequence[Sequence[int]],
                media_index: Any, candidates: Sequence[Sequence[Sequence[int]]], *,
                batch_size: int = 32, length_bucket: int = 32, normalize: str = "sum") -> np.ndarray:
    """Rank-classification scores [Q, C]: the log-likelihood of candidate c's ids (`candidates[q]
    [c]`, its last id `<|endofchunk|>`) after prompt q's ids, the prompt's images being rows
    `media_index[q]` ([N] per query, in `<image>` order) of `bank` [M, R, D] (`encode_media`).
    Rows are right-padded to a multiple of `length_bucket` and scored `batch_size` at a time."""
    import jax.numpy as jnp

    if normalize not in NORMALIZE:
        raise InputError(f"normalize={normalize!r}{configs.closest_name(str(normalize), NORMALIZE)}; "
                         f"known: {', '.join(NORMALIZE)}")
    if batch_size < 1 or length_bucket < 1:
        raise InputError(f"batch_size and length_bucket must be positive, got {batch_size}, {length_bucket}")
    c = _config(model)
    _, score = _functions(model)
    media_index = np.asarray(media_index, np.int32)
    nq = len(prompts)
    if media_index.ndim != 2 or len(media_index) != nq:
        raise InputError(f"media_index must be [queries={nq}, images], got {media_index.shape}")
    num_c = {len(cs) for cs in candidates}
    if len(candidates) != nq or len(num_c) != 1 or 0 in num_c:
        raise InputError("candidates must hold the same non-zero number of candidates per query")
    num_c = num_c.pop()
    max_len = int(c.max_len)
    rows: dict[int, list[tuple[int, int, list[int], int]]] = {}  # bucket -> (q, c, ids, start)
    for q, prompt in enumerate(prompts):
        n_img = int(np.sum(np.asarray(prompt) == c.image_token_index))
        if n_img != media_index.shape[1]:
            raise InputError(f"prompt {q} holds {n_img} {IMAGE_TOKEN} tokens but "
                             f"{media_index.shape[1]} images were given")
        for j, cand in enumerate(candidates[q]):
            ids = list(prompt) + list(cand)
            if len(ids) > max_len:
                raise InputError(f"prompt {q} with candidate {j} is {len(ids)} tokens, more than "
                                 f"the model's max_len={max_len}: use fewer shots or shorter texts")
            bucket = min(-(-len(ids) // length_bucket) * length_bucket, max_len)
            rows.setdefault(bucket, []).append((q, j, ids, len(prompt)))
    out = np.zeros((nq, num_c), np.float64)
    for length, group in sorted(rows.items()):
        for start in range(0, len(group), batch_size):
            batch = group[start:start + batch_size]
            real = len(batch)
            batch = batch + [batch[0]] * (batch_size - real)
            tokens = np.zeros((batch_size, length), np.int32)  # pad id 0; masked anyway
            mask = np.zeros((batch_size, length), bool)
            target = np.zeros((batch_size, length), bool)
            media = np.zeros((batch_size, media_index.shape[1]), np.int32)
            for r, (q, _, ids, plen) in enumerate(batch):
                tokens[r, :len(ids)] = ids
                mask[r, :len(ids)] = True
                target[r, plen:len(ids)] = True
                media[r] = media_index[q]
            s = np.asarray(score(params, bank, jnp.asarray(tokens), jnp.asarray(mask),
                                 jnp.asarray(target), jnp.asarray(media)), np.float64)
            for r, (q, j, ids, plen) in enumerate(batch[:real]):
                out[q, j] = s[r] / (len(ids) - plen) if normalize == "mean" else s[r]
    return out


# ------------------------------------------------------------------------- evaluations


@dataclasses.dataclass
class FewShotResult:
    """One shot count's outcome: `scores` [Q, C] (rank-classification log-likelihoods),
    `predictions` [Q] and `labels` [Q] (candidate indices), `demos` [Q, k] (support indices,
    in prompt order), `prompts` (the query prompts as strings), `candidates` [Q][C] (the answer
    strings scored), `accuracy` = mean(predictions == labels)."""

    shots: int
    accuracy: float
    scores: np.ndarray
    predictions: np.ndarray
    labels: np.ndarray
    demos: np.ndarray
    prompts: list[str]
    candidates: list[list[str]]
    chance: float


def _shots(shots: Any) -> tuple[int, ...]:
    shots = (shots,) if isinstance(shots, (int, np.integer)) else tuple(shots)
    if not shots:
        raise InputError("shots is empty: give e.g. (0, 4, 8)")
    for k in shots:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise InputError(f"shots must be non-negative ints, got {shots}")
    if len(set(shots)) != len(shots):
        raise InputError(f"shots lists a count twice: {shots}")
    return tuple(int(k) for k in shots)


def _evaluate(model, params, tokenizer, support_images, support_labels, query_images, query_labels,
              candidates, support_class, query_class, shots, selection, embeddings, template,
              seed, batch_size, length_bucket, normalize, support_questions, query_questions,
              num_classes):
    """The shared loop. `candidates[q]`: query q's C answer strings; a demo of support example
    d in query q's prompt answers ``candidates[q][support_class[d]]``; query q's label is
    `query_class[q]` (labels are checked against `num_classes` when given)."""
    import jax.numpy as jnp

    c = _config(model)
    t = get_template(template)
    markers = marker_ids(tokenizer)
    _check_model_markers(c, markers)
    if normalize not in NORMALIZE:
        raise InputError(f"normalize={normalize!r}{configs.closest_name(str(normalize), NORMALIZE)}; "
                         f"known: {', '.join(NORMALIZE)}")
    if selection not in SELECTIONS:
        raise InputError(f"unknown demo selection {selection!r}"
                         f"{configs.closest_name(str(selection), SELECTIONS)}; known: {', '.join(SELECTIONS)}")
    same_pool = support_images is query_images
    s_img = _check_images(support_images, c, "support_images")
    q_img = s_img if same_pool else _check_images(query_images, c, "query_images")
    _check_labels(support_labels, len(s_img), "support_labels", num_classes)
    _check_labels(query_labels, len(q_img), "query_labels", num_classes)
    shots = _shots(shots)
    for k in shots:
        _check_k(k, len(s_img), same_pool)
    if selection == "rices" and max(shots) > 0:
        _embeddings(embeddings, len(s_img), len(q_img))
    s_q = _questions(support_questions, len(s_img), t, "support_questions")
    q_q = _questions(query_questions, len(q_img), t, "query_questions")
    nq = len(q_img)
    cand_ids = [[candidate_tokens(tokenizer, a, markers) for a in cands] for cands in candidates]
    labels = np.asarray(query_class, np.int64)

    bank = encode_media(model, params, s_img, batch_size)
    offset = 0
    if not same_pool:
        bank = jnp.concatenate([bank, encode_media(model, params, q_img, batch_size)])
        offset = len(s_img)
    results = {}
    for k in shots:
        demos = select_demos(selection, k, nq, len(s_img), seed=seed, embeddings=embeddings,
                             same_pool=same_pool)
        prompts, strings = [], []
        for q in range(nq):
            ds = [(candidates[q][support_class[d]], s_q[d]) if s_q[d] is not None
                  else candidates[q][support_class[d]] for d in demos[q]]
            prompts.append(few_shot_tokens(tokenizer, t, ds, q_q[q], markers))
            strings.append(few_shot_prompt(t, ds, q_q[q]))
        media_index = np.concatenate([demos, offset + np.arange(nq)[:, None]], axis=1)
        scores = rank_scores(model, params, bank, prompts, media_index, cand_ids,
                             batch_size=batch_size, length_bucket=length_bucket, normalize=normalize)
        pred = np.argmax(scores, axis=1)
        results[str(k)] = FewShotResult(
            shots=k, accuracy=float(np.mean(pred == labels)), scores=scores, predictions=pred,
            labels=labels, demos=demos, prompts=strings,
            candidates=[list(cands) for cands in candidates], chance=1.0 / len(candidates[0]))
    return results


def few_shot_predictions(model: Any, params: Any, tokenizer: Any, support_images: Any,
                         support_labels: Any, query_images: Any, query_labels: Any,
                         class_names: Sequence[str], shots: Sequence[int] = DEFAULT_SHOTS,
                         selection: str = "random", embeddings: Any = None,
                         template: str | PromptTemplate = "caption", seed: int = 0,
                         batch_size: int = 32, *, length_bucket: int = 32,
                         normalize: str = "sum", support_questions: Any = None,
                         query_questions: Any = None) -> dict[str, FewShotResult]:
    """`few_shot_accuracy` with everything behind it: {"k": FewShotResult} (scores [Q, C] over
    `class_names`, predictions, demos, prompt strings)."""
    names = [_check_text(n, "class name") for n in class_names]
    if not names:
        raise InputError("class_names is empty")
    if len(set(names)) != len(names):
        raise InputError(f"class_names repeats a name: {names}")

    n = len(names)
    s_lab = _check_labels(support_labels, None, "support_labels", n)
    q_lab = _check_labels(query_labels, None, "query_labels", n)
    return _evaluate(model, params, tokenizer, support_images, s_lab, query_images, q_lab,
                     [names] * len(q_lab), s_lab, q_lab, shots, selection, embeddings, template,
                     seed, batch_size, length_bucket, normalize, support_questions,
                     query_questions, n)


def few_shot_accuracy(model: Any, params: Any, tokenizer: Any, support_images: Any,
                      support_labels: Any, query_images: Any, query_labels: Any,
                      class_names: Sequence[str], shots: Sequence[int] = DEFAULT_SHOTS,
                      selection: str = "random", embeddings: Any = None,
                      template: str | PromptTemplate = "caption", seed: int = 0,
                      batch_size: int = 32, **kwargs: Any) -> dict[str, float]:
    """{"0": acc, "4": acc, "8": acc}: rank-classification accuracy of the queries over
    `class_names` (label y answers ``class_names[y]``) with k demonstrations from the support
    set chosen by `selection` ("random", or "rices" with ``embeddings=(support_emb,
    query_emb)``). Images: float [n, H, W, C], normalised (`mmjax.data.interleaved.image_pool`).
    kwargs: length_bucket, normalize ("sum" | "mean"), support_questions, query_questions (the
    "vqa" template). See the module docstring."""
    res = few_shot_predictions(model, params, tokenizer, support_images, support_labels,
                               query_images, query_labels, class_names, shots, selection,
                               embeddings, template, seed, batch_size, **kwargs)
    return {k: r.accuracy for k, r in res.items()}


def nonsense_words(rng: Any, n: int, syllables: int = 2) -> list[str]:
    """n distinct pronounceable nonsense words: `syllables` consonant-vowel syllables and a final
    consonant ("dakom", "fubez"), drawn uniformly from the 14^(s+1) * 5^s such words."""
    if n < 0 or syllables < 1:
        raise InputError(f"nonsense_words needs n >= 0 and syllables >= 1, got {n}, {syllables}")
    g = _rng(rng)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        cv = [_CONSONANTS[g.integers(len(_CONSONANTS))] + _VOWELS[g.integers(len(_VOWELS))]
              for _ in range(syllables)]
        w = "".join(cv) + _CONSONANTS[g.integers(len(_CONSONANTS))]
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def episodic_predictions(model: Any, params: Any, tokenizer: Any, support_images: Any,
                         support_labels: Any, query_images: Any, query_labels: Any,
                         shots: Sequence[int] = DEFAULT_SHOTS, words: Sequence[str] | None = None,
                         seed: int = 0, *, selection: str = "random", embeddings: Any = None,
                         template: str | PromptTemplate = "caption", batch_size: int = 32,
                         length_bucket: int = 32, normalize: str = "sum", syllables: int = 2,
                         support_questions: Any = None,
                         query_questions: Any = None) -> dict[str, FewShotResult]:
    """`episodic_accuracy` with everything behind it: {"k": FewShotResult}, its `candidates[q]`
    the words of episode q (candidate c = the word of class ``classes[c]``, classes the sorted
    union of the labels), `labels` the query's class index, `chance` = 1 / C."""
    s_lab = _check_labels(support_labels, None, "support_labels")
    q_lab = _check_labels(query_labels, None, "query_labels")
    classes = np.unique(np.concatenate([s_lab, q_lab]))
    num_classes = len(classes)
    if num_classes < 2:
        raise InputError(f"episodic accuracy needs at least 2 classes, got {classes.tolist()}")
    g = np.random.default_rng([int(seed), 1 << 20])  # the words; independent of the demo draws
    if words is None:
        episode_words = [nonsense_words(g, num_classes, syllables) for _ in range(len(q_lab))]
    else:
        pool = [_check_text(w, "word") for w in words]
        if len(set(pool)) != len(pool) or any(not w for w in pool):
            raise InputError("words must be distinct non-empty strings")
        if len(pool) < num_classes:
            raise InputError(f"words holds {len(pool)} words, fewer than the {num_classes} classes "
                             "of an episode")
        episode_words = [[pool[i] for i in g.permutation(len(pool))[:num_classes]]
                         for _ in range(len(q_lab))]
    return _evaluate(model, params, tokenizer, support_images, s_lab, query_images, q_lab,
                     episode_words, np.searchsorted(classes, s_lab),
                     np.searchsorted(classes, q_lab), shots, selection, embeddings, template,
                     seed, batch_size, length_bucket, normalize, support_questions,
                     query_questions, None)


def episodic_accuracy(model: Any, params: Any, tokenizer: Any, support_images: Any,
                      support_labels: Any, query_images: Any, query_labels: Any,
                      shots: Sequence[int] = DEFAULT_SHOTS, words: Sequence[str] | None = None,
                      seed: int = 0, **kwargs: Any) -> dict[str, float]:
    """{"0": acc, "4": acc, "8": acc} over episodes (one per query) that map the classes to
    fresh nonsense words shown only in the context (module docstring): 0 shots is chance
    (1 / number of classes in expectation). kwargs: selection, embeddings, template,
    batch_size, length_bucket, normalize, syllables, support_questions, query_questions."""
    res = episodic_predictions(model, params, tokenizer, support_images, support_labels,
                               query_images, query_labels, shots, words, seed, **kwargs)
    return {k: r.accuracy for k, r in res.items()}
