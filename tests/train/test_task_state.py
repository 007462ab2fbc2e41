"""A task's own train state (TrainState.task_state) through step, loop and checkpoint, on BLIP's
momentum encoder + feature queues (data.momentum / queue_size): the EMA and the queues against
numpy, stop/resume on a mesh equal to one run, the checkpoint holding the state, its shardings
mirroring the params', and tasks without it unchanged."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import ConfigError
from mmjax.train import run

from support import ROOT  # noqa: E402

BLIP_CAPFILT = os.path.join(ROOT, "experiments", "blip_capfilt.py")
TINY = ["model.vision.dim=32", "model.vision.mlp_dim=64", "model.vision.num_layers=1",
        "model.text.dim=32", "model.text.mlp_dim=64", "model.text.num_layers=1",
        "model.text.encoder_width=32", "data.batch_size=16", "optimizer.warmup_steps=2",
        "optimizer.learning_rate=3e-3", "checkpoint_every=0", "eval_at_start=False",
        "log_every=1", "data.eval_limit=32", "data.photos=False"]
MOMENTUM = ["data.momentum=0.9", "data.queue_size=40", "data.alpha=0.4"]


def _task(tmp_path, extra=()):
    from mmjax.train.experiment import load_experiment
    from mmjax.train.task import build_task

    cfg = load_experiment(BLIP_CAPFILT, [*TINY, *extra])
    return cfg, build_task(cfg, str(tmp_path / "t"), lambda s: None)


def test_momentum_ema_and_queue_equal_numpy_after_steps(tmp_path):
    """Two jitted steps: momentum = 0.9 * momentum + 0.1 * the params the step started from
    (EMA before encoding, ALBEF's order), and the queue rows are the momentum features of the
    pushed batches in order, the pointer wrapping (24 rows, batches of 16)."""
    import optax

    from mmjax.train.state import create_train_state
    from mmjax.train.step import make_train_step

    # ITC only (a smaller program to compile); queue of 24 rows, batches of 16: wraps at step 2
    cfg, task = _task(tmp_path, ["data.momentum=0.9", "data.queue_size=24", "data.itm_weight=0.0",
                                 "data.lm_weight=0.0"])
    tx = optax.adam(1e-2)
    state, _ = create_train_state(task.init_params, tx, seed=0, init_task_state=task.init_task_state)
    step = make_train_step(task.loss, tx, lambda s: 1e-2, state_loss_fn=task.state_loss)
    it = task.train_iterator()
    np_ = lambda t: jax.tree_util.tree_map(np.asarray, t)  # noqa: E731
    mom = np_(state.task_state["params"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, mom,
                           np_({k: state.params[k] for k in mom}))  # starts as a copy
    batches, started, mom_used = [], [], []
    for _ in range(2):
        batch = {k: jnp.asarray(v) for k, v in next(it).items()}
        p = np_(state.params)
        mom = jax.tree_util.tree_map(lambda e, o: 0.9 * e + 0.1 * o, mom, {k: p[k] for k in mom})
        batches.append(batch), started.append(p), mom_used.append(mom)
        if not batches[:-1]:  # step 1: queue negatives + soft targets change ITC
            plain = float(jax.jit(task.loss)(state.params, batch, jax.random.PRNGKey(0))[2]["itc_loss"])
        state, metrics = step(state, batch)
        assert np.isfinite(float(metrics["itc_loss"]))
        if len(batches) == 1:
            assert abs(float(metrics["itc_loss"]) - plain) > 1e-3, (float(metrics["itc_loss"]), plain)
        if len(batches) == 2:  # the EMA after two steps
            jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                                   np_(state.task_state["params"]), mom)
            # and it moved: not the online params, not the initial copy
            k = state.task_state["params"]["vision_proj"]["kernel"]
            assert not np.allclose(k, np.asarray(state.params["vision_proj"]["kernel"]))
            assert not np.allclose(k, started[0]["vision_proj"]["kernel"])
    ts = np_(state.task_state)
    assert int(ts["ptr"]) == (2 * 16) % 24 == 8
    # rows 0..15 batch 1, then 16..23 + 0..7 batch 2 (wrapped over batch 1's first 8, so batch 1
    # keeps rows 8..15)
    order = [(0, np.arange(8, 16), slice(8, 16)), (1, np.r_[16:24, 0:8], slice(None))]
    feats = jax.jit(lambda m, b: task._itc_on(m, task._embeds(m, b["images"]), b["tokens"], b["input_mask"])[:2])
    for i, rows, part in order:
        m_img, m_txt = feats(mom_used[i], batches[i])
        np.testing.assert_allclose(ts["image_queue"][rows], np.asarray(m_img)[part], atol=2e-5)
        np.testing.assert_allclose(ts["text_queue"][rows], np.asarray(m_txt)[part], atol=2e-5)
        np.testing.assert_array_equal(ts["class_queue"][rows], np.asarray(batches[i]["text_class"])[part])


def test_momentum_itc_loss_is_albef_on_a_hand_example():
    """itc_momentum_loss against a numpy transcription of ALBEF's formula (alpha, queue)."""
    from mmjax.ops.blip_losses import class_targets, itc_momentum_loss

    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    img, txt, mi, mt = (unit(rng.normal(size=(3, 4))) for _ in range(4))
    iq, tq = unit(rng.normal(size=(5, 4))), unit(rng.normal(size=(5, 4)))
    t, alpha = 0.2, 0.4

    def ref(hard):
        def sm(x):
            e = np.exp(x - x.max(-1, keepdims=True))
            return e / e.sum(-1, keepdims=True)
        all_t, all_i = np.concatenate([mt, tq]), np.concatenate([mi, iq])
        tgt_i2t = alpha * sm(mi @ all_t.T / t) + (1 - alpha) * hard
        tgt_t2i = alpha * sm(mt @ all_i.T / t) + (1 - alpha) * hard
        l_i2t = -np.mean(np.sum(tgt_i2t * np.log(sm(img @ all_t.T / t)), -1))
        l_t2i = -np.mean(np.sum(tgt_t2i * np.log(sm(txt @ all_i.T / t)), -1))
        return (l_i2t + l_t2i) / 2

    got = float(itc_momentum_loss(img, txt, mi, mt, iq, tq, t, alpha))
    assert got == pytest.approx(ref(np.eye(3, 8)), rel=1e-5)
    cls, qcls = np.array([0, 1, 0]), np.array([1, -1, 0, 2, 0])
    hard = np.asarray(class_targets(jnp.asarray(cls), jnp.asarray(qcls)))
    assert hard[0].tolist() == pytest.approx([1 / 4, 0, 1 / 4, 0, 0, 1 / 4, 0, 1 / 4])
    assert hard[1].tolist() == pytest.approx([0, 1 / 2, 0, 1 / 2, 0, 0, 0, 0])
    got = float(itc_momentum_loss(img, txt, mi, mt, iq, tq, t, alpha, jnp.asarray(hard)))
    assert got == pytest.approx(ref(hard), rel=1e-5)


def test_stop_and_resume_with_momentum_equals_one_run(tmp_path):
    """BLIP with the momentum encoder + queue (one device: the mesh layout is the next test's):
    2 steps, stop, resume to step 4 gives the losses of 4 straight steps (the queue and the EMA
    come back from the checkpoint, which holds them). Both stop at 4 of a 6-step schedule, so
    no final evaluation is paid for."""
    import orbax.checkpoint as ocp

    from mmjax.train.errors import IncompatibleCheckpointError

    over = [*TINY, *MOMENTUM, "data.lm_weight=0.0"]  # ITC + ITM: a smaller program to compile
    kw = dict(phase="noisy", steps=6, overrides=over)
    straight = run(BLIP_CAPFILT, workdir=str(tmp_path / "a"), stop_at=4, **kw)
    first = run(BLIP_CAPFILT, workdir=str(tmp_path / "b"), stop_at=2, **kw)
    assert first["stopped"] == "--stop-at 2"
    ckpt = tmp_path / "b" / "checkpoints"
    meta = ocp.StandardCheckpointHandler().metadata(ckpt / "2" / "train")
    tree = getattr(meta, "tree", meta)
    assert set(tree["task_state"]) == {"params", "image_queue", "text_queue", "class_queue", "ptr"}
    assert tuple(tree["task_state"]["image_queue"].shape)[0] == 40
    assert set(tree["task_state"]["params"]) == {"vision", "text_encoder", "vision_proj", "text_proj"}
    resumed = run(BLIP_CAPFILT, workdir=str(tmp_path / "b"), stop_at=4, **kw)
    assert resumed["step"] == straight["step"] == 4

    def losses(wd):
        rows = [json.loads(line) for line in open(wd / "metrics.jsonl")]
        return {r["step"]: (r["train_loss"], r["itc_loss"]) for r in rows if "itc_loss" in r}

    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        np.testing.assert_allclose(b[s], a[s], rtol=1e-5, err_msg=f"step {s}")
    # a momentum checkpoint does not resume as a plain run: a clear error, nothing trained
    with pytest.raises(IncompatibleCheckpointError, match="task state"):
        run(BLIP_CAPFILT, workdir=str(tmp_path / "b"), **{**kw, "overrides": [*TINY, "data.lm_weight=0.0"]})


def test_task_state_shardings_mirror_the_params(tmp_path):
    import optax

    from mmjax.parallel.mesh import make_mesh
    from mmjax.train.state import create_train_state, state_shardings

    _, task = _task(tmp_path, MOMENTUM)
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    tx = optax.adam(1e-3)
    sh = state_shardings(task.init_params, tx, mesh, init_task_state=task.init_task_state)
    for k in ("vision", "text_encoder", "vision_proj", "text_proj"):
        jax.tree_util.tree_map(lambda a, b: None if a == b else pytest.fail(f"{k}: {a} != {b}"),
                               sh.task_state["params"][k], sh.params[k])
    assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree_util.tree_leaves(sh.params))
    assert sh.task_state["image_queue"].spec == jax.sharding.PartitionSpec()
    state, _ = create_train_state(task.init_params, tx, seed=0, mesh=mesh,
                                  init_task_state=task.init_task_state)
    for got, want in zip(jax.tree_util.tree_leaves(state.task_state), jax.tree_util.tree_leaves(sh.task_state)):
        assert got.sharding == want
    # a task without state: nothing added anywhere
    assert state_shardings(task.init_params, tx, mesh).task_state is None


def test_momentum_config_errors():
    from mmjax.tasks.blip import BlipDataConfig

    with pytest.raises(ConfigError, match="itc_weight=0"):
        BlipDataConfig(momentum=0.995, itc_weight=0.0)
    with pytest.raises(ConfigError, match="needs data.momentum"):
        BlipDataConfig(queue_size=64)
    with pytest.raises(ConfigError, match="at least one batch"):
        BlipDataConfig(momentum=0.995, queue_size=8, batch_size=16)
    with pytest.raises(ConfigError, match=r"data.momentum must be in \[0, 1\)"):
        BlipDataConfig(momentum=1.0)
    with pytest.raises(ConfigError, match="alpha"):
        BlipDataConfig(momentum=0.995, alpha=1.5)
    from mmjax.train.step import make_train_step

    with pytest.raises(ConfigError, match="grad_accum_steps"):
        make_train_step(None, None, None, grad_accum_steps=2, state_loss_fn=lambda *a: None)
