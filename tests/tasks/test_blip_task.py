"""The BLIP pretraining task through the real training loop: a tiny run whose three losses
decrease, the shared param tree, the injected caption noise and the CapFilt helpers."""

import json
import os

import numpy as np
import pytest

from mmjax.errors import ConfigError
from mmjax.train import run

from support import ROOT  # noqa: E402
BLIP_CAPFILT = os.path.join(ROOT, "experiments", "blip_capfilt.py")
TINY = ["model.vision.dim=32", "model.vision.mlp_dim=64", "model.vision.num_layers=1",
        "model.text.dim=32", "model.text.mlp_dim=64", "model.text.num_layers=1",
        "model.text.encoder_width=32", "data.batch_size=16", "optimizer.warmup_steps=2",
        "optimizer.learning_rate=3e-3", "checkpoint_every=0"]


@pytest.fixture(scope="module")
def blip_run(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("blip") / "wd")
    metrics = run(BLIP_CAPFILT, workdir=wd, steps=30, overrides=[*TINY, "log_every=1"])
    return wd, metrics


def test_blip_task_losses_decrease(blip_run):
    wd, m = blip_run
    rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    train = [r for r in rows if "itc_loss" in r]
    assert len(train) >= 20
    for key in ("train_loss", "itc_loss", "lm_loss"):
        first = np.mean([r[key] for r in train[:5]])
        last = np.mean([r[key] for r in train[-5:]])
        assert last < first, (key, first, last)
    # ITM starts at ln 2 (balanced 1:2) and must not diverge
    assert np.mean([r["itm_loss"] for r in train[-5:]]) < 0.75
    for key in ("i2t_r@1", "t2i_r@1", "itm_accuracy", "caption_accuracy"):
        assert 0.0 <= m[key] <= 1.0
    assert np.isfinite(m["val_loss"]) and m["val_loss"] < m["start_val_loss"]
    assert "captions of test images" in m["sample"]


def test_blip_task_shares_params_and_injects_noise(blip_run):
    import jax

    from mmjax.tasks.blip import caption_digit, load_params
    from mmjax.train.experiment import load_experiment
    from mmjax.train.task import build_task

    wd, _ = blip_run
    cfg = load_experiment(BLIP_CAPFILT, TINY)
    task = build_task(cfg, wd, lambda s: None)
    params = load_params(task, wd)
    assert set(params["decoder"]["layers_0"]) == {"attn", "attn_norm"}
    rp, cp = task._split(params)
    # the decoder reads the encoder's cross-attention and FFN, its own self-attention
    assert cp["text_decoder"]["layers_0"]["cross_attn"] is rp["text_encoder"]["layers_0"]["cross_attn"]
    assert cp["text_decoder"]["layers_0"]["attn"] is params["decoder"]["layers_0"]["attn"]
    assert cp["vision"] is rp["vision"]
    # 30% of the training captions name another digit, the rest the image's own
    labels = np.asarray(task.data.train.labels)[task.pair_rows]
    named = np.asarray([caption_digit(t) for t in task.pair_texts])
    assert abs(task.pair_noisy.mean() - 0.3) < 0.002
    np.testing.assert_array_equal(named != labels, task.pair_noisy)
    # the CapFilt helpers: scores in [0, 1], captions decoded to words of the vocabulary
    scores = task.match_scores(params, task.data.test.images[:5], task.test_captions()[:5])
    assert scores.shape == (5,) and np.all((scores >= 0) & (scores <= 1))
    caps = task.captions(params, task.data.test.images[:3])
    assert len(caps) == 3 and all(isinstance(c, str) for c in caps)
    task.data.tokenizer.encode(caps, cfg.data.max_text_len)  # round-trips through the tokenizer
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x: np.all(np.isfinite(x)), params))


def test_blip_task_config_errors():
    from mmjax.tasks.blip import BlipDataConfig
    from mmjax.train.experiment import load_experiment

    with pytest.raises(ConfigError, match="noise_fraction"):
        BlipDataConfig(noise_fraction=1.0)
    with pytest.raises(ConfigError, match="image_size"):
        load_experiment(BLIP_CAPFILT, ["data.image_size=32"])
