"""mmjax.eval zero-shot / retrieval / linear probe on constructed embeddings whose answers are
known, and the digits image-caption dataset (mmjax.data.digits)."""

import numpy as np
import pytest

from mmjax.errors import InputError
from mmjax.eval import (build_prompts, class_embeddings, fit_linear_probe, linear_probe_accuracy,
                        retrieval_ranks, retrieval_recall, zero_shot_accuracy)


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --- zero-shot ----------------------------------------------------------------------------------

def fake_encoder(table):
    """encode_text for a fixed {prompt: vector} table (unnormalised on purpose)."""
    calls = []

    def encode(texts):
        calls.append(list(texts))
        return np.stack([table[t] for t in texts])

    encode.calls = calls
    return encode


def test_template_ensembling_averages_normalised_embeddings():
    prompts = build_prompts(["cat", "dog"], ["a {}", "the {}"])
    assert prompts == [["a cat", "the cat"], ["a dog", "the dog"]]
    table = {"a cat": [10.0, 0, 0], "the cat": [0, 1.0, 0], "a dog": [0, 0, 3.0], "the dog": [0, 0, -1.0]}
    encode = fake_encoder(table)
    classes = class_embeddings(encode, prompts, batch_size=3)
    assert [len(c) for c in encode.calls] == [3, 1]  # batched
    # cat: mean of unit (1,0,0) and (0,1,0) -> (1,1,0)/sqrt2 (not dominated by the long vector)
    np.testing.assert_allclose(classes[0], [2 ** -0.5, 2 ** -0.5, 0], atol=1e-6)
    # dog: the two prompts cancel out exactly -> a zero row, not NaN
    assert np.all(np.isfinite(classes[1]))


def test_zero_shot_accuracy_on_constructed_images():
    classes = unit(np.eye(4)[:, :4] + 0.01)
    rng = np.random.default_rng(0)
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    images = np.eye(4)[labels] + 0.05 * rng.normal(size=(8, 4))
    assert zero_shot_accuracy(images, labels, classes) == {"top1": 1.0, "top5": 1.0}
    wrong = (labels + 1) % 4  # every label shifted: top-1 0, top-2 partially right
    acc = zero_shot_accuracy(images, wrong, classes, topk=(1, 4))
    assert acc["top1"] == 0.0 and acc["top4"] == 1.0
    # images halfway between class 0 and class 1: top-1 picks the larger component
    mixed = np.array([[0.6, 0.4, 0, 0], [0.4, 0.6, 0, 0]])
    assert zero_shot_accuracy(mixed, np.array([0, 0]), unit(np.eye(4)), topk=(1, 2)) == {"top1": 0.5, "top2": 1.0}


def test_zero_shot_bad_input():
    with pytest.raises(InputError, match="at least one class name"):
        build_prompts([], ["a {}"])
    with pytest.raises(InputError, match="at least one prompt template"):
        build_prompts(["cat"], [])
    with pytest.raises(InputError, match="placeholder"):
        build_prompts(["cat"], ["a photo"])
    with pytest.raises(InputError, match="at least one class"):
        class_embeddings(lambda t: np.zeros((len(t), 3)), [])
    with pytest.raises(InputError, match="no prompts"):
        class_embeddings(lambda t: np.zeros((len(t), 3)), [["a"], []])
    with pytest.raises(InputError, match="at least one class"):
        zero_shot_accuracy(np.ones((2, 3)), np.zeros(2, int), np.zeros((0, 3)))
    with pytest.raises(InputError, match="class indices"):
        zero_shot_accuracy(np.ones((2, 3)), np.array([0, 5]), np.eye(3))


# --- retrieval ------------------------------------------------------------------------------------

def test_retrieval_recall_known_ranks():
    # image i matches text i; text 2 is placed so that images 0 and 1 outrank its own image 2
    images = unit(np.eye(4))
    texts = unit(np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0.7, 0.6, 0.1, 0], [0, 0, 0, 1]]))
    i2t, t2i = retrieval_ranks(images, texts)
    np.testing.assert_array_equal(t2i, [0, 0, 2, 0])
    # image 2 scores each text by its third component: text 2 (small but > 0) still comes first
    np.testing.assert_array_equal(i2t, [0, 0, 0, 0])
    r = retrieval_recall(images, texts, ks=(1, 2, 3))
    assert r["t2i_r@1"] == 0.75 and r["t2i_r@2"] == 0.75 and r["t2i_r@3"] == 1.0
    assert r["i2t_r@1"] == 1.0


def test_retrieval_with_several_captions_per_image():
    images = unit(np.eye(3))
    # two captions per image; image 1's captions both point at image 2 instead
    texts = unit(np.array([[1, 0, 0], [1, .1, 0], [0, .1, 1], [0, 0, 1], [0, 0, 1], [0, .2, 1]]))
    owner = np.array([0, 0, 1, 1, 2, 2])
    r = retrieval_recall(images, texts, owner, ks=(1, 5))
    # t2i: texts 2 and 3 (image 1) find image 2 first -> 4/6 at R@1; all within 5
    assert r["t2i_r@1"] == pytest.approx(4 / 6) and r["t2i_r@5"] == 1.0
    # i2t: image 1's best own caption (text 2, 0.1 / norm) trails texts 1 and 5 -> miss at R@1
    assert r["i2t_r@1"] == pytest.approx(2 / 3)


def test_class_level_retrieval_with_repeated_captions():
    """Two images per class, one (template) caption per class: any same-class candidate counts."""
    images = unit(np.array([[1, 0.1], [1, -0.1], [0.1, 1], [-0.1, 1]]))
    texts = unit(np.array([[1, 0], [0, 1]]))
    r = retrieval_recall(images, texts, ks=(1,), image_labels=[0, 0, 1, 1], text_labels=[0, 1])
    assert r == {"i2t_r@1": 1.0, "t2i_r@1": 1.0}
    # swapped labels: every query's correct candidates rank last
    r = retrieval_recall(images, texts, ks=(1, 2), image_labels=[1, 1, 0, 0], text_labels=[0, 1])
    assert r["i2t_r@1"] == 0.0 and r["i2t_r@2"] == 1.0 and r["t2i_r@1"] == 0.0
    with pytest.raises(InputError, match="both image_labels and text_labels"):
        retrieval_recall(images, texts, image_labels=[0, 0, 1, 1])
    with pytest.raises(InputError, match="correct candidate"):
        retrieval_recall(images, texts, image_labels=[0, 0, 1, 1], text_labels=[0, 2])


def test_retrieval_bad_input():
    with pytest.raises(InputError, match="no text"):
        retrieval_recall(np.eye(3), np.eye(3)[:2], [0, 1])
    with pytest.raises(InputError, match="one entry per text"):
        retrieval_recall(np.eye(3), np.eye(3), [0, 1])
    with pytest.raises(InputError, match="K >= 1"):
        retrieval_recall(np.eye(3), np.eye(3), ks=(0,))
    with pytest.raises(InputError, match="same dim"):
        retrieval_recall(np.eye(3), np.eye(4))


# --- linear probe ---------------------------------------------------------------------------------

def test_linear_probe_separable_blobs_and_optimality():
    rng = np.random.default_rng(0)
    centers = 4.0 * rng.normal(size=(5, 16))
    y = np.repeat(np.arange(5), 40)
    x = centers[y] + rng.normal(size=(200, 16))
    yt = np.repeat(np.arange(5), 20)
    xt = centers[yt] + rng.normal(size=(100, 16))
    probe = fit_linear_probe(x, y, l2=1e-2)
    assert probe.grad_norm < 1e-4  # converged (the objective is strictly convex)
    assert probe.accuracy(xt, yt) == 1.0
    # the fitted point is the minimiser: its gradient, recomputed in numpy, vanishes
    z = (x - probe.mean) / probe.scale
    logits = z @ probe.weights + probe.bias
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(200), y] -= 1
    grad_w = z.T @ p / 200 + 1e-2 * probe.weights
    assert np.abs(grad_w).max() < 1e-4


def test_linear_probe_random_labels_is_near_chance():
    rng = np.random.default_rng(1)
    x, xt = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    y, yt = rng.integers(0, 4, 300), rng.integers(0, 4, 300)
    acc = linear_probe_accuracy(x, y, xt, yt, l2=1e-1)
    assert 0.1 < acc < 0.45  # chance is 0.25


def test_linear_probe_bad_input():
    with pytest.raises(InputError, match=r"\[n, dim\]"):
        fit_linear_probe(np.zeros(5), np.zeros(5, int))
    with pytest.raises(InputError, match="num_classes >= 2"):
        fit_linear_probe(np.zeros((5, 2)), np.zeros(5, int))
    with pytest.raises(InputError, match="NaN"):
        fit_linear_probe(np.full((4, 2), np.nan), np.array([0, 1, 0, 1]))
    probe = fit_linear_probe(np.eye(4), np.array([0, 1, 0, 1]))
    with pytest.raises(InputError, match="fitted on dim 4"):
        probe.predict(np.zeros((2, 3)))


# --- digits image-caption dataset -----------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    from mmjax.data.digits import load_digits_captions

    return load_digits_captions(image_size=16, test_fraction=0.2, seed=0)


def test_digits_split_is_stratified_disjoint_and_deterministic(digits):
    from mmjax.data.digits import load_digits_captions

    assert len(digits.train) + len(digits.test) == 1797
    assert not set(digits.train.indices) & set(digits.test.indices)
    counts = np.bincount(digits.test.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # 20% of ~180 per class
    again = load_digits_captions(image_size=16, seed=0)
    np.testing.assert_array_equal(again.test.indices, digits.test.indices)
    np.testing.assert_array_equal(again.train.images, digits.train.images)
    other = load_digits_captions(image_size=16, seed=1)
    assert not np.array_equal(other.test.indices, digits.test.indices)
    assert digits.train.images.shape[1:] == (16, 16, 3) and digits.train.images.dtype == np.float32


def test_digits_captions_tokenizer_and_batches(digits):
    from mmjax.data.digits import class_prompts, make_digits_dataset

    tok = digits.tokenizer
    tokens, mask = tok.encode(["handwritten 7", "a photo of the digit seven."], max_len=10)
    assert tokens[0, 0] == tok.bos_id and tokens[0, 3] == tok.eos_id and mask[0].sum() == 4
    assert tokens.max() == tok.eos_id == tok.vocab_size - 1 and tokens[0, 4] == tok.pad_id
    with pytest.raises(InputError, match="not in the vocabulary"):
        tok.encode(["a photo of a cat"])
    with pytest.raises(InputError, match="longer than the context"):
        tok.encode(["a photo of the digit seven"], max_len=4)
    prompts = class_prompts()
    assert len(prompts) == 10 and "a photo of the digit seven." in prompts[7]
    with pytest.raises(InputError, match="at least one prompt template"):
        class_prompts(())

    ds = make_digits_dataset(digits.train, tok, batch_size=32, seed=0, max_len=12)
    first, again = ds[0], ds[0]
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    assert first["images"].shape == (32, 16, 16, 3) and first["tokens"].shape == (32, 12)
    # each caption names its image's digit (by word or by numeral)
    from mmjax.data.digits import DIGIT_NAMES

    inverse = {i: w for w, i in tok._ids.items()}
    for row, label in zip(first["tokens"], first["labels"]):
        words = {inverse.get(int(i)) for i in row}
        assert DIGIT_NAMES[label] in words or str(label) in words
    # every template gets drawn, and a caption's template matches its tokens
    drawn = np.concatenate([ds[i]["template"] for i in range(5)])
    assert set(drawn.tolist()) == set(range(len(digits.train_templates)))
    from mmjax.data.digits import caption

    t, label = int(first["template"][0]), int(first["labels"][0])
    expected, _ = tok.encode([caption(digits.train_templates[t], label)], max_len=12)
    np.testing.assert_array_equal(first["tokens"][0], expected[0])
