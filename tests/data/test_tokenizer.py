"""Sentencepiece Tokenizer: training (BPE, unigram), lossless round trips, special pieces,
determinism across processes, batch encoding, save/load and errors."""

import os
import pathlib
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest

from mmjax.data.corpora import load_corpus
from mmjax.data.tokenizer import Tokenizer
from mmjax.errors import ConfigError, InputError, MmjaxError

VOCAB = 512
TRAIN_CHARS = 120_000
UNUSUAL = "naïve café — 東京 😀"


@pytest.fixture(scope="module")
def pydoc():
    train, val = load_corpus("pydoc")
    return train[:TRAIN_CHARS], val


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def trained(request, pydoc, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "tok.model"
    start = time.perf_counter()
    tok = Tokenizer.train([pydoc[0]], path, VOCAB, model_type=request.param,
                          input_sentence_size=4000, num_threads=2)
    seconds = time.perf_counter() - start
    return tok, path, seconds


def test_training_writes_the_model(trained):
    # no timed assertion (docs/testing.md: speed is a benchmark, not a test); the time is kept
    # in the fixture for a person reading a failure
    tok, path, _seconds = trained
    assert os.path.isfile(path)
    assert tok.vocab_size == VOCAB
    assert Tokenizer.load(path).serialized_model_proto() == tok.serialized_model_proto()


def test_round_trip_on_held_out_text_and_unusual_unicode(trained, pydoc):
    tok = trained[0]
    held_out = pydoc[1][:20_000]
    samples = [held_out, UNUSUAL, "  leading, trailing  \n\n\ttabs\t\n", "x" * 3 + "\n\n\n",
               "a\x00b\r\n", "", "<image> caption<|endofchunk|>"]
    for text in samples:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    # Characters never seen in training come back through byte pieces, not <unk>.
    ids = tok.encode(UNUSUAL)
    assert tok.unk_id not in ids
    byte_pieces = [tok.id_to_piece(i) for i in tok.encode("東")]
    assert byte_pieces == ["<0xE6>", "<0x9D>", "<0xB1>"]
    # A learned vocabulary compresses in-domain text: byte pieces alone would give 1 per byte.
    assert len(tok.encode(held_out)) < 0.75 * len(held_out.encode("utf-8"))


def test_user_defined_symbols_are_single_unsplit_tokens(trained):
    tok = trained[0]
    image, chunk = tok.piece_to_id("<image>"), tok.piece_to_id("<|endofchunk|>")
    assert len({image, chunk, tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id}) == 6
    ids = tok.encode("<image><image>A cat.<|endofchunk|>x<image>")
    assert ids[:2] == [image, image]
    assert ids.count(image) == 3 and ids.count(chunk) == 1
    assert ids[-1] == image
    # Glued to other text they still come out whole.
    assert image in tok.encode("abc<image>def")
    assert tok.decode([image, chunk]) == "<image><|endofchunk|>"


def test_special_ids_are_distinct_and_reported(trained):
    tok = trained[0]
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    special = tok.special_ids
    assert special["<pad>"] == tok.pad_id and special["<s>"] == tok.bos_id
    assert special["</s>"] == tok.eos_id and special["<unk>"] == tok.unk_id
    assert special["<image>"] == tok.piece_to_id("<image>")
    assert len(set(special.values())) == len(special) == 6


def test_bos_eos_and_pad_handling(trained):
    tok = trained[0]
    plain = tok.encode("hello world")
    assert tok.encode("hello world", add_bos=True, add_eos=True) == [tok.bos_id, *plain, tok.eos_id]
    padded = [tok.pad_id, tok.pad_id, tok.bos_id, *plain, tok.eos_id, tok.pad_id]
    assert tok.decode(padded) == "hello world"
    assert tok.decode(np.asarray(padded, np.int32)) == "hello world"


def test_batch_encode_and_decode_match_single_calls(trained, pydoc):
    tok = trained[0]
    texts = [pydoc[1][i * 500:(i + 1) * 500] for i in range(6)] + [UNUSUAL, ""]
    batch = tok.encode(texts, add_bos=True)
    assert batch == [tok.encode(t, add_bos=True) for t in texts]
    assert tok.decode(batch) == texts
    rows = np.full((2, 12), tok.pad_id, np.int32)
    rows[0, :3] = tok.encode("abc")[:3]
    assert tok.decode(rows) == [tok.decode(rows[0]), ""]


def _train_in_subprocess(text_file, model_path, model_type):
    code = (
        "import pathlib, sys; from mmjax.data.tokenizer import Tokenizer; "
        f"Tokenizer.train([pathlib.Path({str(text_file)!r})], {str(model_path)!r}, {VOCAB}, "
        f"model_type={model_type!r}, input_sentence_size=1000, num_threads=2)"
    )
    repo_root = pathlib.Path(__file__).parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(repo_root))
    return pathlib.Path(model_path).read_bytes()


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_training_is_deterministic_across_processes(model_type, pydoc, tmp_path):
    # A file input, sampled (input_sentence_size < number of lines): the sample must be seeded.
    text_file = tmp_path / "corpus.txt"
    text_file.write_text(pydoc[0][:100_000], encoding="utf-8")
    assert len([l for l in pydoc[0][:100_000].split("\n") if l]) > 1000
    here = Tokenizer.train([text_file], tmp_path / "here", VOCAB, model_type=model_type,
                           input_sentence_size=1000, num_threads=2)
    assert os.path.isfile(tmp_path / "here.model")
    there = _train_in_subprocess(text_file, tmp_path / "there.model", model_type)
    assert here.serialized_model_proto() == there
    other_seed = Tokenizer.train([text_file], tmp_path / "seed1", VOCAB, model_type=model_type,
                                 input_sentence_size=1000, num_threads=2, seed=1)
    assert other_seed.serialized_model_proto() != there


def test_save_copies_the_model_and_pickles_by_value(trained, tmp_path):
    tok = trained[0]
    out = tok.save(tmp_path / "ckpt" / "tokenizer.model")
    assert pathlib.Path(out).read_bytes() == tok.serialized_model_proto()
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(UNUSUAL) == tok.encode(UNUSUAL)


def test_errors_name_the_problem(trained, tmp_path):
    tok = trained[0]
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(InputError, match="nope/tokenizer.model"):
        Tokenizer.load(missing)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(InputError, match="garbage.model"):
        Tokenizer.load(garbage)
    with pytest.raises(InputError, match="not in the tokenizer vocabulary"):
        tok.piece_to_id("<video-never-added>")
    with pytest.raises(InputError, match="outside the vocabulary"):
        tok.decode([5, VOCAB + 3])
    with pytest.raises(ConfigError, match="model_type"):
        Tokenizer.train(["some text"], tmp_path / "x", VOCAB, model_type="wordpiece")
    with pytest.raises(ConfigError, match="vocab_size=200"):
        Tokenizer.train(["some text"], tmp_path / "x", 200)
    with pytest.raises(InputError, match="empty"):
        Tokenizer.train(["  \n"], tmp_path / "x", VOCAB)
    with pytest.raises(InputError, match="missing.txt"):
        Tokenizer.train([tmp_path / "missing.txt"], tmp_path / "x", VOCAB)
    # Too large a vocabulary for a tiny corpus: sentencepiece's complaint, as a ConfigError.
    with pytest.raises(MmjaxError, match="vocab_size=4000"):
        Tokenizer.train(["tiny corpus"], tmp_path / "x", 4000, model_type="unigram")
