"""The sft task through the real training loop: a tiny LM pretrained on pydoc text, then
instruction-tuned from its workdir (tokenizer reused, weights copied): the held-out loss over
assistant tokens drops, and generation stops at the template's end-of-turn token."""

import json
import os

import jax
import numpy as np
import pytest

from mmjax.errors import ConfigError
from mmjax.train import run
from mmjax.train.errors import DataError

from support import LLM_TEXT, ROOT, tiny_overrides  # noqa: E402

SFT_PYDOC = os.path.join(ROOT, "experiments", "sft_pydoc.py")
TINY_MODEL = {"model.dim": 32, "model.num_layers": 2, "model.num_heads": 4,
              "model.num_kv_heads": 2, "model.mlp_dim": 64, "model.dtype": "float32"}


def sft_overrides(init_from, **extra):
    items = {**TINY_MODEL, "init_from": init_from, "model.max_len": 256, "model.dropout": 0.0,
             "data.seq_len": 192, "data.batch_size": 4, "data.max_answer_chars": 120,
             "data.system_prompt": "", "optimizer.learning_rate": 3e-3,
             "optimizer.warmup_steps": 2, "log_every": 5, "eval_every": 0, "checkpoint_every": 0,
             "sample.num_questions": 4, "sample.max_new_tokens": 16, "sample.show": 2}
    items.update(extra)
    return [f"{k}={v!r}" for k, v in items.items()]


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    lm = str(root / "lm")
    run(LLM_TEXT, workdir=lm, steps=2, overrides=tiny_overrides(corpus, eval_at_start=False))
    wd = str(root / "sft")
    metrics = run(SFT_PYDOC, workdir=wd, steps=20, overrides=sft_overrides(lm))
    return lm, wd, metrics


def test_sft_reuses_the_pretrained_tokenizer_and_weights(runs):
    lm, wd, _ = runs
    with open(os.path.join(lm, "tokenizer.model"), "rb") as a, \
            open(os.path.join(wd, "tokenizer.model"), "rb") as b:
        assert a.read() == b.read()
    report = json.load(open(os.path.join(wd, "init_from.json")))
    assert report["kept"] == [] and report["copied"]


def test_assistant_token_loss_drops(runs):
    _, wd, m = runs
    assert m["step"] == 20 and np.isfinite(m["train_loss"])
    # val_loss is over the held-out answers' tokens (and their </s>) only
    assert m["val_tokens"] == m["start_val_tokens"] > 0
    assert m["val_loss"] < m["start_val_loss"] - 0.5, (m["start_val_loss"], m["val_loss"])
    assert 0.0 <= m["stopped_fraction"] <= 1.0
    assert m["sample"].count("Q: ") == 2 and "reference: " in m["sample"]


def forcing(params, token):
    """Params whose greedy next token is always `token`: every block weight zero (each block
    adds 0 to the residual), norm scales 1, every embedding row ones except `token`'s, twice
    that; with tied embeddings the logits h . E are then largest for `token`."""
    from mmjax.train.optimizer import path_str

    def pick(path, x):
        name = path_str(path)
        if name.startswith("embed/"):
            table = np.ones(x.shape, np.float32)
            table[token] *= 2.0
            return table
        return np.ones(x.shape, np.float32) if "norm" in name else np.zeros(x.shape, np.float32)

    return jax.tree_util.tree_map_with_path(pick, params)


def test_generation_stops_at_the_end_of_turn_token(runs):
    """Greedy answers end at the template's stop id when the model emits it, and run to
    max_new_tokens when it never does; stopped_fraction counts exactly those."""
    from mmjax.train.experiment import load_experiment
    from mmjax.train.inference import load_for_inference
    from mmjax.train.task import build_task

    _, wd, _ = runs
    cfg = load_experiment(SFT_PYDOC, sft_overrides(None))
    task = build_task(cfg, wd, log=lambda _: None)  # the workdir's tokenizer, no training
    _, params, _ = load_for_inference(wd)
    stop = task.stop_ids[0]
    assert stop == task.tokenizer.eos_id  # vicuna_v1 ends answers with </s>
    questions = task.held_out[:3]
    stopped = task.answer(forcing(params, stop), questions)
    assert [s for *_, s in stopped] == [True] * 3 and all(a == "" for _, a, _, _ in stopped)
    other = task.tokenizer.encode("x")[0]
    running = task.answer(forcing(params, other), questions)
    assert [s for *_, s in running] == [False] * 3
    assert all(a == "x" * cfg.sample.max_new_tokens for _, a, _, _ in running)


def test_config_errors(tmp_path):
    from mmjax.train.experiment import load_experiment

    with pytest.raises(ConfigError, match="unknown chat template 'chatml'"):
        load_experiment(SFT_PYDOC, ["data.template='chatml'"])
    with pytest.raises(ConfigError, match="exceeds model.max_len"):
        load_experiment(SFT_PYDOC, ["data.seq_len=1024"])
    empty = tmp_path / "pretrained"
    empty.mkdir()
    with pytest.raises(DataError, match="has no tokenizer.model"):
        run(SFT_PYDOC, workdir=str(tmp_path / "wd"), steps=1,
            overrides=sft_overrides(str(empty)))
