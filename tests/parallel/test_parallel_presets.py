"""Every parallelism preset: one train step on 8 simulated devices equals the one-device step.

Tolerances (float32): the sharded step computes the same function as the one-device step; only
the order of floating-point sums changes (partial matmuls over fsdp/tensor shards, all-reduces),
so the loss agrees to ~1e-7 relative (measured <= 3e-7) and params to ~1e-7 absolute (measured
<= 1.2e-7). We assert loss rel 1e-5 and params rtol 1e-4 / atol 1e-5 after one AdamW step with
lr 1e-2 and eps 1e-3 (Adam's first step is ~lr * g / (|g| + eps): a larger eps keeps it
continuous in g, so summation-order noise in near-zero gradients cannot flip an update), i.e.
1e-3 of the step size: a wrong layout or a missing all-reduce moves params by a whole step.
"""

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from mmjax.models.llama import Llama, LlamaConfig
from mmjax.parallel import PRESETS, get_preset, make_mesh
from mmjax.tasks.lm import lm_init_fn, lm_loss_fn
from mmjax.train.experiment import OptimizerConfig
from mmjax.train.optimizer import make_optimizer
from mmjax.train.state import abstract_boxed_params, create_train_state
from mmjax.train.step import make_train_step, shard_batch

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

T = 16
DENSE = LlamaConfig(vocab_size=256, dim=64, num_layers=1, num_heads=8, num_kv_heads=4,
                    mlp_dim=128, max_len=64)
MOE = DENSE.replace(mlp_dim=32, num_experts=8, experts_per_token=2)


def _batch(b=8, seed=0):
    rng = np.random.default_rng(seed)
    tok = rng.integers(0, 256, (b, T + 1)).astype(np.int32)
    return {"inputs": tok[:, :-1], "targets": tok[:, 1:], "segment_ids": np.ones((b, T), np.int32),
            "positions": np.tile(np.arange(T, dtype=np.int32), (b, 1)),
            "loss_mask": (rng.random((b, T)) > 0.2).astype(np.float32)}


@functools.cache
def one_step(cfg, preset=None, mesh_spec=None):
    """(loss, state) after one AdamW step, on one device (preset None) or on the mesh (with the
    preset's attention implementation, e.g. ring attention for `context`)."""
    impl = get_preset(preset).implementation if preset else None
    model = Llama(cfg.replace(implementation=impl) if impl else cfg)
    init = lm_init_fn(Llama(cfg), T)  # params do not depend on the attention implementation
    tx, sched = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0, eps=1e-3), 10,
                               abstract_boxed_params(init))
    if preset is None:
        state, _ = create_train_state(init, tx, seed=0)
        step = make_train_step(lm_loss_fn(model), tx, sched)
        state, m = step(state, shard_batch(_batch(), None))
        return float(m["loss"]), state
    p = get_preset(preset)
    mesh = make_mesh(mesh_spec or p.example_mesh)
    state, sh = create_train_state(init, tx, seed=0, mesh=mesh, rules=p.rules, opt_rules=p.opt_rules)
    step = make_train_step(lm_loss_fn(model), tx, sched, mesh=mesh, shardings=sh, rules=p.rules)
    state, m = step(state, shard_batch(_batch(), mesh, p.rules))
    return float(m["loss"]), state


@pytest.fixture(scope="module")
def reference():
    return {"dense": one_step(DENSE), "moe": one_step(MOE)}


def _assert_same(ref, got, loss_rel=1e-5, rtol=1e-4, atol=1e-5):
    (l0, s0), (l1, s1) = ref, got
    assert l1 == pytest.approx(l0, rel=loss_rel)
    for a, b in zip(jax.tree_util.tree_leaves(s0.params), jax.tree_util.tree_leaves(s1.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=rtol, atol=atol)
    assert int(s1.step) == 1


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_step_equals_one_device(reference, preset):
    """float32 layout check for every preset on its example mesh (flamingo's bf16 policy is
    tested on its own below)."""
    got = one_step(DENSE, preset)
    _assert_same(reference["dense"], got)
    p = get_preset(preset)
    # params created already sharded as the rules say
    kernel = got[1].params["layers_0"]["mlp"]["gate"]["kernel"]
    assert kernel.sharding.mesh.shape == make_mesh(p.example_mesh).shape
    assert len(kernel.sharding.device_set) == 8


def test_moe_step_with_expert_parallelism_equals_one_device(reference):
    """Experts over expert=4 (all_to_all inside shard_map), batch over data x expert. (The same
    layer under fsdp_tp with an expert axis: tests/test_moe.py and the sharding snapshots.)"""
    got = one_step(MOE, "expert", "data=2,expert=4")
    _assert_same(reference["moe"], got)
    gate = got[1].params["layers_0"]["moe"]["gate"]
    assert gate.sharding.spec[0] == "expert"
    assert gate.addressable_shards[0].data.shape[0] == MOE.num_experts // 4


def test_zero1_shards_only_the_optimizer_state():
    _, state = one_step(DENSE, "zero1")  # cached from the parametrized test
    for x in jax.tree_util.tree_leaves(state.params):
        assert x.sharding.is_fully_replicated
    mu = state.opt_state[1][0].mu  # chain(clip, adamw) -> adamw's ScaleByAdamState
    k = mu["layers_0"]["attn"]["query"]["kernel"]
    assert tuple(k.sharding.spec)[0] == "data"
    assert k.addressable_shards[0].data.shape[0] == DENSE.dim // 8


def test_tp_sp_rules_split_the_residual_stream_by_sequence():
    rules = get_preset("tp_sp").rules
    # block boundary: length over seq x tensor (Megatron sequence parallelism)
    assert tuple(nn.logical_to_mesh_axes(("act_batch", "act_len", "act_embed"), rules)) == (
        "data", ("seq", "tensor"), None)
    # inside the MLP tensor splits the hidden units, so length falls back to seq
    assert tuple(nn.logical_to_mesh_axes(("act_batch", "act_len", "act_mlp"), rules)) == (
        "data", "seq", "tensor")


@pytest.mark.slow
def test_tp_sp_with_a_seq_axis_equals_one_device(reference):
    _assert_same(reference["dense"], one_step(DENSE, "tp_sp", "seq=2,tensor=4"))


def test_flamingo_preset_sets_bf16_compute_and_fp32_params():
    cfg = get_preset("flamingo").configure_model(DENSE)
    assert (cfg.dtype, cfg.param_dtype) == ("bfloat16", "float32")
    assert get_preset("fsdp").configure_model(DENSE) is DENSE


@pytest.mark.slow
def test_flamingo_preset_bf16_step_matches_one_device():
    """Flamingo: fp32 params and Adam moments, bf16 activations/gradients, tensor-parallel
    params and ZeRO-1 moments. bf16 tolerance: bf16 keeps 8 mantissa bits (relative rounding
    2^-9 ~ 2e-3 per operation) and the sharded step rounds partial sums at other points than the
    one-device step, so the loss agrees to ~2e-5 relative (measured) and the near-zero gradient
    entries, dominated by rounding, move their Adam update by up to ~12% of the step (1.2e-3 at
    lr 1e-2, measured); we allow loss rel 1e-3 and params atol 3e-3 (30% of one step): a wrong
    layout or a missing all-reduce moves params by a whole step (1e-2) or more."""
    cfg = get_preset("flamingo").configure_model(DENSE)
    ref = one_step(cfg)
    got = one_step(cfg, "flamingo")
    _assert_same(ref, got, loss_rel=1e-3, rtol=0, atol=3e-3)
    state = got[1]
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(state.params))
    q = state.params["layers_0"]["attn"]["query"]["kernel"]  # [embed, heads, head_dim]
    assert tuple(q.sharding.spec)[:2] == (None, "tensor")
    mu = state.opt_state[1][0].mu["layers_0"]["attn"]["query"]["kernel"]
    assert tuple(mu.sharding.spec)[:2] == ("data", "tensor")
    assert mu.dtype == np.float32
    emb = state.params["embed"]["embedding"]  # embeddings model-parallel over vocab
    assert tuple(emb.sharding.spec)[0] == "tensor"
