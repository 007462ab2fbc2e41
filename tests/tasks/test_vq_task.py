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


# --- the adversarial (VQGAN) loss --------------------------------------------------------------
GAN = ["model.discriminator_layers=1", "model.discriminator_width=8", "data.adversarial_weight=0.8",
       "data.disc_start=3", "data.restart_after=0"]


@pytest.fixture(scope="module")
def gan_task(tmp_path_factory):
    from mmjax.train.experiment import load_experiment
    from mmjax.train.task import build_task

    cfg = load_experiment(VQ, TINY + GAN)
    task = build_task(cfg, str(tmp_path_factory.mktemp("gan")), log=lambda s: None)
    params = nn.unbox(jax.jit(task.init_params)(jax.random.PRNGKey(0)))
    x = jnp.asarray(task.train_images[:16]) * 2.0 - 1.0
    return task, params, x


def _split(tree):
    """(discriminator leaves, the tokenizer's leaves) of a params-shaped tree, as numpy."""
    gen = {k: v for k, v in tree.items() if k != "discriminator"}
    return ([np.asarray(a) for a in jax.tree_util.tree_leaves(tree["discriminator"])],
            [np.asarray(a) for a in jax.tree_util.tree_leaves(gen)])


def test_adversarial_adaptive_weight_is_the_gradient_norm_ratio_at_the_last_decoder_layer(gan_task):
    """The task's weight (from the last conv re-applied to the stopped decoder_hidden) equals
    0.8 * ||dL_rec/dW|| / (||dL_gen/dW|| + 1e-4) with both gradients taken by jax.grad through
    the whole model, W = decoder/conv_out/kernel."""
    from mmjax.models.vq import VQModel
    from mmjax.ops.vq_losses import generator_loss, reconstruction_loss

    task, params, x = gan_task
    model = task.model
    _, aux = jax.jit(lambda p: task.adversarial_terms(p, x, model.apply({"params": p}, x), jnp.float32(1.0)))(params)

    def rec(p):
        return reconstruction_loss(x, model.apply({"params": p}, x)["reconstruction"])

    def gen(p):
        fake = model.apply({"params": p}, x)["reconstruction"]
        return generator_loss(model.apply({"params": p}, fake, method=VQModel.discriminate))

    g_rec = np.asarray(jax.jit(jax.grad(rec))(params)["decoder"]["conv_out"]["kernel"], np.float64)
    g_gen = np.asarray(jax.jit(jax.grad(gen))(params)["decoder"]["conv_out"]["kernel"], np.float64)
    want = 0.8 * min(np.linalg.norm(g_rec) / (np.linalg.norm(g_gen) + 1e-4), 1e4)
    assert 0 < want < 0.8 * 1e4  # not at a clip: the test compares the ratio itself
    np.testing.assert_allclose(float(aux["adaptive_weight"]), want, rtol=1e-4)


def test_adversarial_stop_gradients_give_each_player_only_its_own_term(gan_task):
    task, params, x = gan_task
    model = task.model

    def term(name):
        return lambda p: task.adversarial_terms(p, x, model.apply({"params": p}, x), jnp.float32(1.0))[1][name]

    grad_gen = jax.jit(jax.grad(term("gen_loss")))(params)
    grad_disc = jax.jit(jax.grad(term("disc_loss")))(params)
    gen_d = _split(grad_gen)[0]
    disc_d, disc_g = _split(grad_disc)
    assert all(np.all(g == 0) for g in gen_d)  # the generator term moves no discriminator param
    assert all(np.all(g == 0) for g in disc_g)  # the discriminator term moves no tokenizer param
    # ... and each term does move its own player (every decoder / discriminator kernel; the hinge
    # loss's gradient to the last bias is exactly 0 while every logit lies in (-1, 1))
    for player, grads in (("decoder", grad_gen), ("discriminator", grad_disc)):
        for path, g in jax.tree_util.tree_flatten_with_path(grads[player])[0]:
            if "kernel" in jax.tree_util.keystr(path):
                assert np.abs(np.asarray(g)).max() > 0, (player, path)
    # the whole step's objective: d/dD = d L_disc / dD; d/dG = d(L_vq + w L_gen)/dG
    state = task.init_task_state(params)
    state["step"] = jnp.int32(3)  # = disc_start: on
    batch = {"images": (x + 1.0) / 2.0}
    g_total = jax.jit(jax.grad(lambda p: task.state_loss(p, state, batch, jax.random.PRNGKey(0))[0]))(params)
    w = float(jax.jit(term("adaptive_weight"))(params))
    g_ref = jax.jit(jax.grad(lambda p: task.loss(p, batch, None)[0] + w * term("gen_loss")(p)))(params)
    tot_d, tot_g = _split(g_total)
    ref_g = _split(g_ref)[1]
    for a, b in zip(tot_d, disc_d):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8)
    for a, b in zip(tot_g, ref_g):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8)


def test_adversarial_terms_switch_on_at_disc_start(gan_task):
    task, params, x = gan_task
    batch = {"images": (x + 1.0) / 2.0}
    step = jax.jit(lambda p, s: task.state_loss(p, s, batch, jax.random.PRNGKey(0)))
    plain = float(jax.jit(lambda p: task.loss(p, batch, None)[0])(params))
    state = task.init_task_state(params)
    assert set(state) == {"step"} and int(state["step"]) == 0  # no codebook state without EMA / restart
    before, _, aux0, new0 = step(params, {"step": jnp.int32(2)})
    assert float(aux0["disc_factor"]) == 0.0 and int(new0["step"]) == 3
    np.testing.assert_allclose(float(before), plain, rtol=1e-6)
    g = jax.jit(jax.grad(lambda p: task.state_loss(p, {"step": jnp.int32(2)}, batch, None)[0]))(params)
    assert all(np.all(a == 0) for a in _split(g)[0])  # the discriminator does not train before disc_start
    after, _, aux1, new1 = step(params, {"step": jnp.int32(3)})
    assert float(aux1["disc_factor"]) == 1.0 and int(new1["step"]) == 4
    np.testing.assert_allclose(float(after), plain + float(aux1["adaptive_weight"]) * float(aux1["gen_loss"])
                               + float(aux1["disc_loss"]), rtol=1e-5)
    assert task.params_from_state(params, new1) is params  # nothing written to the params


def test_adversarial_training_through_the_loop(tmp_path):
    """A few real steps: finite losses, the discriminator still before disc_start and trained after,
    the checkpoint loads for inference (its tokenizer encodes and decodes as usual)."""
    import orbax.checkpoint as ocp

    from mmjax.models.vq import VQModel
    from mmjax.train import load_for_inference

    wd = str(tmp_path / "wd")
    m = run(VQ, workdir=wd, steps=6, overrides=TINY + GAN + ["data.disc_start=4", "checkpoint_every=2",
                                                            "keep_checkpoints=3", "data.disc_loss='vanilla'"])
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        train = [r for r in map(json.loads, f) if "train_loss" in r]
    assert [r["disc_factor"] for r in train] == [0, 0, 0, 0, 1, 1]
    for r in train:
        for key in ("train_loss", "gen_loss", "disc_loss", "adaptive_weight"):
            assert np.isfinite(r[key]), (key, r)
    assert np.isfinite(m["reconstruction_psnr"])

    def params_at(step):
        return ocp.StandardCheckpointer().restore(os.path.join(wd, "checkpoints", str(step), "params"))

    p2, p4, p6 = params_at(2), params_at(4), params_at(6)
    (d2, g2), (d4, g4), (d6, _) = _split(p2), _split(p4), _split(p6)
    assert all(np.array_equal(a, b) for a, b in zip(d2, d4))  # no discriminator gradient before disc_start
    assert not all(np.array_equal(a, b) for a, b in zip(g2, g4))  # while the tokenizer trains
    assert not any(np.array_equal(a, b) for a, b in zip(d4, d6))  # every discriminator param moved after
    model, params, _ = load_for_inference(wd)
    assert "discriminator" in params
    images = jnp.asarray(np.zeros((2, 8, 8, 1), np.float32))
    ids = model.apply({"params": params}, images, method=VQModel.encode)
    assert ids.shape == (2, 4, 4)
    assert model.apply({"params": params}, ids, method=VQModel.decode_ids).shape == (2, 8, 8, 1)


def test_adversarial_config_errors():
    from mmjax.train.experiment import load_experiment

    with pytest.raises(ConfigError, match=r"data.adversarial_weight=0.8 needs a discriminator: set "
                                          r"model.discriminator_layers"):
        load_experiment(VQ, ["data.adversarial_weight=0.8"])
    with pytest.raises(ConfigError, match=r"model.discriminator_layers=2 with data.adversarial_weight=0"):
        load_experiment(VQ, ["model.discriminator_layers=2"])
    with pytest.raises(ConfigError, match=r"data.disc_start=1500 >= steps=1500"):
        load_experiment(VQ, ["model.discriminator_layers=2", "data.adversarial_weight=0.8", "data.disc_start=1500"])
    with pytest.raises(ConfigError, match=r"data.disc_loss must be 'hinge'"):
        load_experiment(VQ, ["data.disc_loss='lsgan'"])
    with pytest.raises(ConfigError, match=r"data.adversarial_weight must be >= 0"):
        load_experiment(VQ, ["data.adversarial_weight=-1.0"])
    with pytest.raises(ConfigError, match=r"data.disc_start must be an int >= 0"):
        load_experiment(VQ, ["data.disc_start=-5"])
    with pytest.raises(ConfigError, match=r"adversarial_weight > 0 counts steps.*grad_accum_steps must be 1"):
        load_experiment(VQ, ["model.discriminator_layers=2", "data.adversarial_weight=0.8",
                             "data.restart_after=0", "optimizer.grad_accum_steps=2"])
    with pytest.raises(ConfigError, match=r"discriminator_layers=3: 16x16 images leave no patch logits"):
        load_experiment(VQ, ["model.discriminator_layers=3", "data.adversarial_weight=0.8"])
