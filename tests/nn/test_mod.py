"""Mixture-of-Depths (mmjax.nn.mod) on a tiny LLaMA: capacity, bit-identical skips, router
gradient, padding, config errors, cache decoding vs a full forward, predictor agreement."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax.errors import ConfigError
from mmjax.models.llama import Llama, LlamaConfig
from mmjax.nn.mod import capacity_tokens, flops_per_token
from mmjax.nn.moe import aux_losses

SEQ = 16


def _config(**kw):
    base = dict(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                max_len=64, mod_capacity=0.25, mod_every=2)
    base.update(kw)
    return LlamaConfig(**base)


@pytest.fixture(scope="module")
def model_and_params():
    model = Llama(_config())
    tokens = jax.random.randint(jax.random.key(0), (2, SEQ), 0, 64)
    params = nn.meta.unbox(model.init(jax.random.key(1), tokens)["params"])
    return model, params, tokens


def _intermediates(model, params, tokens, **kw):
    _, col = model.apply({"params": params}, tokens, mutable=["intermediates", "losses"], **kw)
    return col


def test_exactly_k_tokens_routed_and_params(model_and_params):
    model, params, tokens = model_and_params
    assert set(params["layers_1"]) == {"router", "block"} and "attn" in params["layers_0"]
    col = _intermediates(model, params, tokens)
    routed = col["intermediates"]["layers_1"]["mod_routed"][0]
    k = capacity_tokens(0.25, SEQ)
    assert k == 4
    np.testing.assert_array_equal(np.asarray(routed), [k, k])
    assert float(aux_losses(col)["mod_router_bce"]) > 0


def test_unrouted_tokens_bit_identical(model_and_params):
    model, params, tokens = model_and_params
    _, inter = model.apply({"params": params}, tokens, return_intermediates=True)
    before, after = np.asarray(inter["hidden_states"][1]), np.asarray(inter["hidden_states"][2])
    changed = np.any(before != after, axis=-1)  # [batch, seq]
    np.testing.assert_array_equal(changed.sum(axis=1), [4, 4])


def test_router_gets_gradient_through_r(model_and_params):
    model, params, tokens = model_and_params

    def loss(p):  # the task loss only (no aux loss): the router learns through r
        logits = model.apply({"params": p}, tokens)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens))

    g = jax.grad(loss)(params)["layers_1"]["router"]["kernel"]
    assert float(jnp.sum(jnp.abs(g))) > 0


def test_padding_never_routed(model_and_params):
    model, params, tokens = model_and_params
    mask = jnp.arange(SEQ)[None, :] < jnp.array([[SEQ], [3]])  # row 1: 3 real tokens, k = 4
    _, inter = model.apply({"params": params}, tokens, input_mask=mask, return_intermediates=True)
    h1, h2 = np.asarray(inter["hidden_states"][1]), np.asarray(inter["hidden_states"][2])
    changed = np.any(h1 != h2, axis=-1)
    assert not changed[1, 3:].any() and changed[1].sum() == 3 and changed[0].sum() == 4
    # packed documents: segment id 0 is padding
    seg = jnp.where(jnp.arange(SEQ) < 10, 1, 0)[None].repeat(2, 0)
    _, inter = model.apply({"params": params}, tokens, segment_ids=seg,
                           return_intermediates=True)
    changed = np.any(np.asarray(inter["hidden_states"][1]) != np.asarray(
        inter["hidden_states"][2]), axis=-1)
    assert not changed[:, 10:].any()


@pytest.mark.parametrize("kw, words", [
    (dict(mod_capacity=0.0), "(0, 1]"), (dict(mod_capacity=1.5), "(0, 1]"),
    (dict(mod_every=0), "mod_every"), (dict(num_experts=4), "num_experts"),
    (dict(scan_layers=True), "scan_layers=False"), (dict(mod_aux_weight=-1.0), "mod_aux_weight"),
])
def test_config_errors(kw, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace("]", r"\]")):
        _config(**kw)


def test_cache_decoding_equals_predictor_forward():
    model = Llama(_config(num_layers=4))
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, 64)
    params = nn.meta.unbox(model.init(jax.random.key(3), tokens)["params"])
    # make the router decide both ways: scale its kernel so logits are O(1) and mixed in sign
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 40 if "router" in jax.tree_util.keystr(path) else x, params)
    full, col = model.apply({"params": params}, tokens, mod_routing="predictor",
                            mutable=["intermediates"])
    routed = np.asarray(col["intermediates"]["layers_1"]["mod_routed"][0])
    assert 0 < routed.sum() < tokens.size  # some tokens routed, some skipped
    cache = model.init_cache(2, 16)
    step, cache = model.apply({"params": params}, tokens[:, :5], cache=cache)
    outs = [step]
    for i in range(5, 12):
        step, cache = model.apply({"params": params}, tokens[:, i:i + 1], cache=cache)
        outs.append(step)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=1e-5, rtol=0)
    with pytest.raises(Exception, match="predictor"):
        model.apply({"params": params}, tokens[:, :1], cache=model.init_cache(2, 16),
                    mod_routing="topk")


def test_flops_per_token():
    dense = flops_per_token(4, 256, 688, 8, 4, 32, 2048, 128)
    mod = flops_per_token(4, 256, 688, 8, 4, 32, 2048, 128, capacity=0.125, every=2)
    assert 0.4 < mod / dense < 0.7


def test_predictor_agrees_with_topk_after_training():
    """A short training (task loss + the router BCE) teaches the router's sign the top-k choice.
    The untrained router's logits are ~0 and mostly negative, so its agreement is near the
    "always skip" rate 1 - capacity = 0.75. Measured (printed with -s): 0.786 at init -> 0.895
    after 200 Adam steps."""
    model = Llama(_config(mod_aux_weight=1.0))
    rng = np.random.default_rng(0)
    data = jnp.asarray(rng.integers(0, 64, (64, SEQ + 1)))
    params = nn.meta.unbox(model.init(jax.random.key(4), data[:2, :-1])["params"])
    opt = optax.adam(3e-3)
    state = opt.init(params)

    def loss(p, batch):
        logits, col = model.apply({"params": p}, batch[:, :-1], mutable=["losses"])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
        return nll + sum(aux_losses(col).values())

    @jax.jit
    def step(p, s, batch):
        g = jax.grad(loss)(p, batch)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    def agreement(p):
        col = _intermediates(model, p, data[:, :-1])
        return float(col["intermediates"]["layers_1"]["mod_agreement"][0])

    before = agreement(params)
    for i in range(200):
        params, state = step(params, state, data[(i % 4) * 16:(i % 4 + 1) * 16])
    after = agreement(params)
    print(f"predictor/top-k agreement: {before:.3f} before, {after:.3f} after training")
    assert after > 0.8 and after > before + 0.05
