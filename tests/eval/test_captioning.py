"""Caption metrics (BLEU-1..4 and CIDEr-D as coco-caption computes them) against values worked
out by hand in the comments, an independent exact-fraction BLEU, and nltk's corpus_bleu when
nltk is installed."""

import math
import random
from fractions import Fraction

import numpy as np
import pytest

from mmjax.errors import InputError
from mmjax.eval.captioning import bleu, cider, cider_scores, tokenize

TINY, SMALL = 1e-15, 1e-9   # coco-caption's smoothing constants


# ------------------------------------------------------------------------------------------
# tokenize
# ------------------------------------------------------------------------------------------


def test_tokenize_rule():
    assert tokenize("A man, riding a HORSE.") == ["a", "man", "riding", "a", "horse"]
    assert tokenize('He said: "Look!" (twice); ok?') == ["he", "said", "look", "twice", "ok"]
    assert tokenize("the dog's ball") == ["the", "dogs", "ball"]          # apostrophe deleted
    assert tokenize("a t-shirt - blue -- red") == ["a", "t-shirt", "blue", "red"]
    assert tokenize("  two\tspaces\nand  lines ") == ["two", "spaces", "and", "lines"]
    assert tokenize("") == [] and tokenize(" ... !") == []
    assert tokenize("a/b & 3 [x] {y} `z`") == ["a/b", "&", "3", "x", "y", "z"]
    once = tokenize("A Dog's (big) t-shirt, isn't it?")
    assert tokenize(" ".join(once)) == once                                # idempotent


def test_metrics_tokenize_their_input():
    raw = (["A cat, on THE mat."], [["The cat sat on the mat!", "a cat is on a mat"]])
    clean = (["a cat on the mat"], [["the cat sat on the mat", "a cat is on a mat"]])
    assert bleu(*raw) == bleu(*clean)
    assert cider(*raw) == cider(*clean)
    # tokenizer=None: whitespace split only, so "mat." and "mat" differ
    assert bleu(["the mat."], [["the mat"]], tokenizer=None)["bleu1"] == pytest.approx(0.5, rel=1e-8)
    assert bleu(["the mat."], [["the mat"]])["bleu1"] == pytest.approx(1.0, abs=1e-8)


# ------------------------------------------------------------------------------------------
# BLEU, hand-computed
# ------------------------------------------------------------------------------------------


def test_bleu_identical_is_one():
    # 6 words == the reference: C_n = G_n = 6, 5, 4, 3 and c = r = 6, so every precision is
    # (G + 1e-15) / (G + 1e-9) = 1 - ~1e-9/G and BP = exp(1 - (6 + 1e-9)/(6 + 1e-15)) = 1 - ~2e-10
    s = bleu(["a cat sits on the mat"], [["a cat sits on the mat"]])
    assert list(s) == ["bleu1", "bleu2", "bleu3", "bleu4"]
    for v in s.values():
        assert v == pytest.approx(1.0, abs=1e-9) and v < 1.0


def test_bleu_clipping_and_brevity():
    # ref "the cat is on the mat" (6 words), cand "the the the the" (4 words)
    #   unigrams: "the" x4 clipped by the ref's max count 2 -> C1 = 2, G1 = 4 -> p1 = 1/2
    #   bigrams "the the" x3, trigrams x2, 4-gram x1: none in the ref -> C = 0, G = 3, 2, 1
    #   BP = exp(1 - r/c) = exp(1 - 6/4) = exp(-1/2)
    s = bleu(["the the the the"], [["the cat is on the mat"]])
    bp = math.exp(-0.5)
    assert s["bleu1"] == pytest.approx(0.5 * bp, rel=1e-8)
    # a zero count gives precision 1e-15 / G (the "tiny" smoothing), not 0
    assert s["bleu2"] == pytest.approx((0.5 * TINY / 3) ** (1 / 2) * bp, rel=1e-7)
    assert s["bleu3"] == pytest.approx((0.5 * TINY / 3 * TINY / 2) ** (1 / 3) * bp, rel=1e-7)
    assert s["bleu4"] == pytest.approx((0.5 * TINY / 3 * TINY / 2 * TINY / 1) ** (1 / 4) * bp, rel=1e-7)


def test_bleu_short_candidate_exact_brevity_penalty():
    # cand "the cat" (c = 2) vs ref "the cat sat on the mat" (r = 6): p1 = 2/2, p2 = 1/1, BP =
    # exp(1 - 6/2) = exp(-2); no trigram or 4-gram in the candidate at all (G = 0), so those
    # precisions are 1e-15 / 1e-9 = 1e-6: BLEU-3 = (1e-6)^(1/3) e^-2 = 1e-2 e^-2,
    # BLEU-4 = (1e-12)^(1/4) e^-2 = 1e-3 e^-2
    s = bleu(["the cat"], [["the cat sat on the mat"]])
    e2 = math.exp(-2.0)
    assert s["bleu1"] == pytest.approx(e2, rel=1e-8)
    assert s["bleu2"] == pytest.approx(e2, rel=1e-8)
    assert s["bleu3"] == pytest.approx(1e-2 * e2, rel=1e-8)
    assert s["bleu4"] == pytest.approx(1e-3 * e2, rel=1e-8)


def test_bleu_one_word():
    # cand "cat" == ref "cat": p1 = 1, then G2 = G3 = G4 = 0 -> 1e-6 each:
    # BLEU-2 = (1e-6)^(1/2) = 1e-3, BLEU-3 = (1e-12)^(1/3) = 1e-4, BLEU-4 = (1e-18)^(1/4) = 10^-4.5
    s = bleu(["cat"], [["cat"]])
    assert [s[f"bleu{n}"] for n in (1, 2, 3, 4)] == pytest.approx([1.0, 1e-3, 1e-4, 10 ** -4.5], rel=1e-8)


def test_bleu_corpus_sums_counts_and_closest_reference():
    # image 1: cand "a black dog sits" (c = 4); refs of 7 and 3 words -> closest r = 3
    #   unigrams a, black, dog in ref 1, "sits" in neither: 3/4; bigrams "a black", "black dog"
    #   yes, "dog sits" no: 2/3; trigrams "a black dog" yes, "black dog sits" no: 1/2; 4-gram: 0/1
    # image 2: cand "a cat" (c = 2); refs of 4 and 7 words -> closest r = 4
    #   unigrams a, cat: 2/2; bigram "a cat" in neither ref: 0/1; no 3- or 4-grams (G = 0)
    # corpus: C = 5, 2, 1, 0; G = 6, 4, 2, 1; c = 6, r = 3 + 4 = 7 -> BP = exp(1 - 7/6)
    cands = ["a black dog sits", "a cat"]
    refs = [["a black dog runs fast on grass", "a dog runs"],
            ["a small cat sleeps", "the cat is sleeping on a sofa"]]
    s = bleu(cands, refs)
    bp = math.exp(1 - 7 / 6)
    assert s["bleu1"] == pytest.approx(5 / 6 * bp, rel=1e-8)
    assert s["bleu2"] == pytest.approx((5 / 6 * 2 / 4) ** (1 / 2) * bp, rel=1e-8)
    assert s["bleu3"] == pytest.approx((5 / 6 * 2 / 4 * 1 / 2) ** (1 / 3) * bp, rel=1e-8)
    assert s["bleu4"] == pytest.approx((5 / 6 * 2 / 4 * 1 / 2 * TINY / 1) ** (1 / 4) * bp, rel=1e-7)
    # corpus-level: not the mean of the per-image scores
    per_image = [bleu([c], [r])["bleu1"] for c, r in zip(cands, refs)]
    assert abs(s["bleu1"] - np.mean(per_image)) > 1e-3
    # image order does not matter
    assert bleu(cands[::-1], refs[::-1]) == pytest.approx(s, rel=1e-12)


def test_bleu_closest_tie_goes_to_shorter_reference():
    # c = 4, refs of 3 and 5 words are both 1 away: coco-caption takes the shorter (3), so c > r
    # and BP = 1; every candidate unigram is in ref 2 -> BLEU-1 = 1 (taking 5 would give e^-1/4)
    s = bleu(["a b c d"], [["a b c", "a b c d e"]])
    assert s["bleu1"] == pytest.approx(1.0, abs=1e-9)
    # the closest length is chosen per image, not from the corpus total: the 5-word ref wins here
    s = bleu(["a b c d e f"], [["a b c", "a b c d e f g h"]])   # |3-6| = 3 > |8-6| = 2 -> r = 8
    assert s["bleu1"] == pytest.approx(math.exp(1 - 8 / 6), rel=1e-8)


def test_bleu_max_n_and_empty_candidate():
    s = bleu(["a cat on a mat"], [["a cat on the mat"]], max_n=2)
    # unigrams: a x2 (ref has 1) -> 1, cat, on, mat -> C1 = 4 of 5; bigrams "a cat", "cat on" yes,
    # "on a", "a mat" no -> 2 of 4; c = r = 5
    assert list(s) == ["bleu1", "bleu2"]
    assert s["bleu1"] == pytest.approx(4 / 5, rel=1e-8)
    assert s["bleu2"] == pytest.approx((4 / 5 * 2 / 4) ** 0.5, rel=1e-8)
    # an empty candidate: c = 0 -> ratio ~1e-16, BP = exp(1 - 1e16) = 0
    assert bleu([""], [["a cat"]]) == {f"bleu{n}": 0.0 for n in (1, 2, 3, 4)}
    # the caption may also be empty after tokenization
    assert bleu(["..."], [["a cat"]])["bleu1"] == 0.0


# ------------------------------------------------------------------------------------------
# BLEU, cross-checked
# ------------------------------------------------------------------------------------------

# Every order 1..4 is matched at least once and c > r overall, so the smoothing constants move
# the score by < 1e-9 relative and the definitions of the brevity penalty agree.
CORPUS = [
    ("a man riding a horse on a dirt road",
     ["a man rides a brown horse on a dirt road", "a person on a horse", "man riding horse"]),
    ("two dogs playing with a red ball in the grass",
     ["two dogs play with a ball in the grass", "a pair of dogs chase a red ball"]),
    ("a plate of food with broccoli and rice on a table",
     ["a plate with rice and broccoli on a wooden table", "food on a plate"]),
    ("a red double decker bus driving down a city street",
     ["a double decker bus driving down the street", "a red bus in a city"]),
]


def exact_bleu(cands, refs, max_n=4):
    """Textbook corpus BLEU (Papineni et al.): exact fractions for the precisions, closest
    reference length (ties to the shorter), BP = exp(1 - r/c) when c < r, no smoothing."""
    from collections import Counter
    C, G, c_tot, r_tot = [0] * max_n, [0] * max_n, 0, 0
    for cand, rs in zip(cands, refs):
        w, rws = cand.split(), [r.split() for r in rs]
        for n in range(1, max_n + 1):
            grams = Counter(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
            best: Counter = Counter()
            for rw in rws:
                best |= Counter(tuple(rw[i:i + n]) for i in range(len(rw) - n + 1))
            C[n - 1] += sum(min(k, best[g]) for g, k in grams.items())
            G[n - 1] += max(0, len(w) - n + 1)
        c_tot += len(w)
        r_tot += min((abs(len(rw) - len(w)), len(rw)) for rw in rws)[1]
    bp = 1.0 if c_tot > r_tot else math.exp(1 - r_tot / c_tot)
    out, prod = {}, Fraction(1)
    for n in range(max_n):
        prod *= Fraction(C[n], G[n])
        out[f"bleu{n + 1}"] = float(prod) ** (1 / (n + 1)) * bp
    return out


def test_bleu_matches_exact_reference_implementation():
    cands = [c for c, _ in CORPUS]
    for refs in ([r for _, r in CORPUS], [r[:1] for _, r in CORPUS]):   # several refs; one ref
        ours, ref = bleu(cands, refs), exact_bleu(cands, refs)
        assert all(v > 0.05 for v in ref.values())            # every order matched
        for k in ours:
            assert ours[k] == pytest.approx(ref[k], abs=1e-9), k
    # and on a random corpus with a short candidate pulling c_tot below r_tot (BP < 1)
    rng = random.Random(0)
    vocab = "a the man dog cat on in with red blue ball grass sits runs".split()
    cands, refs = [], []
    for _ in range(30):
        base = [rng.choice(vocab) for _ in range(rng.randint(6, 12))]
        refs.append([" ".join(base), " ".join(base[:-1] + [rng.choice(vocab)])])
        cut = rng.randint(3, len(base))
        cands.append(" ".join(base[:cut]))
    ours, ref = bleu(cands, refs, tokenizer=None), exact_bleu(cands, refs)
    assert sum(len(c.split()) for c in cands) < sum(len(r[0].split()) for r in refs)   # BP < 1
    assert all(v > 0.05 for v in ref.values())
    for k in ours:
        assert ours[k] == pytest.approx(ref[k], abs=1e-9), k


def test_bleu4_matches_nltk():
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    # one reference per candidate: coco's closest reference length is then nltk's
    cands = [c for c, _ in CORPUS]
    refs = [[r[0]] for _, r in CORPUS]
    want = nltk_bleu.corpus_bleu([[r[0].split()] for r in refs], [c.split() for c in cands])
    assert bleu(cands, refs)["bleu4"] == pytest.approx(want, abs=1e-9)


# ------------------------------------------------------------------------------------------
# CIDEr-D, hand-computed
# ------------------------------------------------------------------------------------------


def test_cider_perfect_match_distinct_captions_is_ten():
    # 3 images, candidate == its one reference, captions of >= 4 words sharing no n-gram across
    # images except "a": df = 1 for every other n-gram -> idf = log 3 - log 1 > 0. The candidate
    # and reference vectors are identical, so each order's clipped cosine is |w|^2 / |w|^2 = 1
    # and the length penalty exp(0) = 1: score = 10 * mean(1, 1, 1, 1) = 10 per image.
    caps = ["a red apple on wooden table", "two blue cars parked outside", "a small dog sleeps now"]
    assert cider(caps, [[c] for c in caps]) == pytest.approx(10.0, abs=1e-12)
    np.testing.assert_allclose(cider_scores(caps, [[c] for c in caps]), 10.0, atol=1e-12)


def test_cider_perfect_match_two_words_is_five():
    # two-word captions have no 3- or 4-grams: those orders have zero norms and count 0, so a
    # perfect match scores 10 * mean(1, 1, 0, 0) = 5
    caps = ["red apple", "blue car"]
    assert cider(caps, [[c] for c in caps]) == pytest.approx(5.0, abs=1e-12)
    assert cider(caps, [[c] for c in caps], n=2) == pytest.approx(10.0, abs=1e-12)


def test_cider_zero_idf_scores_zero():
    # every n-gram occurs in every image's references: idf = log 2 - log 2 = 0, all weights 0
    cap = "a dog runs fast"
    assert cider([cap, cap], [[cap], [cap, "a dog runs fast"]]) == 0.0
    # a one-image corpus: idf = log(1 image) - log(max(1, df)) = 0 - 0 for every n-gram (df is 1
    # for a reference n-gram, 0 for any other), so every weight is 0 and CIDEr-D is 0 whatever
    # the caption
    assert cider(["a cat on a mat"], [["a cat on a mat"]]) == 0.0
    assert cider(["something else"], [["a cat"]]) == 0.0


def test_cider_partial_match_and_length_penalty():
    # 2 images, L = log 2. refs: image 1 "a dog runs", image 2 "a cat". "a" is in both -> idf 0;
    # every other reference n-gram has df = 1 -> idf L.
    # image 1, cand "a dog": order 1 cand {a: 0, dog: L} (norm L), ref {a: 0, dog: L, runs: L}
    #   (norm L sqrt 2): clipped dot min(L, L) L = L^2 -> cos 1/sqrt 2. order 2: cand {a dog: L},
    #   ref {a dog: L, dog runs: L} -> 1/sqrt 2. orders 3, 4: candidate empty -> 0.
    #   lengths 2 vs 3 words (1 vs 2 bigrams): penalty exp(-1 / (2 * 6^2)) = exp(-1/72)
    #   score = 10 * (2 / sqrt 2) / 4 * exp(-1/72) = 5/sqrt(2) * exp(-1/72)
    # image 2: perfect two-word match -> 5
    cands, refs = ["a dog", "a cat"], [["a dog runs"], ["a cat"]]
    s1 = 5 / math.sqrt(2) * math.exp(-1 / 72)
    np.testing.assert_allclose(cider_scores(cands, refs), [s1, 5.0], rtol=1e-12)
    assert cider(cands, refs) == pytest.approx((s1 + 5.0) / 2, rel=1e-12)
    # sigma = 1: penalty exp(-1/2)
    assert cider_scores(cands, refs, sigma=1.0)[0] == pytest.approx(5 / math.sqrt(2) * math.exp(-0.5), rel=1e-12)


def test_cider_clips_candidate_counts():
    # 2 images, no n-gram shared between them -> every reference n-gram has idf L = log 2, and so
    # do candidate n-grams absent from the references (df 0 -> log max(1, 0) = 0).
    # image 1, cand "dog dog" vs ref "dog cat": order 1 cand {dog: 2L} (norm 2L), ref {dog: L,
    #   cat: L} (norm L sqrt 2). CIDEr-D's dot min(2L, L) * L = L^2 (plain CIDEr: 2L^2)
    #   -> cos = L^2 / (2L * L sqrt 2) = 1 / (2 sqrt 2); order 2 "dog dog" vs "dog cat": 0;
    #   equal lengths -> penalty 1. score = 10 * 1/(2 sqrt 2) / 4 = 1.25 / sqrt 2
    # image 2: "a bird" == its ref -> 5
    cands, refs = ["dog dog", "a bird"], [["dog cat"], ["a bird"]]
    np.testing.assert_allclose(cider_scores(cands, refs), [1.25 / math.sqrt(2), 5.0], rtol=1e-12)


def test_cider_averages_over_references():
    # image 1, cand "red apple pie", refs "red apple pie" (identical: cos 1 for orders 1..3, the
    # 3-word caption has no 4-gram -> 0) and "green grass field" (nothing shared: 0). Same
    # lengths, penalty 1. score = 10 * mean over orders of ([1, 1, 1, 0] + [0, 0, 0, 0]) / 2
    # = 10 * 0.75 / 2 = 3.75. image 2: perfect two-word match -> 5. corpus (3.75 + 5) / 2
    cands = ["red apple pie", "blue car"]
    refs = [["red apple pie", "green grass field"], ["blue car"]]
    np.testing.assert_allclose(cider_scores(cands, refs), [3.75, 5.0], rtol=1e-12)
    assert cider(cands, refs) == pytest.approx(4.375, rel=1e-12)


def test_cider_properties_on_random_corpus():
    rng = random.Random(1)
    vocab = "a the man dog cat on in with red blue ball grass sits runs big small".split()
    cands, refs = [], []
    for _ in range(20):
        base = [rng.choice(vocab) for _ in range(rng.randint(4, 10))]
        refs.append([" ".join(rng.sample(base, len(base))) for _ in range(rng.randint(1, 4))])
        cands.append(" ".join(base[: rng.randint(1, len(base))]))
    s = cider_scores(cands, refs)
    assert s.shape == (20,) and np.all(s >= 0) and np.all(s <= 10 + 1e-9) and s.max() > 0
    perm = list(range(20))
    rng.shuffle(perm)
    np.testing.assert_allclose(cider_scores([cands[i] for i in perm], [refs[i] for i in perm]), s[perm],
                               rtol=1e-12)


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", [bleu, cider])
def test_errors(metric):
    with pytest.raises(ValueError, match="2 candidates but 1 reference"):
        metric(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="image 1 has no references"):
        metric(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="empty corpus"):
        metric([], [])
    with pytest.raises(ValueError, match="single str"):
        metric(["a"], ["a cat"])
    with pytest.raises(ValueError, match="not a single string"):
        metric("a cat", [["a cat"]])
    with pytest.raises(InputError, match="must be a str"):
        metric(["a", 3], [["a"], ["b"]])


def test_order_and_sigma_errors():
    with pytest.raises(ValueError, match="max_n"):
        bleu(["a"], [["a"]], max_n=0)
    with pytest.raises(ValueError, match="positive int"):
        cider(["a"], [["a"]], n=1.5)
    with pytest.raises(ValueError, match="sigma"):
        cider(["a"], [["a"]], sigma=0)
    with pytest.raises(ValueError, match="str"):
        tokenize(None)
