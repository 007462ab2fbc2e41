"""The VQ task (`mmjax.tasks.vq`) at tiny sizes: through the real training loop with EMA codebook
updates and dead-code restart (the loss falls, the EMA codebook is the one in the params, the
checkpoint and the evaluation read it), and the gradient-codebook path's restart writing only
the dead rows; config errors."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import ConfigError
from mmjax.train import run

from support import ROOT  # noqa: E402

VQ = os.path.join(ROOT, "experiments", "vq_digits.py")
TINY = ["model.image_size=8", "model.downsample=2", "model.hidden_dim=16", "model.res_dim=8",
        "model.codebook_size=16", "model.codebook_dim=4", "data.image_size=8", "data.batch_size=16",
        "data.eval_batch_size=128", "optimizer.warmup_steps=2", "optimizer.learning_rate=3e-3", "log_every=1",
        "eval_every=0", "checkpoint_every=0", "data.picture_images=3"]


def test_vq_task_ema_and_restart_through_the_loop(tmp_path):
    import orbax.checkpoint as ocp

    wd = str(tmp_path / "wd")
    m = run(VQ, workdir=wd, steps=30, overrides=TINY + ["data.codebook_update='ema'", "data.restart_after=3"])
    assert m["reconstruction_psnr"] > m["start_reconstruction_psnr"] and m["val_loss"] < m["start_val_loss"]
    assert 0 < m["codebook_usage"] <= 1 and 1 <= m["codebook_perplexity"] <= 16
    rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    train = [r for r in rows if "train_loss" in r]
    assert len(train) == 30
    assert np.mean([r["train_loss"] for r in train[-5:]]) < np.mean([r["train_loss"] for r in train[:5]])
    assert sum(r["restarted_codes"] for r in train) > 0  # the tiny init codebook leaves codes dead at first
    assert os.path.exists(os.path.join(wd, "reconstructions.png"))
    # the EMA codebook (task state) is what the params hold: evaluation and checkpoints read it
    ckpt = os.path.join(wd, "checkpoints", "30")
    state = ocp.StandardCheckpointer().restore(os.path.join(ckpt, "train"))["task_state"]
    params = ocp.StandardCheckpointer().restore(os.path.join(ckpt, "params"))
    np.testing.assert_array_equal(params["quantizer"]["codebook"], state["codebook"])
    ema = state["ema"]
    np.testing.assert_allclose(state["codebook"], ema["embed_sum"] / (
        (ema["cluster_size"] + 1e-5) / (ema["cluster_size"].sum() + 16e-5) * ema["cluster_size"].sum())[:, None],
        rtol=1e-5)


def test_gradient_codebook_restart_writes_only_dead_rows(tmp_path):
    from mmjax.train.experiment import load_experiment
    from mmjax.train.task import build_task

    cfg = load_experiment(VQ, TINY + ["data.restart_after=2"])
    task = build_task(cfg, str(tmp_path), log=lambda s: None)
    params = nn.unbox(jax.jit(task.init_params)(jax.random.PRNGKey(0)))
    state = task.init_task_state(params)
    assert set(state) == {"codebook", "replace", "unused"}  # no EMA statistics without EMA
    state["unused"] = jnp.asarray([5] * 8 + [0] * 8, jnp.int32)  # codes 0-7 idle for long
    batch = {"images": jnp.asarray(task.train_images[:16])}
    step = jax.jit(lambda p, s, b, r: task.state_loss(p, s, b, r))
    total, count, aux, new = step(params, state, batch, jax.random.PRNGKey(1))
    ids = np.asarray(task.model.apply({"params": params}, batch["images"] * 2 - 1)["ids"])
    used = np.bincount(ids.reshape(-1), minlength=16) > 0
    dead = np.asarray(new["replace"])
    np.testing.assert_array_equal(dead, ~used & (np.arange(16) < 8))
    assert dead.any() and float(aux["restarted_codes"]) == dead.sum()
    moved = {**params, "quantizer": {"codebook": params["quantizer"]["codebook"] + 1.0}}  # "after the optimizer"
    out = np.asarray(task.params_from_state(moved, new)["quantizer"]["codebook"])
    np.testing.assert_array_equal(out[~dead], np.asarray(moved["quantizer"]["codebook"])[~dead])
    np.testing.assert_array_equal(out[dead], np.asarray(new["codebook"])[dead])
    assert np.isfinite(float(total)) and float(count) == 1.0


def test_vq_config_errors():
    from mmjax.train.experiment import load_experiment

    with pytest.raises(ConfigError, match="one-channel"):
        load_experiment(VQ, ["data.image_size=32"])
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        load_experiment(VQ, ["optimizer.grad_accum_steps=2"])
    with pytest.raises(ConfigError, match="data.codebook_update"):
        load_experiment(VQ, ["data.codebook_update='kmeans'"])
    with pytest.raises(ConfigError, match="data.beta_on"):
        load_experiment(VQ, ["data.beta_on='both'"])
    with pytest.raises(ConfigError, match="not divisible by downsample"):
        load_experiment(VQ, ["model.image_size=18"])
