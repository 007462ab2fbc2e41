"""The reward task through the real training loop, from a tiny LM instruction-tuned on pydoc
questions: the decoder comes from the SFT workdir and the score head starts fresh, the loss is
ln 2 exactly with a zero head (and near it with the random one), training lowers it on a small
fixed set of pairs, the held-out reward_accuracy is reported, and bad pairs / sources are
refused."""

import json
import math
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.data import preferences
from mmjax.errors import ConfigError, InputError
from mmjax.ops.alignment import reward_loss
from mmjax.train import run
from mmjax.train.errors import DataError
from mmjax.train.experiment import load_experiment
from mmjax.train.metrics import read_metrics
from mmjax.train.task import build_task

from support import ROOT  # noqa: E402

REWARD_PYDOC = os.path.join(ROOT, "experiments", "reward_pydoc.py")
MODEL = {"dim": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 64,
         "dtype": "float32", "max_len": 256, "dropout": 0.0}
COMMON = {"data.seq_len": 192, "data.batch_size": 8, "data.max_answer_chars": 120,
          "data.system_prompt": "", "optimizer.warmup_steps": 2, "log_every": 2,
          "eval_every": 0, "checkpoint_every": 0}
# the whole tiny model trains (the experiment freezes the lower layers of its 4-layer LLaMA)
REWARD = {**{f"model.text.{k}": v for k, v in MODEL.items()}, **COMMON, "optimizer.freeze": ()}


def overrides(values, init_from, **extra):
    return [f"{k}={v!r}" for k, v in {**values, "init_from": init_from, **extra}.items()]


def decoder(path):
    return ({"path": path, "into": "language_model"},)


@pytest.fixture(scope="module")
def sft(tiny_sft, tmp_path_factory):
    """(this file's directory, the shared tiny SFT workdir: tests/tasks/conftest.py)."""
    return tmp_path_factory.mktemp("reward"), tiny_sft


def test_reward_model_learns_the_training_pairs(sft):
    root, wd = sft
    out = str(root / "rm")
    m = run(REWARD_PYDOC, workdir=out, steps=10, overrides=overrides(
        REWARD, decoder(wd), **{"optimizer.learning_rate": 3e-3, "data.max_train_pairs": 16,
                                "data.rejected_per_held_out": 1}))
    with open(os.path.join(out, "init_from.json")) as f:
        report = json.load(f)
    assert report["kept"] == ["score/kernel"]  # the head starts fresh, the decoder is the SFT's
    assert all(p.startswith("language_model/") for p in report["copied"])
    with open(os.path.join(out, "mmjax_model.json")) as f:
        assert json.load(f)["family"] == "reward"
    assert os.path.isfile(os.path.join(out, "tokenizer.model"))  # the SFT run's, reused
    # a random head (std 0.02) gives small nonzero rewards: the loss is near ln 2, not at it
    assert abs(m["start_val_loss"] - math.log(2)) < 0.05
    for key in ("reward_accuracy", "start_reward_accuracy", "reward_margin", "val_loss"):
        assert key in m and np.isfinite(m[key])
    assert 0.0 <= m["reward_accuracy"] <= 1.0 and m["val_pairs"] == 14  # 1 rejected per held-out question
    # 16 fixed pairs, 5 epochs: the training loss falls well below ln 2
    rows = [r for r in read_metrics(out) if "train_loss" in r]
    assert rows[-1]["step"] == 10 and "reward_accuracy" in rows[-1]
    assert np.mean([r["train_loss"] for r in rows[-2:]]) < min(rows[0]["train_loss"],
                                                               math.log(2)) - 0.1
    assert np.mean([r["reward_margin"] for r in rows[-2:]]) > 0.0


def test_zero_head_loss_is_ln2_and_margin_centering(sft, tmp_path):
    _, wd = sft
    cfg = load_experiment(REWARD_PYDOC, overrides(
        REWARD, decoder(wd), **{"data.max_train_pairs": 8, "data.rejected_per_held_out": 1,
                                "data.margin": 1.0,
                                "data.center_coefficient": 0.01}))
    task = build_task(cfg, str(tmp_path / "rm"), log=lambda s: None)
    params = nn.unbox(task.init_params(jax.random.PRNGKey(0)))
    batch = {k: jnp.asarray(v[:8]) for k, v in task.train_rows.items()}
    rewards = jax.jit(lambda p: task.rewards(p, batch))
    loss = jax.jit(lambda p: task.loss(p, batch, None))
    rc, rr = rewards(params)
    assert float(jnp.max(jnp.abs(rc - rr))) > 0  # random head: rewards differ
    zero = {**params, "score": jax.tree_util.tree_map(jnp.zeros_like, params["score"])}
    rc0, rr0 = rewards(zero)
    assert not np.any(np.asarray(rc0)) and not np.any(np.asarray(rr0))  # every reward exactly 0
    assert float(reward_loss(rc0, rr0)) == pytest.approx(math.log(2), abs=1e-7)
    total, count, aux = loss(zero)
    # with data.margin=1: -log sigmoid(0 - 1) = log(1 + e); centering adds 0.01 * 0
    assert float(total / count) == pytest.approx(math.log1p(math.e), abs=1e-6)
    assert float(aux["reward_accuracy"]) == 0.0  # ties count as wrong
    bigger = {**params, "score": {"kernel": params["score"]["kernel"] + 0.5}}
    total, _, _ = loss(bigger)
    rc1, rr1 = rewards(bigger)
    want = reward_loss(rc1, rr1, margin=1.0) + 0.01 * jnp.mean(jnp.square(rc1 + rr1))
    assert float(total / count) == pytest.approx(float(want), rel=1e-5)
    # rows are the whole conversation: the reward is read at the closing end-of-turn token
    last = task.train_rows["chosen_input_mask"].sum(-1) - 1
    ends = task.train_rows["chosen_inputs"][np.arange(len(last)), last]
    assert set(ends.tolist()) == {task.stop_ids[0]}


def test_bad_pairs_and_sources(sft, tmp_path, monkeypatch, corpus):
    _, wd = sft
    with pytest.raises(ConfigError, match="needs init_from"):
        load_experiment(REWARD_PYDOC, overrides(REWARD, None))
    with pytest.raises(ConfigError, match="no 'language_model' subtree"):
        run(REWARD_PYDOC, workdir=str(tmp_path / "whole"), steps=1,
            overrides=overrides(REWARD, wd))
    # a source without its tokenizer
    bare = str(tmp_path / "bare")
    shutil.copytree(wd, bare)
    os.remove(os.path.join(bare, "tokenizer.model"))
    with pytest.raises(DataError, match="has no tokenizer.model"):
        run(REWARD_PYDOC, workdir=str(tmp_path / "a"), steps=1,
            overrides=overrides(REWARD, decoder(bare)))
    # a tokenizer that is not the one the decoder was trained with (another vocabulary)
    from mmjax.data.tokenizer import Tokenizer

    Tokenizer.train([corpus], os.path.join(bare, "tokenizer.model"), 300)
    with pytest.raises(DataError, match="vocabulary of 512 embedding rows, its tokenizer 300"):
        run(REWARD_PYDOC, workdir=str(tmp_path / "b"), steps=1,
            overrides=overrides(REWARD, decoder(bare)))
    # a pair whose chosen and rejected answers are the same
    real = preferences.load_preferences

    def identical(name, **kw):
        train, held = real(name, **kw)
        return [{**train[0], "rejected": train[0]["chosen"]}] + train[1:], held

    monkeypatch.setattr(preferences, "load_preferences", identical)
    with pytest.raises(InputError, match="chosen and rejected are identical"):
        run(REWARD_PYDOC, workdir=str(tmp_path / "c"), steps=1,
            overrides=overrides(REWARD, decoder(wd)))
