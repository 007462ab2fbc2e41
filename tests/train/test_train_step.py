"""Train step: accumulation == big batch, loss mask, packed segments, mesh == one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.llama import Llama, LlamaConfig
from mmjax.parallel.mesh import make_mesh
from mmjax.train.experiment import OptimizerConfig
from mmjax.train.optimizer import make_optimizer
from mmjax.tasks.lm import lm_init_fn, lm_loss_fn, lm_loss_sums
from mmjax.train.state import abstract_boxed_params, create_train_state
from mmjax.train.step import make_train_step, shard_batch

T = 16


def _setup(accum=1, mesh=None, model_cfg=None, eps=1e-8):
    model = Llama(model_cfg or LlamaConfig.from_variant("tiny"))
    init_fn = lm_init_fn(model, T)
    tx, sched = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0, eps=eps), 10,
                               abstract_boxed_params(init_fn))
    state, sh = create_train_state(init_fn, tx, seed=0, mesh=mesh)
    step = make_train_step(lm_loss_fn(model), tx, sched, grad_accum_steps=accum, mesh=mesh,
                           shardings=sh)
    return model, state, step


def _batch(b=8, seed=0, mask_frac=0.25):
    rng = np.random.default_rng(seed)
    tok = rng.integers(0, 256, (b, T + 1)).astype(np.int32)
    return {
        "inputs": tok[:, :-1], "targets": tok[:, 1:],
        "segment_ids": np.ones((b, T), np.int32),
        "positions": np.tile(np.arange(T, dtype=np.int32), (b, 1)),
        "loss_mask": (rng.random((b, T)) > mask_frac).astype(np.float32),
    }


def test_grad_accumulation_equals_big_batch_step():
    batch = _batch()
    # Adam's first step is ~lr * sign(g): a large eps keeps it continuous in g, so float
    # summation-order noise in near-zero gradients cannot flip an update.
    _, s1, step1 = _setup(accum=1, eps=1e-3)
    _, s4, step4 = _setup(accum=4, eps=1e-3)
    s1, m1 = step1(s1, shard_batch(batch, None))
    s4, m4 = step4(s4, shard_batch(batch, None))
    assert float(m1["loss"]) == pytest.approx(float(m4["loss"]), rel=1e-6)
    assert float(m1["grad_norm"]) == pytest.approx(float(m4["grad_norm"]), rel=1e-5)
    assert float(m1["count"]) == float(m4["count"]) == batch["loss_mask"].sum()
    for a, b in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s4.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_loss_ignores_masked_targets():
    model, state, _ = _setup()
    batch = _batch()
    other = dict(batch, targets=np.where(batch["loss_mask"] > 0, batch["targets"],
                                         (batch["targets"] + 7) % 256))
    a = lm_loss_sums(model, state.params, shard_batch(batch, None))
    b = lm_loss_sums(model, state.params, shard_batch(other, None))
    assert float(a[0]) == float(b[0]) and float(a[1]) == batch["loss_mask"].sum()


def test_packed_documents_do_not_attend_to_each_other():
    model, state, _ = _setup()
    batch = _batch(b=2, mask_frac=0.0)
    seg = np.repeat(np.array([[1] * 6 + [2] * 10]), 2, axis=0).astype(np.int32)
    pos = np.concatenate([np.arange(6), np.arange(10)])[None].repeat(2, 0).astype(np.int32)
    batch.update(segment_ids=seg, positions=pos, loss_mask=(seg == 2).astype(np.float32))
    changed = dict(batch, inputs=batch["inputs"].copy())
    changed["inputs"][:, :6] = (changed["inputs"][:, :6] + 11) % 256  # rewrite document 1
    a = lm_loss_sums(model, state.params, shard_batch(batch, None))[0]
    b = lm_loss_sums(model, state.params, shard_batch(changed, None))[0]
    assert float(a) == pytest.approx(float(b), rel=1e-6)
    # and without segment ids the second document does see the first
    unpacked = dict(changed, segment_ids=np.ones_like(seg))
    c = lm_loss_sums(model, state.params, shard_batch(unpacked, None))[0]
    assert abs(float(c) - float(a)) > 1e-4


def test_loss_decreases_and_step_counts():
    _, state, step = _setup()
    batch = shard_batch(_batch(), None)
    losses = []
    for _ in range(5):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert int(state.step) == 5
    assert losses[-1] < losses[0]


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_sharded_step_matches_single_device():
    batch = _batch()
    _, s0, step0 = _setup(eps=1e-3)
    mesh = make_mesh("fsdp=4,tensor=2")
    _, s1, step1 = _setup(mesh=mesh, eps=1e-3)
    spec = s1.params["layers_0"]["mlp"]["gate"]["kernel"].sharding.spec
    assert tuple(spec) == ("fsdp", "tensor")
    for _ in range(2):
        s0, m0 = step0(s0, shard_batch(batch, None))
        s1, m1 = step1(s1, shard_batch(batch, mesh))
        assert float(m0["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(s0.params), jax.tree_util.tree_leaves(s1.params)):
        np.testing.assert_allclose(a, np.asarray(b), rtol=1e-4, atol=1e-5)


def test_bf16_compute_keeps_fp32_params():
    cfg = LlamaConfig.from_variant("tiny", dtype="bfloat16")
    _, state, step = _setup(model_cfg=cfg)
    state, m = step(state, shard_batch(_batch(), None))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state.params))
    assert np.isfinite(float(m["loss"]))
