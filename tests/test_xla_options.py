"""mmjax.xla_options: which XLA options mmjax's own steps get, and that they change the compiled
program without changing what it computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.llama import Llama, LlamaConfig
from mmjax.tasks.lm import lm_init_fn, lm_loss_fn
from mmjax.train.experiment import OptimizerConfig
from mmjax.train.optimizer import make_optimizer
from mmjax.train.state import abstract_boxed_params, create_train_state
from mmjax.train.step import make_train_step
from mmjax.xla_options import CPU_FLOAT32_OPTIONS, step_compiler_options


def test_options_for_cpu_float32_only(monkeypatch):
    monkeypatch.delenv("MMJAX_XLA_CPU_OPTIONS", raising=False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert step_compiler_options("float32", backend="cpu") == CPU_FLOAT32_OPTIONS
    assert step_compiler_options(jnp.float32, backend="cpu") == CPU_FLOAT32_OPTIONS
    assert step_compiler_options(None, backend="cpu") == CPU_FLOAT32_OPTIONS
    assert step_compiler_options("bfloat16", backend="cpu") is None  # measured slower there
    assert step_compiler_options(jnp.bfloat16, backend="cpu") is None
    assert step_compiler_options("float32", backend="tpu") is None
    assert step_compiler_options("float32", backend="gpu") is None


def test_env_switch_and_user_flags_win(monkeypatch):
    monkeypatch.setenv("MMJAX_XLA_CPU_OPTIONS", "0")
    assert step_compiler_options("float32", backend="cpu") is None
    monkeypatch.setenv("MMJAX_XLA_CPU_OPTIONS", "1")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
    assert step_compiler_options("float32", backend="cpu") is None  # the user's setting stays


def _step_and_state(options, chains=1):
    config = LlamaConfig(vocab_size=256, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         mlp_dim=128, max_len=64, dtype="float32", param_dtype="float32")
    model = Llama(config)
    opt = OptimizerConfig(learning_rate=1e-3, warmup_steps=0, grad_clip=1.0)
    init_fn = lm_init_fn(model, 32)
    tx, schedule = make_optimizer(opt, 10, abstract_boxed_params(init_fn))
    state, _ = create_train_state(init_fn, tx, seed=0)
    return make_train_step(lm_loss_fn(model), tx, schedule, compiler_options=options,
                           parallel_chains=chains), state


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU options")
def test_options_change_the_program_not_the_result():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, size=(4, 33))
    batch = {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
             "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
             "segment_ids": jnp.ones((4, 32), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32), (4, 32)),
             "loss_mask": jnp.ones((4, 32), jnp.float32)}
    runs = {}
    for name, options in (("plain", None), ("mmjax", CPU_FLOAT32_OPTIONS)):
        step, state = _step_and_state(options)
        text = step.lower(state, batch).compile().as_text()
        losses = []
        for _ in range(3):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        runs[name] = (text, losses, state.params)
    # the options took effect: the compiled programs differ
    assert runs["plain"][0] != runs["mmjax"][0]
    np.testing.assert_allclose(runs["mmjax"][1], runs["plain"][1], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(runs["mmjax"][2]), jax.tree.leaves(runs["plain"][2])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def _batch(rows, seq=32, seed=0):
    tokens = np.random.default_rng(seed).integers(0, 256, size=(rows, seq + 1))
    return {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
            "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
            "segment_ids": jnp.ones((rows, seq), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (rows, seq)),
            "loss_mask": jnp.asarray(np.random.default_rng(seed + 1).random((rows, seq)) > 0.2,
                                     jnp.float32)}


def test_parallel_chains_give_the_whole_batch_step():
    """Loss on 4 slices side by side == loss on the whole batch (no dropout: same numbers),
    with a loss mask that gives the slices different token counts."""
    batch = _batch(8)
    results = []
    for n in (1, 4):
        step, state = _step_and_state(None, chains=n)
        for _ in range(2):
            state, metrics = step(state, batch)
        results.append((float(metrics["loss"]), float(metrics["grad_norm"]), state.params))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-4)
    for a, b in zip(jax.tree.leaves(results[0][2]), jax.tree.leaves(results[1][2])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_parallel_chains_choice_and_errors(monkeypatch):
    from mmjax.errors import ConfigError
    from mmjax.train.step import parallel_chains_for

    monkeypatch.delenv("MMJAX_PARALLEL_CHAINS", raising=False)
    assert parallel_chains_for(16, backend="cpu", sums_over_examples=True) == 4
    assert parallel_chains_for(6, backend="cpu", sums_over_examples=True) == 2
    assert parallel_chains_for(3, backend="cpu", sums_over_examples=True) == 1
    assert parallel_chains_for(16, backend="cpu", sums_over_examples=False) == 1  # contrastive
    assert parallel_chains_for(16, backend="tpu", sums_over_examples=True) == 1
    monkeypatch.setenv("MMJAX_PARALLEL_CHAINS", "1")
    assert parallel_chains_for(16, backend="cpu", sums_over_examples=True) == 1
    with pytest.raises(ConfigError, match="parallel_chains"):
        _step_and_state(None, chains=0)
    with pytest.raises(ValueError, match="divisible by 4"):
        step, state = _step_and_state(None, chains=4)
        step(state, _batch(6))
