"""The AIM task through the real training loop at tiny sizes: the loss falls, both probes and their
baselines are reported, the prefix lengths come from the configured range, the predictions
picture is written, and bad settings are refused naming the setting."""

import json
import os

import numpy as np
import pytest

from mmjax.errors import ConfigError
from mmjax.train import run

from support import ROOT  # noqa: E402

AIM = os.path.join(ROOT, "experiments", "aim_digits.py")
# 16 px canvases, 4 px patches: a 4 x 4 grid
TINY = ["data.canvas=16", "data.digit_size=(6, 12)", "model.trunk.image_size=16", "model.trunk.dim=32",
        "model.trunk.mlp_dim=64", "model.trunk.num_layers=1", "model.head_width=32", "model.head_mlp_dim=64",
        "model.head_blocks=1", "data.copies=1", "data.batch_size=32", "optimizer.warmup_steps=1",
        "optimizer.learning_rate=3e-3", "log_every=1", "eval_every=0", "checkpoint_every=0",
        "data.probe_per_class=5", "data.probe_draws=2", "data.attentive_probe_steps=10", "data.picture_images=2"]


def test_aim_task_trains_and_reports_probes(tmp_path):
    wd = str(tmp_path / "wd")
    m = run(AIM, workdir=wd, steps=12, overrides=TINY)
    for key in ("attentive_probe_accuracy", "linear_probe_accuracy", "random_init_attentive_probe_accuracy",
                "random_init_linear_probe_accuracy", "pixel_attentive_probe_accuracy", "pixel_probe_accuracy"):
        assert 0.0 <= m[key] <= 1.0, key
        assert 0.0 <= m[f"{key}_std"] <= 0.5, key  # the mean over data.probe_draws=2 label draws, and its spread
    assert max(m[k] for k in m if k.endswith("probe_accuracy_std")) > 0.0  # two draws, not one twice
    assert m["random_init_linear_probe_accuracy"] == m["start_linear_probe_accuracy"]  # step 0 is the init
    assert m["val_loss"] < m["start_val_loss"]
    rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    train = [r for r in rows if "prefix_len" in r]
    assert len(train) == 12
    assert np.mean([r["train_loss"] for r in train[-3:]]) < np.mean([r["train_loss"] for r in train[:3]])
    assert all(1.0 <= r["prefix_len"] <= 15.0 for r in train)  # U[1, N-1], N = 16
    assert os.path.getsize(os.path.join(wd, "predictions.png")) > 0


def test_aim_task_is_registered_and_config_errors():
    from mmjax.train.experiment import load_experiment
    from mmjax.train.task import task_class

    assert task_class("aim").__name__ == "AIMTask"
    with pytest.raises(ConfigError, match=r"data.max_prefix=64 leaves no patch to predict.*<= 63"):
        load_experiment(AIM, ["data.max_prefix=64"])
    with pytest.raises(ConfigError, match="data.min_prefix=9 exceeds"):
        load_experiment(AIM, ["data.canvas=16", "model.trunk.image_size=16", "data.digit_size=(6, 12)",
                              "data.min_prefix=9", "data.max_prefix=None", "model.trunk.patch_size=8"])
    with pytest.raises(ConfigError, match="data.min_prefix must be >= 0"):
        load_experiment(AIM, ["data.min_prefix=-1"])
    with pytest.raises(ConfigError, match="one-channel"):
        load_experiment(AIM, ["model.trunk.channels=3"])
    with pytest.raises(ConfigError, match="data.loss"):
        load_experiment(AIM, ["data.loss='mse'"])
    with pytest.raises(ConfigError, match="not divisible by patch_size"):
        load_experiment(AIM, ["model.trunk.patch_size=5"])
