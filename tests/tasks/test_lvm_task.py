"""The lvm task through the real training loop on a tiny VQ tokenizer and a tiny LLaMA: visual
sentences train it (the loss falls), greedy visual prompting agrees with the teacher-forced
logits, the metrics and the picture are written, and bad settings are refused."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import ConfigError, InputError
from mmjax.train import run
from mmjax.train.experiment import load_experiment
from mmjax.train.metrics import read_metrics
from mmjax.train.task import build_task

from support import ROOT  # noqa: E402

VQ_DIGITS = os.path.join(ROOT, "experiments", "vq_digits.py")
LVM_DIGITS = os.path.join(ROOT, "experiments", "lvm_digits.py")
TINY_VQ = ["model.hidden_dim=16", "model.res_dim=8", "model.codebook_size=16", "model.codebook_dim=8",
           "eval_every=0", "checkpoint_every=0", "eval_at_start=False", "log_every=10",
           "optimizer.warmup_steps=2"]


def lvm_overrides(vq, **extra):
    items = {"data.tokenizer": vq, "model.dim": 32, "model.num_layers": 1, "model.num_heads": 2,
             "model.num_kv_heads": 2, "model.mlp_dim": 64, "data.batch_size": 16,
             "data.eval_sentences": 24, "data.eval_batch_size": 24, "data.picture_rows": 3,
             "optimizer.warmup_steps": 2, "optimizer.learning_rate": 3e-3, "log_every": 5,
             "eval_every": 0, "checkpoint_every": 0, "eval_at_start": False, **extra}
    return [f"{k}={v!r}" for k, v in items.items()]


@pytest.fixture(scope="module")
def vq(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("lvm") / "vq")
    run(VQ_DIGITS, workdir=wd, steps=20, overrides=TINY_VQ)
    return wd


def test_lvm_trains_on_visual_sentences_and_prompts_with_images(vq, tmp_path):
    wd = str(tmp_path / "lvm")
    m = run(LVM_DIGITS, workdir=wd, steps=30, overrides=lvm_overrides(vq))
    rows = [r for r in read_metrics(wd) if "train_loss" in r]
    assert rows[0]["train_loss"] > rows[-1]["train_loss"] + 0.3  # from ~ln 18 toward the codes' statistics
    for k in ("next_image_token_accuracy", "invalid_token_rate", "next_image_digit_accuracy",
              "tokenizer_digit_accuracy"):
        assert 0.0 <= m[k] <= 1.0, k
    assert np.isfinite(m["val_loss"]) and np.isfinite(m["next_image_loss"])
    assert m["tokenizer_psnr"] > 0 and np.isfinite(m["next_image_psnr"]) and np.isfinite(m["copy_previous_psnr"])
    assert os.path.isfile(os.path.join(wd, "visual_prompts.png"))


def test_greedy_prompting_matches_the_teacher_forced_argmax(vq, tmp_path):
    """The first generated code is the argmax of the model's logits after the prompt (so the
    prompt is BOS + the first n-1 images, cut where the last image starts)."""
    import jax

    cfg = load_experiment(LVM_DIGITS, lvm_overrides(vq))
    task = build_task(cfg, str(tmp_path / "t"))
    params = task.init_params(jax.random.PRNGKey(1))
    import flax.linen as nn

    params = nn.meta.unbox(params)
    tokens = task.eval_sentences[0][:8]
    t = task.image_tokens
    assert tokens.shape[1] == 3 * t + 2 and (tokens[:, 0] == task.codebook_size).all()
    pred = task.predict_last_image(params, tokens)
    assert pred.shape == (8, t)
    prompt = tokens[:, : -t - 1]
    logits = task.model.apply({"params": params}, jnp.asarray(prompt))
    np.testing.assert_array_equal(pred[:, 0], np.asarray(jnp.argmax(logits[:, -1], -1)))
    # the evaluation's truth is the last image's codes
    np.testing.assert_array_equal(tokens[:, -t - 1:-1], task.test_codes[task.eval_sentences[1][:8, -1]])


def test_bad_settings(vq, tmp_path):
    with pytest.raises(InputError, match="train the VQ tokenizer first"):
        build_task(load_experiment(LVM_DIGITS, lvm_overrides(str(tmp_path / "none"))), str(tmp_path / "a"))
    with pytest.raises(ConfigError, match="must be even"):
        load_experiment(LVM_DIGITS, lvm_overrides(vq, **{"data.kind": "flip"}))
    with pytest.raises(ConfigError, match="model.max_len=32 must be >= 49"):
        build_task(load_experiment(LVM_DIGITS, lvm_overrides(vq, **{"model.max_len": 32})), str(tmp_path / "b"))


def test_flip_sentences_end_with_the_mirrored_codes(vq, tmp_path):
    cfg = load_experiment(LVM_DIGITS, lvm_overrides(vq, **{"data.kind": "flip", "data.images_per_sentence": 4, "model.max_len": 80}))
    task = build_task(cfg, str(tmp_path / "f"))
    tokens, picks, mirrored = task.eval_sentences
    t = task.image_tokens
    assert mirrored[:, -1].all() and (picks[:, -1] == picks[:, -2]).all()
    np.testing.assert_array_equal(tokens[:, -t - 1:-1], task.test_mirror[picks[:, -1]])
    np.testing.assert_array_equal(tokens[:, -2 * t - 1:-t - 1], task.test_codes[picks[:, -1]])
    assert not np.array_equal(task.test_mirror, task.test_codes)  # mirroring changes the codes
