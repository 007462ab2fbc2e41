"""Chat templates (exact texts and label masks per template, image expansion, the generation
prompt, the part-wise vs whole tokenization check, conversation checks, missing template tokens)
and SFT packing (batch keys, segment ids, positions, no loss across examples, over-long
examples, exact resume), on the pydoc BPE tokenizer trained as experiments/llm_text.py trains it.
"""

import json
import re

import numpy as np
import pytest

from mmjax.data import chat, sft
from mmjax.data.corpora import load_corpus
from mmjax.data.text import BATCH_KEYS
from mmjax.data.tokenizer import DEFAULT_USER_SYMBOLS, Tokenizer
from mmjax.errors import ConfigError, InputError

IGNORE = chat.IGNORE
LLAMA3 = chat.TEMPLATES["llama3"].user_symbols


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """The main job's tokenizer: 2048-piece BPE on the pydoc train split (text_data.build)."""
    return Tokenizer.train(load_corpus("pydoc")[0], tmp_path_factory.mktemp("t") / "tok.model",
                           2048, model_type="bpe", seed=0)


@pytest.fixture(scope="module")
def tok3(tmp_path_factory):
    """The same with llama3's header / end-of-turn pieces as user-defined symbols."""
    return Tokenizer.train(load_corpus("pydoc")[0], tmp_path_factory.mktemp("t3") / "tok.model",
                           2048, model_type="bpe", seed=0,
                           user_defined_symbols=DEFAULT_USER_SYMBOLS + LLAMA3)


def conv(*texts, system=None):
    roles = ["user", "assistant"] * len(texts)
    turns = [{"role": r, "content": t} for r, t in zip(roles, texts)]
    return ([{"role": "system", "content": system}] if system is not None else []) + turns


def labelled(r):
    return r.tokens[r.labels != IGNORE].tolist()


def check_aligned(r):
    keep = r.labels != IGNORE
    np.testing.assert_array_equal(r.labels[keep], r.tokens[keep])
    assert r.tokens.dtype == np.int32 and r.labels.dtype == np.int32


def test_vicuna_v1_text_and_labels(tok):
    c = conv("<image>\nWhat does `with` do?", "It wraps a block.", "And for?", "It loops.")
    r = chat.render(c, tok, "vicuna_v1", image_seq_length=3)
    system = chat.TEMPLATES["vicuna_v1"].default_system
    assert r.text == (f"<s>{system} USER: <image>\nWhat does `with` do? ASSISTANT: It wraps a "
                      "block.</s>USER: And for? ASSISTANT: It loops.</s>")
    check_aligned(r)
    eos = tok.eos_id
    # exactly the answers (with their leading space) and the </s> closing each are labelled
    assert labelled(r) == (tok.encode(" It wraps a block.") + [eos] + tok.encode(" It loops.")
                           + [eos])
    assert r.tokens[0] == tok.bos_id and r.labels[0] == IGNORE
    assert r.tokens[-1] == eos and r.labels[-1] == eos
    # the tokens are the whole text's, images expanded, and the user's / headers' carry no label
    whole = ([tok.bos_id] + tok.encode(f"{system} USER: ") + [tok.piece_to_id("<image>")] * 3
             + tok.encode("\nWhat does `with` do? ASSISTANT: It wraps a block.") + [eos]
             + tok.encode("USER: And for? ASSISTANT: It loops.") + [eos])
    assert r.tokens.tolist() == whole
    assert r.n_images == 1 and r.image_mask.sum() == 3
    assert (r.labels[r.image_mask] == IGNORE).all()


def test_llama3_text_and_labels(tok3):
    c = conv("Hi <image>", "Hello.", system="Be brief.")
    r = chat.render(c, tok3, "llama3")
    h = "<|start_header_id|>{}<|end_header_id|>\n\n"
    assert r.text == ("<|begin_of_text|>" + h.format("system") + "Be brief.<|eot_id|>"
                      + h.format("user") + "Hi <image><|eot_id|>" + h.format("assistant")
                      + "Hello.<|eot_id|>")
    check_aligned(r)
    eot = tok3.piece_to_id("<|eot_id|>")
    assert labelled(r) == tok3.encode("Hello.") + [eot]
    assert r.tokens[0] == tok3.piece_to_id("<|begin_of_text|>")
    assert chat.stop_ids("llama3", tok3) == (eot,)
    # the eot closing the system and user turns is not a target
    assert (r.tokens == eot).sum() == 3 and (r.labels == eot).sum() == 1


def test_plain_and_minigpt4(tok):
    image = tok.piece_to_id("<image>")
    r = chat.render(conv("<image>", "a red digit"), tok, "plain", image_seq_length=4)
    assert r.text == "<s><image>a red digit</s>"
    caption = tok.encode("a red digit") + [tok.eos_id]
    assert r.tokens.tolist() == [tok.bos_id] + [image] * 4 + caption
    assert r.labels.tolist() == [IGNORE] * 5 + caption
    assert r.image_starts.tolist() == [1]

    r = chat.render(conv("<image> Describe it.", "A seven."), tok, "minigpt4", image_seq_length=2)
    assert r.text == "<s>###Human: <Img><image></Img> Describe it. ###Assistant: A seven.</s>"
    check_aligned(r)
    assert labelled(r) == tok.encode(" A seven.") + [tok.eos_id]
    start = int(r.image_starts[0])
    assert r.tokens[start:start + 2].tolist() == [image, image]
    assert r.tokens[:start].tolist() == [tok.bos_id] + tok.encode("###Human: <Img>")


def test_images_anywhere_expand_and_never_carry_labels(tok):
    c = conv("<image><image> compare", "Left <image> is larger.")
    r = chat.render(c, tok, "vicuna_v1", image_seq_length=5)
    image = tok.piece_to_id("<image>")
    assert r.n_images == 3 and r.image_mask.sum() == 15
    assert (r.tokens[r.image_mask] == image).all() and (r.tokens[~r.image_mask] != image).all()
    assert (r.labels[r.image_mask] == IGNORE).all()
    assert r.image_starts[1] == r.image_starts[0] + 5
    assert labelled(r) == tok.encode(" Left ") + tok.encode(" is larger.") + [tok.eos_id]


@pytest.mark.parametrize("name", ["vicuna_v1", "minigpt4", "plain"])
def test_generation_prompt_is_the_training_prefix(tok, name):
    """Prompt + the trained answer tokens == the training rendering (no space left dangling)."""
    c = conv("<image>", "A cat on a mat.") if name == "plain" else conv("What is a list?",
                                                                         "A sequence.")
    full = chat.render(c, tok, name)
    prompt = chat.render(c[:-1], tok, name, train=False, add_generation_prompt=True)
    first = int(np.argmax(full.labels != IGNORE))
    assert prompt.tokens.tolist() == full.tokens[:first].tolist()
    assert (prompt.labels == IGNORE).all()
    if name == "vicuna_v1":
        assert prompt.text.endswith("USER: What is a list? ASSISTANT:")


def test_tokenization_mismatch_raises_with_the_turn_and_both_counts(tok):
    # the tokenizer merges MiniGPT-4's "</Img>" with a ">" that starts the text after the image
    assert len(tok.encode("</Img>") + tok.encode(">")) != len(tok.encode("</Img>>"))
    with pytest.raises(InputError, match=r"mismatch in turn 0 \(user\)") as e:
        chat.render(conv("<image>> quoted", "ok"), tok, "minigpt4")
    parts, whole = map(int, re.search(r"part by part it has (\d+) tokens, tokenized whole (\d+)",
                                      str(e.value)).groups())
    assert parts == whole + 1  # ">" + ">" became one ">>"
    # a template gluing its header to the answer: ":=" is one piece of the pydoc tokenizer
    glued = chat.Template(name="glued", begin="<s>", system="", default_system="",
                          user="Q: {content}\n", assistant="A:{content}</s>", end_of_turn="</s>",
                          specials=("<s>", "</s>"))
    with pytest.raises(InputError, match=r"turn 1 \(assistant\).*'glued'"):
        chat.render(conv("x?", "= 3"), tok, glued)
    chat.render(conv("x?", " = 3"), tok, glued)  # a space at the boundary: no merge


def test_conversation_checks(tok):
    with pytest.raises(InputError, match="last turn .* not the assistant's"):
        chat.render(conv("a", "b")[:1], tok, "vicuna_v1")
    chat.render(conv("a", "b")[:1], tok, "vicuna_v1", train=False)  # inference: fine
    with pytest.raises(InputError, match="already the assistant's"):
        chat.render(conv("a", "b"), tok, "vicuna_v1", train=False, add_generation_prompt=True)
    with pytest.raises(InputError, match="turn 1 is 'user' where 'assistant'"):
        chat.render([{"role": "user", "content": "a"}] * 2, tok, "vicuna_v1", train=False)
    with pytest.raises(InputError, match="role 'bot'"):
        chat.render([{"role": "bot", "content": "a"}], tok, "vicuna_v1")
    with pytest.raises(InputError, match=r"holds '</s>'"):
        chat.render(conv("a</s>", "b"), tok, "vicuna_v1")
    with pytest.raises(InputError, match="no system turn"):
        chat.render(conv("<image>", "b", system="sys"), tok, "plain")
    with pytest.raises(ConfigError, match="unknown chat template 'vicuna'.*known: llama3, "
                                          "minigpt4, plain, vicuna_v1"):
        chat.get_template("vicuna")
    # LLaVA's data-file keys and Turn objects are the same conversation
    llava = [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]
    turns = [chat.Turn("user", "a"), chat.Turn("assistant", "b")]
    assert (chat.render(llava, tok, "vicuna_v1").tokens.tolist()
            == chat.render(turns, tok, "vicuna_v1").tokens.tolist())


def test_missing_template_token_names_token_and_template(tok, tmp_path):
    with pytest.raises(ConfigError, match=r"'llama3' needs the token '<\|begin_of_text\|>'"):
        chat.render(conv("a", "b"), tok, "llama3")
    with pytest.raises(ConfigError, match="llama3"):
        chat.stop_ids("llama3", tok)
    assert chat.stop_ids("vicuna_v1", tok) == (tok.eos_id,)
    bare = Tokenizer.train(load_corpus("pydoc")[0][:20_000], tmp_path / "bare.model", 400,
                           user_defined_symbols=())
    with pytest.raises(ConfigError, match="no '<image>' token"):
        chat.render(conv("<image>", "b"), bare, "plain")


# ------------------------------------------------------------------------------------ packing


def convs(n):
    return [conv(f"Question {i}?", "yes " * (1 + i % 4) + "done.") for i in range(n)]


def test_packing_keys_segments_positions_and_no_cross_example_loss(tok):
    data = convs(12)
    cfg = sft.SFTPipelineConfig(seq_len=64, batch_size=3, shuffle=False, num_epochs=1,
                                drop_remainder=False)
    template = chat.Template(name="short", begin="<s>", system="", default_system="",
                             user="USER: {content} ", assistant="ASSISTANT: {content}</s>",
                             end_of_turn="</s>", specials=("<s>", "</s>"))
    ds = sft.make_sft_dataset(data, tok, template, cfg, process_index=0, process_count=1)
    batches = list(ds)
    rendered = [chat.render(c, tok, template) for c in data]
    seen = []
    for b in batches:
        assert set(b) == set(BATCH_KEYS)
        for k in BATCH_KEYS:
            assert b[k].shape[1] == 64
        for row in range(b["inputs"].shape[0]):
            seg, pos, mask = b["segment_ids"][row], b["positions"][row], b["loss_mask"][row]
            assert (mask[seg == 0] == 0).all() and (b["inputs"][row][seg == 0] == tok.pad_id).all()
            for s in sorted(set(seg.tolist()) - {0}):
                idx = np.flatnonzero(seg == s)
                assert idx.tolist() == list(range(idx[0], idx[-1] + 1))
                assert pos[idx].tolist() == list(range(len(idx)))  # restart per example
                seen.append((b["inputs"][row][idx].tolist(), b["targets"][row][idx].tolist(),
                             mask[idx].tolist()))
    assert len(seen) == len(data)  # each example once, whole
    for r in rendered:
        match = [x for x in seen if x[0] == r.tokens[:-1].tolist()]
        assert match, "an example was not packed whole"
        inputs, targets, mask = match[0]
        want = r.labels[1:]
        assert mask == (want != IGNORE).astype(np.float32).tolist()
        # the targets that count are the next tokens' labels: the answer and its </s>
        assert [t for t, m in zip(targets, mask) if m] == want[want != IGNORE].tolist()
        assert targets[-1] == tok.eos_id and mask[-1] == 1.0  # the end-of-turn is a target
    # several examples share rows, and no target ever indexes with IGNORE
    assert sum(len(set(b["segment_ids"][i].tolist()) - {0}) for b in batches
               for i in range(len(b["inputs"]))) > len(batches) * 3
    assert all((b["targets"] >= 0).all() for b in batches)


def test_packing_refuses_long_examples_unless_truncating_and_resumes(tok):
    long = [conv("q", "word " * 80)]
    cfg = sft.SFTPipelineConfig(seq_len=32, batch_size=2, shuffle=False, num_epochs=1,
                                drop_remainder=False)
    with pytest.raises(InputError, match=r"asking 'q' needs \d+ positions .* seq_len=32"):
        list(sft.make_sft_dataset(long, tok, "plain", cfg, process_index=0, process_count=1))
    truncating = sft.SFTPipelineConfig(seq_len=32, batch_size=1, shuffle=False, num_epochs=1,
                                       truncate=True, drop_remainder=False)
    cut = list(sft.make_sft_dataset(long, tok, "plain", truncating, process_index=0,
                                    process_count=1))
    assert cut[0]["segment_ids"].min() == 1  # the row is full: cut to seq_len

    cfg = sft.SFTPipelineConfig(seq_len=96, batch_size=2, seed=3)
    it = iter(sft.make_sft_dataset(convs(20), tok, "plain", cfg, process_index=0,
                                   process_count=1))
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(4)]
    again = iter(sft.make_sft_dataset(convs(20), tok, "plain", cfg, process_index=0,
                                      process_count=1))
    again.set_state(state)
    for a, b in zip(want, [next(again) for _ in range(4)]):
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(a[k], b[k])


def test_eval_rows_count_every_trained_token_once(tok):
    data = convs(9)
    rows = sft.make_sft_eval_rows(data, tok, "vicuna_v1", seq_len=256)
    assert rows.num_targets == sum(chat.render(c, tok, "vicuna_v1").num_targets for c in data)
    batches = list(rows.batches(4))
    assert sum(b["loss_mask"].sum() for b in batches) == rows.num_targets
