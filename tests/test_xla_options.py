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


def _step_and_state(options):
    config = LlamaConfig(vocab_size=256, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         mlp_dim=128, max_len=64, dtype="float32", param_dtype="float32")
    model = Llama(config)
    opt = OptimizerConfig(learning_rate=1e-3, warmup_steps=0, grad_clip=1.0)
    init_fn = lm_init_fn(model, 32)
    tx, schedule = make_optimizer(opt, 10, abstract_boxed_params(init_fn))
    state, _ = create_train_state(init_fn, tx, seed=0)
    return make_train_step(lm_loss_fn(model), tx, schedule, compiler_options=options), state


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
