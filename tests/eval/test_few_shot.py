"""Few-shot in-context evaluation (mmjax.eval.few_shot): exact prompt strings and ids, RICES
nearest neighbours (most similar last), random demos without the query, rank-classification
scores equal to one unbatched forward per candidate with the pixels (batching, right padding,
length buckets and media reuse), a rigged model whose predictions are known, episodic
nonsense-word episodes, and the named errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.data.digits import DIGIT_NAMES
from mmjax.data.interleaved import END_OF_CHUNK, IMAGE_TOKEN, image_pool
from mmjax.data.tokenizer import Tokenizer
from mmjax.errors import InputError
from mmjax.eval import few_shot as fs
from mmjax.models.flamingo import Flamingo, FlamingoConfig

SIZE = 16


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    text = " ".join(f"<image>Output:{n}<|endofchunk|> a photo of the digit {n}. Question:What "
                    f"digit is this? Short answer:{n}" for n in DIGIT_NAMES * 20)
    return Tokenizer.train([text], tmp_path_factory.mktemp("tok") / "tok.model", 300)


@pytest.fixture(scope="module")
def tok_without_markers(tmp_path_factory):
    return Tokenizer.train(["Output:seven and eight " * 50], tmp_path_factory.mktemp("tok2") / "t.model",
                           280, user_defined_symbols=())


@pytest.fixture(scope="module")
def model_params(tok):
    cfg = FlamingoConfig.from_variant("tiny")
    cfg = cfg.replace(text=cfg.text.replace(vocab_size=tok.vocab_size), additional_vocab_size=0,
                      image_token_index=tok.piece_to_id(IMAGE_TOKEN),
                      end_of_chunk_token_id=tok.piece_to_id(END_OF_CHUNK))
    assert cfg.vision.image_size == SIZE
    model = Flamingo(cfg)
    tokens = jnp.asarray([[tok.bos_id, cfg.image_token_index, 5]], jnp.int32)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens, jnp.zeros((1, 1, SIZE, SIZE, 3)))["params"]
    # open the gates so that the images matter
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.7 if "alpha" in jax.tree_util.keystr(path) else x, params)
    return model, params


@pytest.fixture(scope="module")
def pools():
    train, test = image_pool("digits", "train", SIZE), image_pool("digits", "test", SIZE)
    keep = lambda pool, n: np.concatenate([np.nonzero(pool.labels == c)[0][:n] for c in (1, 4, 7)])
    s, q = keep(train, 2), keep(test, 1)[:2]
    # classes 1, 4, 7 relabelled 0, 1, 2
    relabel = {1: 0, 4: 1, 7: 2}
    support = (train.images[s], np.asarray([relabel[v] for v in train.labels[s]]))
    query = (test.images[q], np.asarray([relabel[v] for v in test.labels[q]]))
    return support, query


NAMES = ["one", "four", "seven"]


# ----------------------------------------------------------------------------------- prompts


def test_prompt_strings_are_exact(tok):
    assert fs.few_shot_prompt("caption", []) == "<image>Output:"
    assert (fs.few_shot_prompt("caption", ["seven", ("one",)])
            == "<image>Output:seven<|endofchunk|><image>Output:one<|endofchunk|><image>Output:")
    vqa = fs.few_shot_prompt("vqa", [("two", "What digit?")], query_question="Which one?")
    assert vqa == ("<image>Question:What digit? Short answer:two<|endofchunk|>"
                   "<image>Question:Which one? Short answer:")
    assert fs.TEMPLATES["caption"].demo == "<image>Output:{answer}<|endofchunk|>"
    assert fs.TEMPLATES["vqa"].demo == "<image>Question:{question} Short answer:{answer}<|endofchunk|>"
    # the ids: BOS, each demo = prefix ids + the candidate's ids, decoding to the string
    demos = ["seven", "one"]
    ids = fs.few_shot_tokens(tok, "caption", demos)
    assert ids[0] == tok.bos_id and tok.decode(ids[1:]) == fs.few_shot_prompt("caption", demos)
    prefix = tok.encode("<image>Output:")
    cand = fs.candidate_tokens(tok, "seven")
    assert cand == tok.encode("seven") + [tok.piece_to_id(END_OF_CHUNK)]
    assert ids == [tok.bos_id] + prefix + cand + prefix + fs.candidate_tokens(tok, "one") + prefix
    assert ids.count(tok.piece_to_id(IMAGE_TOKEN)) == 3
    vqa_demos = [("two", "What digit?")]
    vqa_ids = fs.few_shot_tokens(tok, "vqa", vqa_demos, "Which one?")
    assert tok.decode(vqa_ids[1:]) == fs.few_shot_prompt("vqa", vqa_demos, "Which one?")


def test_templates_and_their_errors():
    with pytest.raises(InputError, match="did you mean 'caption'"):
        fs.get_template("captoin")
    with pytest.raises(InputError, match="query prefix"):
        fs.PromptTemplate("<image>Out:{answer}<|endofchunk|>", "<image>Output:")
    with pytest.raises(InputError, match="needs a question"):
        fs.few_shot_prompt("vqa", [])
    with pytest.raises(InputError, match="has no"):
        fs.few_shot_prompt("caption", [], query_question="why?")
    with pytest.raises(InputError, match="contains"):
        fs.few_shot_prompt("caption", ["a<image>"])
    custom = fs.PromptTemplate("<image>A photo of {answer}<|endofchunk|>", "<image>A photo of ")
    assert fs.few_shot_prompt(custom, ["one"]) == "<image>A photo of one<|endofchunk|><image>A photo of "


# --------------------------------------------------------------------------------- selection


def test_rices_picks_the_true_nearest_neighbours_most_similar_last():
    rng = np.random.default_rng(0)
    support = rng.normal(size=(30, 8))
    query = support[[3, 17]] * 2.0 + 0.01 * rng.normal(size=(2, 8))  # scale: cosine, not dot
    picks = fs.rices_select(query, support, 5)
    sim = (query / np.linalg.norm(query, axis=1, keepdims=True)) @ (
        support / np.linalg.norm(support, axis=1, keepdims=True)).T
    for q in range(2):
        want = np.argsort(-sim[q])[:5][::-1]  # ascending similarity: the best last
        assert picks[q].tolist() == want.tolist()
    assert picks[:, -1].tolist() == [3, 17]
    # same pool: the query's own row is never picked, the next best are
    own = fs.rices_select(support, support, 3, same_pool=True)
    assert not np.any(own == np.arange(30)[:, None])
    sim_ss = (support / np.linalg.norm(support, axis=1, keepdims=True))
    sim_ss = sim_ss @ sim_ss.T
    np.fill_diagonal(sim_ss, -np.inf)
    assert own[:, -1].tolist() == np.argmax(sim_ss, axis=1).tolist()


def test_random_selection_is_distinct_seeded_and_never_the_query():
    picks = fs.random_select(0, 40, 40, 8, same_pool=True)
    assert picks.shape == (40, 8)
    assert all(len(set(row)) == 8 for row in picks.tolist())
    assert not np.any(picks == np.arange(40)[:, None])
    assert np.array_equal(picks, fs.random_select(0, 40, 40, 8, same_pool=True))
    assert not np.array_equal(picks, fs.random_select(1, 40, 40, 8, same_pool=True))
    # every support example can be drawn; the largest k takes all but the query
    many = fs.random_select(np.random.default_rng(3), 200, 10, 3)
    assert set(many.ravel().tolist()) == set(range(10))
    full = fs.random_select(0, 5, 5, 4, same_pool=True)
    assert [sorted(r) for r in full.tolist()] == [sorted(set(range(5)) - {i}) for i in range(5)]
    with pytest.raises(InputError, match="only 4 are available"):
        fs.random_select(0, 5, 5, 5, same_pool=True)


# ---------------------------------------------------------------------------------- scoring

MIXED = ["seven", "four", "one"]  # 5, 4 and 3 tokens: rows of three lengths in one batch
EQUAL = ["zero", "one", "two"]  # 3 tokens each: every 2-shot prompt has one length


@pytest.fixture(scope="module")
def forward(model_params):
    model, _ = model_params
    return jax.jit(lambda p, ids, images: model.apply({"params": p}, ids, images))


def _brute_force(forward, params, tok, support, query, res, q):
    """One unbatched, unpadded forward per candidate, with the pixels (no precomputed media):
    the sum of log p(candidate tokens, <|endofchunk|> | prompt)."""
    s_img, s_lab = support
    demos = res.demos[q]
    prompt = fs.few_shot_tokens(tok, "caption", [res.candidates[q][s_lab[d]] for d in demos])
    images = jnp.asarray(np.concatenate([s_img[demos], query[0][q:q + 1]])[None])
    out = []
    for answer in res.candidates[q]:
        ids = prompt + fs.candidate_tokens(tok, answer)
        logits = forward(params, jnp.asarray([ids], jnp.int32), images)
        logp = np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float32), -1), np.float64)
        out.append(sum(logp[p - 1, ids[p]] for p in range(len(prompt), len(ids))))
    return np.asarray(out)


def test_rank_scores_equal_one_forward_per_candidate(tok, model_params, forward, pools):
    model, params = model_params
    support, query = pools
    assert [len(fs.candidate_tokens(tok, n)) for n in MIXED] == [6, 5, 4]
    assert len({len(fs.candidate_tokens(tok, n)) for n in EQUAL}) == 1
    # batches of 4 rows, buckets of 16 tokens: 6 rows of 3 lengths right-padded to 16, the last
    # batch padded with copies; every image encoded once, the rows gather their media
    mixed = fs.few_shot_predictions(model, params, tok, *support, *query, MIXED, shots=(0,),
                                    batch_size=4, length_bucket=16)["0"]
    equal = fs.few_shot_predictions(model, params, tok, *support, *query, EQUAL, shots=(0, 2),
                                    batch_size=4, length_bucket=16)
    assert set(equal) == {"0", "2"}
    for r in (mixed, equal["0"], equal["2"]):
        assert r.scores.shape == (2, 3) and r.demos.shape == (2, r.shots)
        for q in range(2):
            assert r.prompts[q] == fs.few_shot_prompt(
                "caption", [r.candidates[q][support[1][d]] for d in r.demos[q]])
            np.testing.assert_allclose(r.scores[q], _brute_force(forward, params, tok, support,
                                                                 query, r, q), atol=1e-5, rtol=0)
        assert np.array_equal(r.predictions, np.argmax(r.scores, 1))
        assert r.accuracy == np.mean(r.predictions == query[1])
    # the images matter (gates open): at 0 shots the two prompts are the same text, the scores
    # differ by the query image alone, and follow it when the images are swapped
    zero = mixed.scores
    assert np.abs(zero[0] - zero[1]).max() > 1e-4
    swapped = fs.few_shot_predictions(model, params, tok, *support, query[0][::-1], query[1], MIXED,
                                      shots=(0,), batch_size=4, length_bucket=16)["0"]
    np.testing.assert_allclose(swapped.scores, zero[::-1], atol=1e-5, rtol=0)


def test_rigged_uniform_model_predicts_the_shortest_candidate(tok, model_params, pools):
    """A zero output head: every next-token distribution is uniform, so a candidate of n tokens
    scores exactly -n log V; the sum picks the fewest tokens, the mean ties (first class)."""
    model, params = model_params
    support, query = pools
    rigged = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if "lm_head" in jax.tree_util.keystr(path) else x, params)
    res = fs.few_shot_predictions(model, rigged, tok, *support, *query, MIXED, shots=(0,),
                                  batch_size=4, length_bucket=16)["0"]
    lengths = np.asarray([len(fs.candidate_tokens(tok, n)) for n in MIXED])
    np.testing.assert_allclose(res.scores, np.broadcast_to(-lengths * np.log(tok.vocab_size), (2, 3)),
                               rtol=1e-6)
    assert res.predictions.tolist() == [2, 2]  # "one": 3 + 1 tokens
    labels = np.asarray([2, 0])
    acc = fs.few_shot_accuracy(model, rigged, tok, *support, query[0], labels, MIXED, shots=(0,),
                               batch_size=4, length_bucket=16)
    assert acc == {"0": 0.5}
    mean = fs.few_shot_accuracy(model, rigged, tok, *support, query[0], labels, MIXED, shots=(0,),
                                batch_size=4, length_bucket=16, normalize="mean")
    assert mean == {"0": 0.5}  # every score -log V: the tie goes to class 0, query 1's label


def test_rices_accuracy_uses_the_nearest_demos(tok, model_params, pools):
    model, params = model_params
    support, query = pools
    emb = (support[0].reshape(len(support[0]), -1), query[0].reshape(len(query[0]), -1))
    res = fs.few_shot_predictions(model, params, tok, *support, *query, EQUAL, shots=(0, 2),
                                  selection="rices", embeddings=emb, batch_size=4, length_bucket=16)
    assert np.array_equal(res["2"].demos, fs.rices_select(emb[1], emb[0], 2))
    acc = fs.few_shot_accuracy(model, params, tok, *support, *query, EQUAL, shots=(0, 2),
                               selection="rices", embeddings=emb, batch_size=4, length_bucket=16)
    assert acc == {k: r.accuracy for k, r in res.items()}
    assert set(acc) == {"0", "2"} and all(0.0 <= v <= 1.0 for v in acc.values())
    assert fs.DEFAULT_SHOTS == (0, 4, 8)
    # one pool as both support and queries: no query is its own demo, random or RICES
    for selection in ("random", "rices"):
        own = fs.few_shot_predictions(model, params, tok, *support, *support, EQUAL, shots=(2,),
                                      selection=selection, embeddings=(emb[0], emb[0]),
                                      batch_size=4, length_bucket=16)["2"]
        assert not np.any(own.demos == np.arange(6)[:, None])


# --------------------------------------------------------------------------------- episodic


def test_episodes_map_the_classes_to_fresh_words(tok, model_params, pools):
    model, params = model_params
    support, query = pools
    res = fs.episodic_predictions(model, params, tok, *support, *query, shots=(0, 2),
                                  batch_size=4, length_bucket=16)
    zero, two = res["0"], res["2"]
    assert zero.chance == pytest.approx(1 / 3)
    assert zero.prompts == ["<image>Output:", "<image>Output:"]  # nothing to learn from: chance
    words = zero.candidates
    assert two.candidates == words  # an episode keeps its words for every shot count
    assert all(len(set(w)) == 3 and all(x not in DIGIT_NAMES for x in w) for w in words)
    assert words[0] != words[1]  # fresh words per episode
    for q in range(2):  # the demos answer with the episode's word of their class
        want = [words[q][support[1][d]] for d in two.demos[q]]
        assert two.prompts[q] == fs.few_shot_prompt("caption", want)
        assert two.labels[q] == query[1][q]
    acc = fs.episodic_accuracy(model, params, tok, *support, *query, shots=(0, 2),
                               batch_size=4, length_bucket=16)
    assert acc == {"0": zero.accuracy, "2": two.accuracy}
    # given words: a random subset per episode, in random order
    given = fs.episodic_predictions(model, params, tok, *support, *query, shots=(0,),
                                    words=["blicket", "dax", "wug", "toma"], batch_size=4,
                                    length_bucket=16)["0"]
    assert all(set(w) <= {"blicket", "dax", "wug", "toma"} and len(set(w)) == 3
               for w in given.candidates)


def test_zero_shot_episodes_are_at_chance(tok, model_params):
    """60 episodes at 0 shots: the words are assigned to the classes at random, independently
    of the images, so the accuracy is 1/3 in expectation (std 0.06 here)."""
    model, params = model_params
    test = image_pool("digits", "test", SIZE)
    rows = np.concatenate([np.nonzero(test.labels == c)[0][:20] for c in (1, 4, 7)])
    labels = np.repeat([0, 1, 2], 20)
    res = fs.episodic_predictions(model, params, tok, test.images[rows[:6]], labels[:6],
                                  test.images[rows], labels, shots=(0,), batch_size=4,
                                  length_bucket=16)["0"]
    print("0-shot episodic accuracy", res.accuracy)
    assert abs(res.accuracy - 1 / 3) < 0.2
    assert len({tuple(w) for w in res.candidates}) == 60  # fresh words in every episode


def test_nonsense_words_are_distinct_and_seeded():
    a = fs.nonsense_words(0, 50)
    assert len(set(a)) == 50 and a == fs.nonsense_words(0, 50)
    assert all(len(w) == 5 and w[1] in "aeiou" and w[3] in "aeiou" for w in a)


# ----------------------------------------------------------------------------------- errors


def test_errors_are_named(tok, tok_without_markers, model_params, pools):
    model, params = model_params
    support, query = pools
    args = (model, params, tok, *support, *query, EQUAL)
    with pytest.raises(InputError, match="only 6 are available"):
        fs.few_shot_accuracy(*args, shots=(0, 7))
    with pytest.raises(InputError, match="needs embeddings"):
        fs.few_shot_accuracy(*args, shots=(0, 2), selection="rices")
    with pytest.raises(InputError, match="did you mean 'rices'"):
        fs.few_shot_accuracy(*args, shots=(0, 2), selection="rice")
    with pytest.raises(InputError, match="did you mean 'vqa'"):
        fs.few_shot_accuracy(*args, shots=(0, 2), template="vq")
    with pytest.raises(InputError, match="needs support_questions"):
        fs.few_shot_accuracy(*args, shots=(0, 2), template="vqa")
    with pytest.raises(InputError, match="no single token for '<image>'"):
        fs.few_shot_accuracy(model, params, tok_without_markers, *support, *query, EQUAL)
    with pytest.raises(InputError, match="index class_names"):
        fs.few_shot_accuracy(model, params, tok, *support, *query, EQUAL[:2], shots=(0,))
    other = Flamingo(model.config.replace(image_token_index=7))
    with pytest.raises(InputError, match="image_token_index is 7"):
        fs.few_shot_accuracy(other, params, tok, *support, *query, EQUAL, shots=(0,))
    with pytest.raises(InputError, match="the model's image size"):
        fs.few_shot_accuracy(model, params, tok, support[0][:, :8], support[1], *query, EQUAL,
                             shots=(0,))
    with pytest.raises(InputError, match="words holds 2 words"):
        fs.episodic_accuracy(model, params, tok, *support, *query, shots=(0,), words=["dax", "wug"])
    with pytest.raises(InputError, match="more than the model's max_len=128"):
        fs.rank_scores(model, params, None, [[tok.bos_id] * 130], np.zeros((1, 0)), [[[5]]])
