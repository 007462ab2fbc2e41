"""Caption-quality metrics: corpus BLEU-1..4 and CIDEr-D, computed as coco-caption does.

    s = bleu(candidates, references)      # {"bleu1": .., "bleu2": .., "bleu3": .., "bleu4": ..}
    c = cider(candidates, references)     # CIDEr-D of the corpus (coco reports it x 100 as "CIDEr")

`candidates[i]` is the generated caption of image i, `references[i]` the list of its ground-truth
captions (one or more). Every string is passed through `tokenize` first (pass `tokenizer=None`
for text that is already tokenized: it is then split on whitespace, as coco-caption's scorers
split the PTB tokenizer's output). Pure Python; no randomness, no state.

tokenize -- the stand-in for coco-caption's PTBTokenizer pass (Stanford PTBTokenizer with
    -lowerCase, then dropping the tokens that are punctuation). The rule, exactly:
      1. lowercase (`str.lower`);
      2. delete every character in  . , ! ? ; : ' " ` ( ) [ ] { }  (PTB turns brackets into
         -LRB- / -RRB- / -LCB- / -RCB- tokens, which coco-caption then removes);
      3. split on whitespace;
      4. drop the tokens made only of hyphens ("-", "--": removed by coco-caption); hyphens
         inside a word stay ("t-shirt"), as PTB keeps hyphenated words whole.
    Everything else (letters, digits, / & $ % # ...) is kept. Known differences from PTB: PTB
    splits clitics into their own token ("dog's" -> "dog 's", "don't" -> "do n't") where this
    rule merges them ("dogs", "dont"), and PTB keeps a decimal number whole ("3.5") where this
    rule gives "35". For plain captions (lowercase words, final period, commas) the
    two agree token for token.

bleu -- coco-caption's `Bleu(4)` (pycocoevalcap/bleu/bleu_scorer.py, `option="closest"`):
    per image, with c = the candidate's length and the references' n-grams:
      guess_n   = max(0, c - n + 1)                         (candidate n-grams)
      correct_n = sum over candidate n-grams g of min(count_cand(g), max over refs count_ref(g))
      r         = the reference length closest to c (a tie goes to the shorter one)
    summed over the corpus to G_n, C_n, c_tot, r_tot, then for N = 1..max_n
      BLEU-N = (prod_{n<=N} (C_n + 1e-15) / (G_n + 1e-9)) ** (1/N) * BP
      BP     = exp(1 - 1/ratio) if ratio < 1 else 1,  ratio = (c_tot + 1e-15) / (r_tot + 1e-9)
    The two constants ("tiny", "small") make a zero count give a tiny positive precision instead
    of a log(0): an order with no match gives 1e-15 / G_n, an order with no candidate n-gram at
    all (a caption shorter than n) gives 1e-6. They also make BP = exp(-~1e-9/c_tot) rather than 1
    when c_tot == r_tot; both effects are kept, so scores match coco-caption's to rounding.

cider -- CIDEr-D as coco-caption's `CiderD` (vrama91/cider, pyciderevalcap/ciderD, df_mode
    "corpus"):
      df(g)   = the number of images among whose references the n-gram g occurs (any reference)
      w(g, s) = count_s(g) * (log(number of images) - log(max(1, df(g))))       (tf-idf)
    and for image i with candidate h and references r_1..r_m, per order n = 1..N:
      sim_n(h, r) = sum_{g in h, |g| = n} min(w(g, h), w(g, r)) * w(g, r) / (|w_n(h)| |w_n(r)|)
                    * exp(-(len(h) - len(r))^2 / (2 sigma^2))
    (the cosine with the candidate's weights clipped by the reference's -- CIDEr-D's min() --
    divided by the unclipped norms; left undivided, i.e. 0, when either norm is 0),
      score_i = 10 * mean_n (sum_j sim_n(h, r_j) / m),      corpus score = mean_i score_i.
    The lengths of the Gaussian penalty are counted as coco-caption counts them, in bigrams
    (max(0, words - 1)): the same difference as in words unless a sentence is empty.
    Consequences worth knowing: an n-gram that occurs in every image's references has idf 0 and
    counts for nothing (so a one-image corpus always scores 0); a perfect match scores 10 only
    if every order 1..N has an n-gram of nonzero weight (a two-word caption matched exactly
    scores 5: orders 3 and 4 are empty). coco-caption's CiderD wrapper always uses sigma = 6.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Sequence

import numpy as np

from mmjax.errors import InputError

_TINY = 1e-15   # coco-caption's bleu_scorer "tiny"
_SMALL = 1e-9   # and "small"

_PUNCTUATION = ".,!?;:'\"`()[]{}"
_DELETE = str.maketrans("", "", _PUNCTUATION)

Tokenizer = Callable[[str], list[str]]


def tokenize(text: str) -> list[str]:
    """Lowercase, delete the characters . , ! ? ; : ' " ` ( ) [ ] { }, split on whitespace and
    drop hyphen-only tokens (see the module docstring for how this relates to PTBTokenizer)."""
    if not isinstance(text, str):
        raise InputError(f"tokenize expects a str, got {type(text).__name__}")
    return [t for t in text.lower().translate(_DELETE).split() if t.strip("-")]


def _split(text: str) -> list[str]:
    return text.split()


def _prepare(candidates: Sequence[str], references: Sequence[Sequence[str]],
             tokenizer: Tokenizer | None) -> tuple[list[list[str]], list[list[list[str]]]]:
    """Validate the corpus and tokenize it: (candidate tokens [images], reference tokens
    [images][refs])."""
    if isinstance(candidates, str) or isinstance(references, str):
        raise InputError("candidates must be a list of captions and references a list of lists of "
                         "captions, not a single string")
    candidates, references = list(candidates), list(references)
    if len(candidates) != len(references):
        raise InputError(f"{len(candidates)} candidates but {len(references)} reference lists: "
                         "need one candidate and one list of references per image")
    if not candidates:
        raise InputError("empty corpus: need at least one image (one candidate and its references)")
    tok = _split if tokenizer is None else tokenizer
    cand_toks, ref_toks = [], []
    for i, (cand, refs) in enumerate(zip(candidates, references)):
        if not isinstance(cand, str):
            raise InputError(f"candidate {i} must be a str, got {type(cand).__name__}")
        if isinstance(refs, str):
            raise InputError(f"references[{i}] must be a list of captions, got a single str "
                             f"({refs[:40]!r}); wrap it in a list")
        refs = list(refs)
        if not refs:
            raise InputError(f"image {i} has no references; every image needs at least one")
        for j, ref in enumerate(refs):
            if not isinstance(ref, str):
                raise InputError(f"reference {j} of image {i} must be a str, got {type(ref).__name__}")
        cand_toks.append(list(tok(cand)))
        ref_toks.append([list(tok(ref)) for ref in refs])
    return cand_toks, ref_toks


def _ngrams(words: list[str], max_n: int) -> Counter:
    """Counts of every n-gram (as a tuple), n = 1..max_n."""
    counts: Counter = Counter()
    for n in range(1, max_n + 1):
        for i in range(len(words) - n + 1):
            counts[tuple(words[i:i + n])] += 1
    return counts


def _check_order(name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError(f"{name} must be a positive int, got {n!r}")
    return int(n)


# ------------------------------------------------------------------------------------------
# BLEU
# ------------------------------------------------------------------------------------------


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4, *,
         tokenizer: Tokenizer | None = tokenize) -> dict[str, float]:
    """Corpus BLEU-1..max_n as coco-caption's Bleu computes it (clipped n-gram counts summed over
    the corpus, the closest reference length for the brevity penalty, its 1e-15 / 1e-9
    smoothing). Returns {"bleu1": .., ..., f"bleu{max_n}": ..}."""
    max_n = _check_order("max_n", max_n)
    cand_toks, ref_toks = _prepare(candidates, references, tokenizer)
    guess, correct = [0] * max_n, [0] * max_n
    test_len, ref_len = 0, 0
    for cand, refs in zip(cand_toks, ref_toks):
        c = len(cand)
        max_ref: dict = {}
        for ref in refs:
            for g, k in _ngrams(ref, max_n).items():
                if k > max_ref.get(g, 0):
                    max_ref[g] = k
        for g, k in _ngrams(cand, max_n).items():
            correct[len(g) - 1] += min(k, max_ref.get(g, 0))
        for n in range(max_n):
            guess[n] += max(0, c - n)
        test_len += c
        ref_len += min((abs(len(ref) - c), len(ref)) for ref in refs)[1]

    ratio = (test_len + _TINY) / (ref_len + _SMALL)
    brevity = math.exp(1.0 - 1.0 / ratio) if ratio < 1 else 1.0
    out, prod = {}, 1.0
    for n in range(max_n):
        prod *= (correct[n] + _TINY) / (guess[n] + _SMALL)
        out[f"bleu{n + 1}"] = prod ** (1.0 / (n + 1)) * brevity
    return out


# ------------------------------------------------------------------------------------------
# CIDEr-D
# ------------------------------------------------------------------------------------------


def _tfidf(counts: Counter, df: Counter, log_images: float, n: int
           ) -> tuple[list[dict], list[float]]:
    """Per order: {n-gram: tf * idf} and the vector's L2 norm."""
    vec: list[dict] = [{} for _ in range(n)]
    sq = [0.0] * n
    for g, tf in counts.items():
        w = float(tf) * (log_images - math.log(max(1.0, float(df.get(g, 0)))))
        vec[len(g) - 1][g] = w
        sq[len(g) - 1] += w * w
    return vec, [math.sqrt(s) for s in sq]


def cider_scores(candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4,
                 sigma: float = 6.0, *, tokenizer: Tokenizer | None = tokenize) -> np.ndarray:
    """Per-image CIDEr-D scores [num_images] (float64); `cider` is their mean. Document
    frequencies are those of this corpus's references, so a score depends on the whole corpus."""
    n = _check_order("n", n)
    sigma = float(sigma)
    if not sigma > 0 or not math.isfinite(sigma):
        raise InputError(f"sigma must be a positive finite number, got {sigma!r}")
    cand_toks, ref_toks = _prepare(candidates, references, tokenizer)

    cand_counts = [_ngrams(c, n) for c in cand_toks]
    ref_counts = [[_ngrams(r, n) for r in refs] for refs in ref_toks]
    df: Counter = Counter()
    for refs in ref_counts:
        df.update(set().union(*(r.keys() for r in refs)))
    log_images = math.log(float(len(cand_toks)))

    def length(words):          # coco-caption counts a sentence's length in bigrams
        return max(0, len(words) - 1)

    scores = np.zeros(len(cand_toks))
    for i, (cand, refs, rcounts) in enumerate(zip(cand_toks, ref_toks, ref_counts)):
        vh, nh = _tfidf(cand_counts[i], df, log_images, n)
        total = [0.0] * n
        for ref, rc in zip(refs, rcounts):
            vr, nr = _tfidf(rc, df, log_images, n)
            delta = float(length(cand) - length(ref))
            penalty = math.exp(-(delta * delta) / (2.0 * sigma * sigma))
            for k in range(n):
                dot = 0.0
                for g, w in vh[k].items():
                    wr = vr[k].get(g, 0.0)
                    dot += min(w, wr) * wr
                if nh[k] != 0 and nr[k] != 0:
                    dot /= nh[k] * nr[k]
                total[k] += dot * penalty
        scores[i] = sum(total) / n / len(refs) * 10.0
    return scores


def cider(candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4,
          sigma: float = 6.0, *, tokenizer: Tokenizer | None = tokenize) -> float:
    """Corpus CIDEr-D as coco-caption's CiderD computes it: the mean over images of
    10 * mean over n-gram orders 1..n of the reference-averaged, clipped tf-idf cosine times a
    Gaussian length penalty (sigma). See the module docstring for the exact definition."""
    return float(np.mean(cider_scores(candidates, references, n, sigma, tokenizer=tokenizer)))
