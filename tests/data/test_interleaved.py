"""Interleaved image-text data (Flamingo): the document format, one image per <image> token
through truncation, loss masks, held-out images, mixture weights, exact resume and the errors
for every kind of misaligned input."""

import json

import numpy as np
import pytest

from mmjax.data.corpora import load_corpus
from mmjax.data.images import CLIP_MEAN, CLIP_STD, normalize
from mmjax.data.interleaved import (
    END_OF_CHUNK,
    IMAGE_TOKEN,
    SOURCE_IDS,
    Chunk,
    InterleavedDataConfig,
    encode_example,
    image_pool,
    make_interleaved_dataset,
    render_document,
)
from mmjax.data.tokenizer import Tokenizer
from mmjax.errors import ConfigError, InputError

SEQ, MAX_IMAGES, SIZE = 64, 5, 32
CFG = InterleavedDataConfig(seq_len=SEQ, max_images=MAX_IMAGES, image_size=SIZE, batch_size=8)


@pytest.fixture(scope="module")
def text():
    return load_corpus("pydoc")[0][:60_000]


@pytest.fixture(scope="module")
def tok(text, tmp_path_factory):
    return Tokenizer.train([text], tmp_path_factory.mktemp("tok") / "tok.model", 512,
                           input_sentence_size=3000)


@pytest.fixture(scope="module")
def tok_without_eoc(text, tmp_path_factory):
    return Tokenizer.train([text], tmp_path_factory.mktemp("tok_no_eoc") / "tok.model", 512,
                           input_sentence_size=3000, user_defined_symbols=("<image>",))


def _dataset(tok, cfg=CFG, split="train", **kw):
    return make_interleaved_dataset(cfg, tok, split, process_index=kw.pop("index", 0),
                                    process_count=kw.pop("count", 1), **kw)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _examples(batches):
    for b in batches:
        for i in range(len(b["tokens"])):
            yield {k: v[i] for k, v in b.items()}


def _pixels(seed, n, size=SIZE):
    return list(np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8))


def _clip(image):
    return normalize(image, CLIP_MEAN, CLIP_STD)


def test_render_document_writes_the_flamingo_format():
    a, b = _pixels(0, 2)
    text, images = render_document(["Intro. ", Chunk(a, "Output:seven"), "between ", (b, "a 3")])
    assert text == "Intro. <image>Output:seven<|endofchunk|>between <image>a 3<|endofchunk|>"
    assert len(images) == 2 and images[0] is a and images[1] is b


def test_every_example_has_one_image_per_image_token(tok):
    image_id, eoc = tok.piece_to_id(IMAGE_TOKEN), tok.piece_to_id(END_OF_CHUNK)
    batches = _take(iter(_dataset(tok)), 8)
    b = batches[0]
    assert b["tokens"].shape == b["targets"].shape == b["loss_mask"].shape == (8, SEQ)
    assert b["tokens"].dtype == np.int32 and b["loss_mask"].dtype == bool and b["input_mask"].dtype == bool
    assert b["images"].shape == (8, MAX_IMAGES, SIZE, SIZE, 3) and b["images"].dtype == np.float32
    assert b["image_valid"].shape == (8, MAX_IMAGES) and b["image_valid"].dtype == bool
    counts, truncated = [], 0
    for ex in _examples(batches):
        n = int(ex["image_valid"].sum())
        assert np.sum(ex["tokens"] == image_id) == n >= 1
        assert ex["image_valid"][:n].all() and not ex["image_valid"][n:].any()  # valid slots first
        assert (np.abs(ex["images"][:n]).reshape(n, -1).max(axis=1) > 0).all()
        assert not ex["images"][n:].any()
        length = int(ex["input_mask"].sum())
        assert ex["input_mask"][:length].all() and (ex["tokens"][length:] == tok.pad_id).all()
        assert ex["tokens"][0] == tok.bos_id and ex["tokens"][1] == image_id
        if ex["source"] == SOURCE_IDS["pairs"]:
            assert n == 1 and np.sum(ex["tokens"] == eoc) == 1
        truncated += ex["tokens"][length - 1] != tok.eos_id
        counts.append(n)
    assert set(counts) == set(range(1, MAX_IMAGES + 1))  # 1..5 images per window
    assert truncated > 0  # some 64-token windows cut a document


def test_loss_mask_trains_text_and_end_of_chunk_only(tok):
    image_id, eoc = tok.piece_to_id(IMAGE_TOKEN), tok.piece_to_id(END_OF_CHUNK)
    trained_eoc = 0
    for ex in _examples(_take(iter(_dataset(tok)), 4)):
        tokens, targets, mask, real = ex["tokens"], ex["targets"], ex["loss_mask"], ex["input_mask"]
        assert (targets[:-1] == tokens[1:]).all() and targets[-1] == tok.pad_id
        expected = np.append(real[1:], False) & (targets != image_id)
        assert (mask == expected).all()
        assert not mask[-1] and not (mask & (targets == tok.pad_id)).any()
        assert not (mask & (targets == image_id)).any() and not (mask & (targets == tok.bos_id)).any()
        trained_eoc += int((mask & (targets == eoc)).sum())
    assert trained_eoc > 0


def test_truncation_drops_the_images_whose_token_was_cut(tok):
    image_id = tok.piece_to_id(IMAGE_TOKEN)
    images = _pixels(1, 5)
    sentence = " the quick brown fox jumps over the lazy dog"
    text, imgs = render_document([Chunk(im, f"chunk {k}{sentence}") for k, im in enumerate(images)])
    full = [tok.bos_id] + tok.encode(text) + [tok.eos_id]
    positions = [p for p, t in enumerate(full) if t == image_id]
    # the window ends right after the third <image>: three images kept, the third without text
    ex = encode_example(text, imgs, tok, seq_len=positions[2] + 1, max_images=5, image_size=SIZE)
    assert ex["image_valid"].tolist() == [True, True, True, False, False]
    assert np.sum(ex["tokens"] == image_id) == 3 and ex["tokens"][-1] == image_id
    np.testing.assert_array_equal(ex["images"][:3], np.stack([_clip(im) for im in images[:3]]))
    assert not ex["images"][3:].any()
    # one token earlier: the third <image> is cut, so is its image
    ex = encode_example(text, imgs, tok, seq_len=positions[2], max_images=5, image_size=SIZE)
    assert ex["image_valid"].sum() == np.sum(ex["tokens"] == image_id) == 2
    # max_images cuts the window before the (max_images + 1)-th <image>
    ex = encode_example(text, imgs, tok, seq_len=len(full) + 10, max_images=3, image_size=SIZE)
    assert ex["image_valid"].sum() == np.sum(ex["tokens"] == image_id) == 3
    assert ex["input_mask"].sum() == positions[3]
    # the whole document fits: everything kept, EOS last
    ex = encode_example(text, imgs, tok, seq_len=len(full), max_images=5, image_size=SIZE)
    assert ex["image_valid"].all() and ex["tokens"][-1] == tok.eos_id
    # a first image outside the window is refused
    late = "a long introduction" * 10 + text
    with pytest.raises(InputError, match="first <image>"):
        encode_example(late, imgs, tok, seq_len=16, max_images=5, image_size=SIZE)


def test_mixture_weights_hold(tok):
    def pairs_fraction(weights):
        cfg = CFG.replace(weights=weights)
        sources = np.concatenate([b["source"] for b in _take(iter(_dataset(tok, cfg)), 63)])
        return np.mean(sources == SOURCE_IDS["pairs"]), len(sources)

    fraction, n = pairs_fraction((1.0, 0.2))
    assert n == 504 and abs(fraction - 0.2 / 1.2) < 0.02
    assert abs(pairs_fraction({"m3w": 1.0, "pairs": 1.0})[0] - 0.5) < 0.02
    assert pairs_fraction((1.0, 0.0))[0] == 0.0


def test_resume_from_a_json_state_gives_the_same_batches(tok):
    it = iter(_dataset(tok))
    _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 3)
    fresh = iter(_dataset(tok))
    fresh.set_state(state)
    for a, b in zip(expected, _take(fresh, 3)):
        assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    # the same pipeline is deterministic, another seed is not the same stream
    first = next(iter(_dataset(tok)))["tokens"]
    assert np.array_equal(first, next(iter(_dataset(tok)))["tokens"])
    assert not np.array_equal(first, next(iter(_dataset(tok, seed=1)))["tokens"])


def test_test_split_shows_only_held_out_images(tok):
    train = {im.tobytes() for s in ("digits", "photos", "faces") for im in image_pool(s, "train", SIZE).images}
    test = {im.tobytes() for s in ("digits", "photos", "faces") for im in image_pool(s, "test", SIZE).images}
    seen = [ex["images"][k].tobytes() for ex in _examples(_take(iter(_dataset(tok, split="test")), 6))
            for k in np.flatnonzero(ex["image_valid"])]
    assert seen and all(s in test and s not in train for s in seen)


def test_process_shards_differ(tok):
    a = next(iter(_dataset(tok, index=0, count=2)))
    b = next(iter(_dataset(tok, index=1, count=2)))
    assert not np.array_equal(a["images"], b["images"])
    assert (a["source"] == b["source"]).all()  # same mixture pattern on every process


def test_tokenizer_without_end_of_chunk_is_refused(tok_without_eoc):
    with pytest.raises(InputError, match=r"<\|endofchunk\|>.*user_defined_symbols"):
        encode_example("<image>a<|endofchunk|>", _pixels(0, 1), tok_without_eoc, SEQ, 5, SIZE)
    with pytest.raises(InputError, match=r"<\|endofchunk\|>"):
        _dataset(tok_without_eoc)


def test_wrong_image_size_is_refused(tok):
    small = _pixels(0, 1, size=8)
    with pytest.raises(InputError, match=r"image 0 is 8x8, expected 32x32.*clip_preprocess"):
        encode_example("<image>a<|endofchunk|>", small, tok, SEQ, 5, SIZE)
    with pytest.raises(InputError, match=r"image 1 has shape \(32, 32, 1\)"):
        encode_example("<image>a<|endofchunk|><image>b<|endofchunk|>",
                       [_clip(_pixels(0, 1)[0]), np.zeros((32, 32, 1), np.float32)], tok, SEQ, 5, SIZE)
    with pytest.raises(InputError, match="must be CLIP-normalised"):
        encode_example("<image>a<|endofchunk|>", [_pixels(0, 1)[0].astype(np.float32)], tok, SEQ, 5, SIZE)


def test_image_and_marker_counts_must_match(tok):
    two = _pixels(0, 2)
    with pytest.raises(InputError, match="more images than <image> markers"):
        encode_example("<image>a<|endofchunk|>", two, tok, SEQ, 5, SIZE)
    with pytest.raises(InputError, match="more <image> markers than images"):
        encode_example("<image>a<|endofchunk|><image>b<|endofchunk|><image>c<|endofchunk|>", two, tok,
                       SEQ, 5, SIZE)


def test_chunk_without_an_image_is_refused(tok):
    with pytest.raises(InputError, match="chunk 1 .*has no image"):
        render_document([Chunk(_pixels(0, 1)[0], "a"), (None, "text without its image")])
    with pytest.raises(InputError, match="chunk 1 has no image"):
        encode_example("<image>a<|endofchunk|>no image here<|endofchunk|>", _pixels(0, 1), tok, SEQ, 5, SIZE)
    with pytest.raises(InputError, match="never closed"):
        encode_example("<image>a", _pixels(0, 1), tok, SEQ, 5, SIZE)
    with pytest.raises(InputError, match="contains '<image>'"):
        render_document([Chunk(_pixels(0, 1)[0], "a <image> inside")])


def test_config_errors_say_what_to_change():
    with pytest.raises(ConfigError, match="did you mean 'photos'"):
        InterleavedDataConfig(pair_sources=("photo",))
    with pytest.raises(ConfigError, match="not all zero"):
        InterleavedDataConfig(weights=(0.0, 0.0))
    with pytest.raises(ConfigError, match="did you mean 'pairs'"):
        InterleavedDataConfig(weights={"m3w": 1.0, "pair": 0.2})
    with pytest.raises(ConfigError, match="max_images=300: must be < seq_len=256"):
        InterleavedDataConfig(max_images=300)
    cfg = InterleavedDataConfig(weights={"m3w": 1.0, "pairs": 0.2})
    assert cfg.weights == (1.0, 0.2) and InterleavedDataConfig.from_dict(cfg.to_dict()) == cfg
