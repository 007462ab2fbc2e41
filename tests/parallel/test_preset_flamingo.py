"""The `flamingo` preset on the Flamingo model itself (Flamingo's training setup: embeddings,
self/cross-attention and FFW over tensor, ZeRO-1 optimizer state over data, fp32 params and
accumulators, bf16 activations and gradients): one train step of the tiny Flamingo on
data=2,tensor=4 (8 simulated devices) against the same step on one device, with the recipe's
freezing (image tower and LM frozen; resampler and gated blocks train).

Tolerance (bf16 compute; the reasoning of tests/parallel/test_preset_two_towers.py): bf16 keeps
8 mantissa bits and the sharded step rounds partial sums elsewhere, so we assert the loss within
3e-3 relative (one bf16 rounding step), the mean |param diff| < 5e-4 (5% of one Adam step at
lr 1e-2) and at most 0.1% of entries beyond 3e-3: a wrong layout or a missing all-reduce moves
most trained params by a whole step. Frozen params must not move at all."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from mmjax.models import build_model
from mmjax.models.flamingo import FlamingoConfig
from mmjax.parallel import get_preset, make_mesh
from mmjax.tasks.flamingo import FROZEN
from mmjax.train.experiment import OptimizerConfig
from mmjax.train.optimizer import make_optimizer
from mmjax.train.state import abstract_boxed_params, create_train_state
from mmjax.train.step import make_train_step, shard_batch

import optax

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

_T = FlamingoConfig.from_variant("tiny")  # 4 heads everywhere: each splits over tensor=4
TINY = _T.replace(resampler_heads=4, resampler_head_dim=8, vision=_T.vision.replace(num_heads=4))
IMG, EOC = TINY.image_token_index, TINY.end_of_chunk_token_id


def _batch(b=8, t=12, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 90, (b, t)).astype(np.int32)
    tokens[:, 1], tokens[:, 5], tokens[:, 6] = IMG, EOC, IMG  # text, image 0, ..., image 1
    valid = np.zeros((b, 3), bool)
    valid[:, :2] = True
    h, w = TINY.vision.image_hw
    return {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1),
            "loss_mask": np.ones((b, t), bool), "input_mask": np.ones((b, t), bool),
            "images": rng.normal(size=(b, 3, h, w, 3)).astype(np.float32), "image_valid": valid}


def _step(cfg, preset=None):
    model, _ = build_model("flamingo", cfg)
    example = _batch(1)

    def init(rng):
        params = model.init(rng, example["tokens"], example["images"])["params"]
        # open the gates so that the cross-attention path (and its sharding) carries the loss
        return jax.tree_util.tree_map_with_path(
            lambda p, x: x.replace_boxed(x.unbox() + 0.5) if "alpha" in jax.tree_util.keystr(p) else x,
            params, is_leaf=lambda x: isinstance(x, nn.Partitioned))

    def loss_fn(params, batch, rng):
        logits = model.apply({"params": params}, batch["tokens"], batch["images"],
                             image_valid=batch["image_valid"], input_mask=batch["input_mask"])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        w = batch["loss_mask"].astype(np.float32)
        return (nll * w).sum(), w.sum(), {}

    tx, sched = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0, eps=1e-3,
                                               freeze=FROZEN), 10, abstract_boxed_params(init))
    if preset is None:
        state, _ = create_train_state(init, tx, seed=0)
        state0 = jax.tree_util.tree_map(lambda x: np.array(x), state)  # the step donates state
        state, m = make_train_step(loss_fn, tx, sched)(state, shard_batch(_batch(), None))
        return float(m["loss"]), state, state0
    p = get_preset(preset)
    mesh = make_mesh(p.example_mesh)
    state, sh = create_train_state(init, tx, seed=0, mesh=mesh, rules=p.rules, opt_rules=p.opt_rules)
    step = make_train_step(loss_fn, tx, sched, mesh=mesh, shardings=sh, rules=p.rules)
    state, m = step(state, shard_batch(_batch(), mesh, p.rules))
    return float(m["loss"]), state, None


def _flat(tree):
    return np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree_util.tree_leaves(tree)])


def test_flamingo_preset_step_on_8_devices_equals_one_device():
    cfg = get_preset("flamingo").configure_model(TINY)
    assert (cfg.text.dtype, cfg.text.param_dtype, cfg.vision.dtype) == ("bfloat16", "float32", "bfloat16")
    ref_loss, ref, start = _step(cfg)
    loss, state, _ = _step(cfg, "flamingo")
    assert loss == pytest.approx(ref_loss, rel=3e-3)
    trained = ("resampler", "gated_xattn_0", "gated_xattn_1", "additional_embed", "additional_head")
    diff = np.abs(_flat({k: state.params[k] for k in trained}) - _flat({k: ref.params[k] for k in trained}))
    assert diff.mean() < 5e-4 and (diff > 3e-3).mean() < 1e-3, (diff.mean(), (diff > 3e-3).mean())
    moved = np.abs(_flat({k: ref.params[k] for k in trained}) - _flat({k: start.params[k] for k in trained}))
    assert moved.mean() > 1e-3  # the step did train them
    for frozen in ("vision", "language_model"):  # bit-identical, on both sides
        np.testing.assert_array_equal(_flat(state.params[frozen]), _flat(start.params[frozen]))
        np.testing.assert_array_equal(_flat(ref.params[frozen]), _flat(start.params[frozen]))
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(state.params))
    # the layout: cross-attention heads and the gated FFW over tensor, Adam moments also over data
    xq = state.params["gated_xattn_0"]["cross_attn"]["query"]["kernel"]  # [embed, heads, hd]
    assert tuple(xq.sharding.spec)[:2] == (None, "tensor")
    up = state.params["gated_xattn_0"]["mlp"]["up"]["kernel"]  # [embed, mlp]
    assert tuple(up.sharding.spec) == (None, "tensor")
    emb = state.params["language_model"]["embed"]["embedding"]  # [vocab, embed]
    assert tuple(emb.sharding.spec)[0] == "tensor"
