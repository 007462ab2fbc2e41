"""The I-JEPA task through the real training loop at tiny sizes: the loss falls, the EMA target
encoder is the loop's task state (checkpointed, momentum from its schedule), the probe metrics
and their baselines are reported, and the masks keep one shape (one compiled step)."""

import json
import os

import numpy as np
import pytest

from mmjax.errors import ConfigError, InputError
from mmjax.train import run

from support import ROOT  # noqa: E402

IJEPA = os.path.join(ROOT, "experiments", "ijepa_digits.py")
TINY = ["model.encoder.dim=32", "model.encoder.mlp_dim=64", "model.encoder.num_layers=1", "model.predictor_dim=16",
        "model.predictor_layers=1", "data.copies=1", "data.batch_size=16", "optimizer.warmup_steps=1",
        "optimizer.learning_rate=3e-3", "log_every=1", "eval_every=0", "checkpoint_every=0", "data.probe_per_class=5"]


def test_ijepa_task_trains_and_reports_probes(tmp_path):
    import orbax.checkpoint as ocp

    wd = str(tmp_path / "wd")
    m = run(IJEPA, workdir=wd, steps=8, overrides=TINY)
    for key in ("linear_probe_accuracy", "random_init_probe_accuracy", "pixel_probe_accuracy"):
        assert 0.0 <= m[key] <= 1.0, key
        # the mean over data.probe_draws=5 draws of the labels; their spread beside it (different
        # labelled canvases give different probes: a zero std would mean one draw five times)
        assert 0.0 < m[f"{key}_std"] < 0.5, key
    assert m["random_init_probe_accuracy"] == m["start_linear_probe_accuracy"]  # step 0 is the init
    # linear_probe_accuracy is the EMA target encoder's; the online one is probed too: at step 0
    # the target is a copy of it, after that its own
    assert m["start_online_linear_probe_accuracy"] == m["start_linear_probe_accuracy"]
    assert 0.0 <= m["online_linear_probe_accuracy"] <= 1.0
    assert m["val_loss"] < m["start_val_loss"] and m["effective_rank"] > 1.0
    assert os.path.getsize(os.path.join(wd, "features.png")) > 10_000  # the final evaluation's PCA picture
    rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    train = [r for r in rows if "ema_momentum" in r]
    assert len(train) == 8 and np.mean([r["train_loss"] for r in train[-3:]]) < np.mean([r["train_loss"] for r in train[:3]])
    # momentum 0.996 -> 1.0 over the 8 steps, read from the task state's step counter
    assert train[0]["ema_momentum"] == pytest.approx(0.996) and train[-1]["ema_momentum"] == pytest.approx(0.996 + 0.004 * 7 / 8)
    assert all(r["target_patches"] <= 12 and r["context_patches"] <= 49 for r in train)
    # the checkpoint holds the target encoder beside the params, and it lags the online encoder
    ckpt = os.path.join(wd, "checkpoints", "8")
    restored = ocp.StandardCheckpointer().restore(os.path.join(ckpt, "train"))
    target = restored["task_state"]["target"]
    online = ocp.StandardCheckpointer().restore(os.path.join(ckpt, "params"))["encoder"]
    k_t, k_o = target["patch_embed"]["kernel"], online["patch_embed"]["kernel"]
    assert k_t.shape == k_o.shape and 0 < np.abs(k_t - k_o).max()

    # `mmjax export` writes either encoder as transformers' IJepaModel (the target by default):
    # its mean last hidden state is the task's probe feature of that encoder (fp32, 1e-4)
    import torch
    import transformers

    from mmjax.convert.compare import export_dir
    from mmjax.train.experiment import load_experiment
    from mmjax.train.task import build_task

    task = build_task(load_experiment(IJEPA, TINY), wd, log=lambda s: None)
    images = task.data.test.images[:4]
    pixels = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    feats = {}
    for part in ("target", "context"):
        out = str(tmp_path / part)
        assert export_dir(wd, out, part=None if part == "target" else part) == part
        hf = transformers.IJepaModel.from_pretrained(out).eval()
        with torch.no_grad():
            feats[part] = hf(pixel_values=pixels).last_hidden_state.mean(1).numpy()
    mine = {"target": task.features({"encoder": target}, images), "context": task.features({"encoder": online}, images)}
    for part in feats:
        np.testing.assert_allclose(feats[part], mine[part], atol=1e-4)
    assert np.abs(feats["target"] - feats["context"]).max() > 1e-4
    with pytest.raises(InputError, match="exports 'target', 'context'"):
        export_dir(wd, str(tmp_path / "x"), part="predictor")


def test_ijepa_anti_collapse_terms_join_the_loss(tmp_path):
    """With C-JEPA's variance / covariance terms on (the experiment's default; 0 / 0 is the
    paper's objective) the logged loss is the I-JEPA loss plus the weighted terms."""
    m = run(IJEPA, workdir=str(tmp_path / "wd"), steps=3,
            overrides=[*TINY, "data.variance_weight=0.5", "data.covariance_weight=0.25", "eval_at_start=False"])
    rows = [json.loads(line) for line in open(os.path.join(str(tmp_path / "wd"), "metrics.jsonl"))]
    train = [r for r in rows if "jepa_loss" in r]
    assert len(train) == 3 and m["online_linear_probe_accuracy"] >= 0.0
    for r in train:
        assert r["variance_loss"] > 0.0 and r["covariance_loss"] > 0.0
        assert r["train_loss"] == pytest.approx(r["jepa_loss"] + 0.5 * r["variance_loss"] + 0.25 * r["covariance_loss"],
                                                rel=1e-5)


def test_ijepa_config_errors():
    from mmjax.train.experiment import load_experiment

    with pytest.raises(ConfigError, match="one-channel"):
        load_experiment(IJEPA, ["model.encoder.channels=3"])
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        load_experiment(IJEPA, ["optimizer.grad_accum_steps=2"])
    with pytest.raises(ConfigError, match="data.loss"):
        load_experiment(IJEPA, ["data.loss='l1'"])
    with pytest.raises(ConfigError, match="variance_weight"):
        load_experiment(IJEPA, ["data.variance_weight=-1.0"])
    with pytest.raises(ConfigError, match="probe_draws"):
        load_experiment(IJEPA, ["data.probe_draws=0"])
