"""The dpo task through the real training loop, from a tiny LM instruction-tuned on pydoc
questions: the held-out DPO loss starts at ln 2 (policy == reference), the implicit reward
learns to rank the chosen answers above the rejected ones, LoRA DPO works through the same
stack, and bad preference data / references are refused."""

import math
import os

import numpy as np
import pytest

from mmjax import checkpoint
from mmjax.data import preferences
from mmjax.errors import ConfigError, InputError
from mmjax.train import run
from mmjax.train.metrics import read_metrics

from support import ROOT  # noqa: E402

DPO_PYDOC = os.path.join(ROOT, "experiments", "dpo_pydoc.py")
TINY = {"model.dim": 32, "model.num_layers": 2, "model.num_heads": 4, "model.num_kv_heads": 2,
        "model.mlp_dim": 64, "model.dtype": "float32", "model.max_len": 256,
        "model.dropout": 0.0, "data.seq_len": 192, "data.batch_size": 8,
        "data.max_answer_chars": 120, "data.system_prompt": "", "optimizer.warmup_steps": 2,
        "log_every": 5, "eval_every": 0, "checkpoint_every": 0, "sample.num_questions": 4,
        "sample.max_new_tokens": 8, "sample.show": 1}


def overrides(init_from, **extra):
    return [f"{k}={v!r}" for k, v in {**TINY, "init_from": init_from, **extra}.items()]


@pytest.fixture(scope="module")
def sft(tiny_sft, tmp_path_factory):
    """(this file's directory, the shared tiny SFT workdir: tests/tasks/conftest.py)."""
    return tmp_path_factory.mktemp("dpo"), tiny_sft


def test_dpo_starts_at_ln2_and_learns_the_preference(sft):
    root, wd = sft
    m = run(DPO_PYDOC, workdir=str(root / "dpo"), steps=12, overrides=overrides(
        wd, **{"optimizer.learning_rate": 3e-3, "data.max_train_pairs": 16}))
    assert m["start_val_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert m["start_preference_accuracy"] == 0.0  # ties (reward 0 = 0) count as wrong
    assert m["start_reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert m["val_pairs"] == 56 and np.isfinite(m["val_loss"])
    # the preference of 16 training pairs (6 epochs) is learned (a 30k-param LM SFT'd for 10
    # steps does not generalise it to held-out topics; experiments/dpo_pydoc.py measures that)
    rows = [r for r in read_metrics(str(root / "dpo")) if "train_loss" in r]
    assert rows[-1]["step"] == 12
    assert np.mean([r["train_loss"] for r in rows[-2:]]) < math.log(2) - 0.05
    assert np.mean([r["reward_margin"] for r in rows[-2:]]) > 0.0
    assert 0.0 <= m["keyword_score"] <= 1.0 and "start_keyword_score" in m


def test_lora_dpo(sft):
    root, wd = sft
    m = run(DPO_PYDOC, workdir=str(root / "dpo_lora"), steps=6, overrides=overrides(
        wd, **{"optimizer.learning_rate": 1e-2, "sample.num_questions": 0}) + [
        "peft={'method': 'lora', 'targets': ['attn/(query|value)$'], 'r': 4, 'alpha': 8}"])
    assert m["start_val_loss"] == pytest.approx(math.log(2), abs=1e-5)  # B = 0: the reference
    rows = [r for r in read_metrics(str(root / "dpo_lora")) if "train_loss" in r]
    assert abs(rows[-1]["train_loss"] - math.log(2)) > 1e-4  # the policy moved off the reference
    raw = checkpoint.load_workdir(str(root / "dpo_lora"), fold=False)[2]
    assert np.abs(np.asarray(raw["layers_0"]["attn"]["value"]["lora_b"])).max() > 0
    assert "lora_b" not in checkpoint.load_workdir(str(root / "dpo_lora"))[2]["layers_0"]["attn"]["value"]


def test_bad_preference_data_and_configs(sft, tmp_path):
    _, wd = sft
    pair = {"prompt": [{"role": "user", "content": "Q?"}], "chosen": "same", "rejected": "same"}
    with pytest.raises(InputError, match="chosen and rejected are identical"):
        preferences.check_pairs([pair])
    with pytest.raises(ConfigError, match="needs init_from"):
        run(DPO_PYDOC, workdir=str(tmp_path / "x"), steps=1,
            overrides=overrides(wd) + ["init_from=None"])
    with pytest.raises(ConfigError, match="data.loss_type='dpo'; one of sigmoid, ipo, hinge"):
        run(DPO_PYDOC, workdir=str(tmp_path / "y"), steps=1,
            overrides=overrides(wd, **{"data.loss_type": "dpo"}))


def test_the_preference_is_programmatic():
    train, held = preferences.pydoc_preferences()
    assert len(held) == 56 and len(train) > 300
    for p in train + held:
        assert preferences.keyword_score(p["chosen"], p["keyword"])
        assert not preferences.keyword_score(p["rejected"], p["keyword"])
    assert preferences.question_keyword("What does the `while` statement do?") == "while"
    assert np.mean([p["chosen"] != p["rejected"] for p in train]) == 1.0
