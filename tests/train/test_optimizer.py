"""Optimizer: weight-decay mask, regex freezing, warmup + cosine schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import ConfigError
from mmjax.models.llama import Llama, LlamaConfig
from mmjax.train.experiment import OptimizerConfig
from mmjax.train.optimizer import decay_mask, make_optimizer, make_schedule, param_paths, regex_mask
from mmjax.tasks.lm import lm_init_fn
from mmjax.train.state import abstract_boxed_params, create_train_state


def _params():
    model = Llama(LlamaConfig.from_variant("tiny", attention_bias=True))
    init_fn = lm_init_fn(model, 8)
    tx = make_optimizer(OptimizerConfig(), 10, abstract_boxed_params(init_fn))[0]
    state, _ = create_train_state(init_fn, tx, seed=0)
    return state.params


def test_decay_mask_excludes_norms_biases_and_embeddings():
    params = _params()
    flat = dict(zip(param_paths(params), jax.tree_util.tree_leaves(decay_mask(params, OptimizerConfig().no_decay))))
    assert flat["layers_0/attn/query/kernel"] and flat["layers_0/mlp/gate/kernel"]
    assert flat["lm_head/kernel"]
    assert not flat["layers_0/attn_norm/scale"] and not flat["final_norm/scale"]
    assert not flat["layers_0/attn/query/bias"]
    assert not flat["embed/embedding"]


def test_weight_decay_shrinks_only_masked_params():
    params = _params()
    cfg = OptimizerConfig(learning_rate=0.1, warmup_steps=0, weight_decay=0.5, grad_clip=None)
    tx, _ = make_optimizer(cfg, 10, params)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
    k0, k1 = params["layers_0"]["attn"]["query"]["kernel"], new["layers_0"]["attn"]["query"]["kernel"]
    np.testing.assert_allclose(k1, k0 * (1 - 0.1 * 0.5), rtol=1e-6)
    np.testing.assert_array_equal(new["final_norm"]["scale"], params["final_norm"]["scale"])
    np.testing.assert_array_equal(new["embed"]["embedding"], params["embed"]["embedding"])


def test_weight_decay_follows_its_cosine_schedule():
    """optimizer.weight_decay_end: the coefficient goes 0.04 -> 0.4 on I-JEPA's cosine
    (`mmjax.ops.jepa_losses.cosine_weight_decay`, the reference's formula) step by step, still
    only on the masked params."""
    from mmjax.ops.jepa_losses import cosine_weight_decay

    params = _params()
    cfg = OptimizerConfig(learning_rate=0.1, warmup_steps=0, end_lr_ratio=1.0, weight_decay=0.04,
                          weight_decay_end=0.4, grad_clip=None)
    tx, _ = make_optimizer(cfg, 4, params)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    state, p = tx.init(params), params
    want = np.asarray(params["layers_0"]["attn"]["query"]["kernel"])
    for step in range(5):
        updates, state = tx.update(zeros, state, p)
        p = jax.tree_util.tree_map(lambda a, u: a + u, p, updates)
        want = want * (1 - 0.1 * float(cosine_weight_decay(step, 4)))
        np.testing.assert_allclose(p["layers_0"]["attn"]["query"]["kernel"], want, rtol=1e-5)
    assert float(cosine_weight_decay(4, 4)) == pytest.approx(0.4)
    np.testing.assert_array_equal(p["final_norm"]["scale"], params["final_norm"]["scale"])
    with pytest.raises(ConfigError, match="weight_decay_end"):
        OptimizerConfig(weight_decay_end=-0.1)


def test_frozen_params_stay_bit_identical():
    params = _params()
    cfg = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, freeze=(r"^layers_0/", r"^embed/"))
    tx, _ = make_optimizer(cfg, 10, params)
    opt_state = tx.init(params)
    rng = np.random.default_rng(0)
    p = params
    for _ in range(3):
        grads = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), p)
        updates, opt_state = tx.update(grads, opt_state, p)
        p = jax.tree_util.tree_map(lambda a, u: a + u, p, updates)
    frozen = regex_mask(params, cfg.freeze)
    for before, after, is_frozen in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(p),
                                        jax.tree_util.tree_leaves(frozen)):
        if is_frozen:
            np.testing.assert_array_equal(after, before)
        else:
            assert not np.array_equal(after, before)


def test_freeze_regex_matching_nothing_is_an_error():
    with pytest.raises(ConfigError, match="matches no parameter"):
        make_optimizer(OptimizerConfig(freeze=("^vision/",)), 10, _params())


def test_schedule_warmup_then_cosine_to_end_ratio():
    cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=10, end_lr_ratio=0.1)
    s = make_schedule(cfg, 110)
    assert float(s(0)) == 0.0
    assert float(s(5)) == pytest.approx(0.5)
    assert float(s(10)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.55, abs=1e-6)  # halfway down the cosine
    assert float(s(110)) == pytest.approx(0.1)
